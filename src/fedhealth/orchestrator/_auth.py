"""Authentication and authorization at the orchestrator.

- Sites enroll once with a one-time, expiring enrollment token and register an Ed25519 public key; the
  private key never leaves the site.
- Agents log in by signing a fresh, single-use server challenge and get a short-lived access token (EdDSA
  JWT, audience ``fedhealth-agent``). Revocation is checked on every request, so it takes effect at once.
- People use named accounts with a role and an API key (kept as a hash) that they trade for a short-lived
  operator token (audience ``fedhealth-operator``).
- An agent token never opens an operator endpoint and an operator token never acts as a site (403).
- A token names the credential it was issued against (``cnf``: the site's key, the user's API key), so a
  rotated site key or a changed API key retires every token issued against the old one at once.
- Enrollment tokens: one outstanding per site (issuing one cancels the others), spent on use, and only for a
  site without a key. An enrolled site is re-keyed by an admin's explicit rotation, never by enrolling again.
- Under mutual TLS the client certificate must be the one issued to its subject at the latest enrollment (a
  site) or name a user who is not revoked, and it must name the token's subject.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection

from fedhealth.core import Clock, ConflictError, CryptoError, FedHealthError, canonical_json, sha256_hex
from fedhealth.crypto import (
    Audience,
    IdentityKey,
    PublicIdentity,
    TokenClaims,
    TokenExpiredError,
    TokenIssuer,
    TokenVerifier,
    constant_time_equal,
)
from fedhealth.orchestrator._home import new_secret, secret_hash
from fedhealth.orchestrator._store import EnrollOutcome, SiteCredentials, SiteRow, SiteStatus, Store
from fedhealth.protocol import OPERATOR_ROLES, Role, agent_login_message

# Verified tokens remembered (see AuthService._verified_claims): a few per site and user at a time.
CLAIMS_CACHE_SIZE = 4096


class Unauthenticated(FedHealthError):
    """401: no credentials, or credentials that do not prove who the caller is."""


class Forbidden(FedHealthError):
    """403: the caller is known but may not do this (revoked, wrong kind of token, wrong role)."""


class CertificateMismatch(Forbidden):
    """403 under mutual TLS: the client certificate names another principal than the token's subject (or
    than the one logging in)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    agent_token_ttl: timedelta = timedelta(minutes=10)
    operator_token_ttl: timedelta = timedelta(minutes=15)
    enrollment_token_ttl: timedelta = timedelta(hours=24)
    challenge_ttl: timedelta = timedelta(minutes=2)


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """The authenticated caller of one request."""

    name: str
    role: Role
    claims: TokenClaims


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedToken:
    """An enrollment token as issued: the secret (shown once), its expiry, the earlier ones it cancelled."""

    token: str
    expires_at: datetime
    cancelled: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerCertificate:
    """The TLS client certificate of a connection (mutual TLS): its subject's common name and its sha256."""

    name: str
    fingerprint: str


@functools.lru_cache(maxsize=4096)  # a pure function of the key, compared on every agent request
def key_thumbprint(public_key_hex: str) -> str:
    """What a site's tokens are bound to: the sha256 of its raw Ed25519 public key."""
    return sha256_hex(bytes.fromhex(public_key_hex))


def api_key_thumbprint(api_key_hash: str) -> str:
    """What a user's tokens are bound to: derived from the stored hash of the API key, never the key."""
    return sha256_hex(f"fedhealth-operator-key:{api_key_hash}".encode())


class AuthService:
    ISSUER = "fedhealth-orchestrator"

    def __init__(
        self, store: Store, signing_key: IdentityKey, clock: Clock, settings: AuthSettings | None = None
    ):
        self.store = store
        self.clock = clock
        self.settings = settings or AuthSettings()
        self._issuer = TokenIssuer(signing_key, self.ISSUER, clock)
        self._verifier = TokenVerifier(signing_key.public(), self.ISSUER, clock)
        self._claims_cache: dict[tuple[str, Audience], TokenClaims] = {}

    # --- enrollment --------------------------------------------------------------------------------------

    def enrollment_token(self, site: str, *, connection: Connection | None = None) -> IssuedToken:
        """A new enrollment token for a site without a key; the site's earlier tokens stop working."""
        token = new_secret("fhe")
        now = self.clock.now()
        expires = now + self.settings.enrollment_token_ttl
        cancelled = self.store.add_enrollment_token(
            site, secret_hash(token), now, expires, connection=connection
        )
        return IssuedToken(token=token, expires_at=expires, cancelled=cancelled)

    def rotate(self, site: str, *, connection: Connection | None = None) -> tuple[str, datetime, SiteRow]:
        """Retire an enrolled site's key and client certificate and issue the enrollment token for its new
        key; returns the token, its expiry and the site as it was."""
        token = new_secret("fhe")
        now = self.clock.now()
        expires = now + self.settings.enrollment_token_ttl
        before = self.store.rotate_site(site, secret_hash(token), now, expires, connection=connection)
        return token, expires, before

    def enroll(
        self,
        *,
        site: str,
        token: str,
        public_key_hex: str,
        cert_fingerprint: str | None = None,
        connection: Connection | None = None,
    ) -> datetime:
        try:
            PublicIdentity(bytes.fromhex(public_key_hex))
        except (ValueError, CryptoError) as exc:
            raise Unauthenticated("the public key is not a valid Ed25519 key") from exc
        now = self.clock.now()
        outcome = self.store.enroll_site(
            site=site,
            token_hash=secret_hash(token),
            public_key=public_key_hex,
            when=now,
            cert_fingerprint=cert_fingerprint,
            connection=connection,
        )
        if outcome is EnrollOutcome.ALREADY_ENROLLED:
            raise ConflictError(
                f"site {site!r} is already enrolled; an admin re-keys it with `fedhealth site rotate {site}`"
            )
        if outcome is EnrollOutcome.REVOKED:
            raise Forbidden("this site has been revoked")
        if outcome is not EnrollOutcome.ENROLLED:
            raise Unauthenticated("enrollment token is invalid, superseded, already used, or expired")
        return now

    # --- agent login -------------------------------------------------------------------------------------

    def challenge(self, site: str) -> tuple[str, datetime]:
        status = self.store.site_status(site)
        if status is None or status is SiteStatus.PENDING:
            raise Unauthenticated("unknown or unenrolled site")
        if status is SiteStatus.REVOKED:
            raise Forbidden("this site has been revoked")
        challenge = secrets.token_hex(32)
        now = self.clock.now()
        expires = now + self.settings.challenge_ttl
        self.store.add_challenge(site, challenge, now, expires)
        return challenge, expires

    def agent_token(self, *, site: str, challenge: str, signature_hex: str) -> tuple[str, TokenClaims]:
        row = self.store.get_site_or_none(site)
        if row is None or row.public_key is None:
            raise Unauthenticated("unknown or unenrolled site")
        if row.status is SiteStatus.REVOKED:
            raise Forbidden("this site has been revoked")
        # Spend the challenge before checking the signature: a challenge is good for one attempt only.
        if not self.store.use_challenge(site=site, challenge=challenge, when=self.clock.now()):
            raise Unauthenticated("challenge is unknown, already used, or expired")
        try:
            PublicIdentity(bytes.fromhex(row.public_key)).verify(
                bytes.fromhex(signature_hex), canonical_json(agent_login_message(site, challenge))
            )
        except (ValueError, CryptoError) as exc:
            raise Unauthenticated("signature does not match the site's enrolled key") from exc
        return self._issuer.issue(
            subject=site,
            role=Role.SITE.value,
            audience=Audience.AGENT,
            ttl=self.settings.agent_token_ttl,
            confirmation=key_thumbprint(row.public_key),
        )

    # --- operators ---------------------------------------------------------------------------------------

    def operator_token(self, *, user: str, api_key: str) -> tuple[str, TokenClaims]:
        row = self.store.get_user(user)
        # compare even when the user is unknown, so timing does not tell which user names exist
        expected = row.api_key_hash if row is not None else "0" * 64
        if not constant_time_equal(expected.encode(), secret_hash(api_key).encode()) or row is None:
            raise Unauthenticated("unknown user or wrong API key")
        if row.revoked_at is not None:
            raise Forbidden("this user has been revoked")
        return self._issuer.issue(
            subject=user,
            role=row.role,
            audience=Audience.OPERATOR,
            ttl=self.settings.operator_token_ttl,
            confirmation=api_key_thumbprint(row.api_key_hash),
        )

    def new_user(self, name: str, role: Role, *, connection: Connection | None = None) -> str:
        if role is Role.SITE:
            raise FedHealthError("sites enroll; they are not users")
        api_key = new_secret("fhk")
        self.store.create_user(
            name, role.value, secret_hash(api_key), self.clock.now(), connection=connection
        )
        return api_key

    def new_api_key(self, name: str, *, connection: Connection | None = None) -> str:
        """Replace a user's API key; the old key and every token issued against it stop working at once."""
        api_key = new_secret("fhk")
        if not self.store.set_user_api_key(name, secret_hash(api_key), connection=connection):
            raise ConflictError(f"user {name!r} does not exist or is revoked")
        return api_key

    # --- per request -------------------------------------------------------------------------------------

    def _verified_claims(self, token: str, audience: Audience) -> TokenClaims:
        """The token's claims, its signature checked once per token: a collective session makes hundreds of
        requests a second with one token, and the signature check was most of each request's cost. The
        validity period is re-checked on every use, and everything revocation can change (the site's or
        user's status, its current key or API key) is read from the store on every request below, so a
        revocation still takes effect at the next request."""
        key = (token, audience)
        claims = self._claims_cache.get(key)
        if claims is not None:
            self._verifier.check_times(claims)
            return claims
        claims = self._verifier.verify(token, audience)
        if len(self._claims_cache) >= CLAIMS_CACHE_SIZE:
            self._claims_cache.pop(next(iter(self._claims_cache)))  # the oldest: tokens live minutes
        self._claims_cache[key] = claims
        return claims

    def authenticate(
        self, authorization: str | None, audience: Audience, certificate: PeerCertificate | None = None
    ) -> Principal:
        """Check a bearer token for an endpoint of ``audience`` (and, under mutual TLS, the connection's
        client certificate against the token's subject); raise 401/403 errors otherwise."""
        if not authorization:
            raise Unauthenticated("missing credentials: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("credentials must be a bearer token")
        claims = None
        for candidate in (audience, *(a for a in Audience if a is not audience)):
            try:
                claims = self._verified_claims(token.strip(), candidate)
                break
            except TokenExpiredError as exc:
                raise Unauthenticated("token expired") from exc
            except CryptoError:
                continue
        if claims is None:
            raise Unauthenticated("invalid token")
        if claims.audience is not audience:
            kind = "agent" if claims.audience is Audience.AGENT else "operator"
            raise Forbidden(f"{kind} credentials cannot call this endpoint")
        try:
            role = Role(claims.role)
        except ValueError as exc:
            raise Unauthenticated("invalid token") from exc
        if certificate is not None and certificate.name != claims.subject:
            raise CertificateMismatch("the client certificate does not belong to the token's subject")
        if audience is Audience.AGENT:
            if role is not Role.SITE:
                raise Forbidden("only sites may call the agent API")
            site = self.store.site_credentials(claims.subject)
            if site is not None and certificate is not None:
                _check_site_certificate(site, certificate)
            if site is not None and site.status is SiteStatus.REVOKED:
                raise Forbidden("this site has been revoked")
            if site is None or site.status is not SiteStatus.ACTIVE or site.public_key is None:
                raise Unauthenticated("unknown site")
            if claims.confirmation != key_thumbprint(site.public_key):
                raise Unauthenticated("token was issued for a retired key of this site")
        else:
            if role not in OPERATOR_ROLES:
                raise Forbidden("only operators may call the operator API")
            user, signed_out = self.store.user_for_token(claims.subject, claims.token_id)
            if user is None:
                raise Unauthenticated("unknown user")
            if user.revoked_at is not None:
                raise Forbidden("this user has been revoked")
            if claims.confirmation != api_key_thumbprint(user.api_key_hash):
                raise Unauthenticated("token was issued for a replaced API key")
            if signed_out:
                raise Unauthenticated("this session was signed out")
            role = Role(user.role)  # the role the user has now
        return Principal(name=claims.subject, role=role, claims=claims)

    def sign_out(self, token: str) -> None:
        """End an operator token before it expires (a dashboard session's sign-out): every later request
        with it is refused, by every orchestrator process on this database, until it would have expired."""
        claims = self._verified_claims(token, Audience.OPERATOR)
        self.store.revoke_token(claims.token_id, claims.expires_at, self.clock.now())

    def check_certificate(self, certificate: PeerCertificate) -> None:
        """Under mutual TLS, on a route without a token (login): the certificate must be a current site's
        (the one issued at its latest enrollment) or an unrevoked user's."""
        site = self.store.get_site_or_none(certificate.name)
        if site is not None:
            _check_site_certificate(site, certificate)
            return
        user = self.store.get_user(certificate.name)
        if user is None:
            raise Forbidden("the client certificate names no site or user of this federation")
        if user.revoked_at is not None:
            raise Forbidden("this user has been revoked")


def _check_site_certificate(site: SiteRow | SiteCredentials, certificate: PeerCertificate) -> None:
    if site.status is SiteStatus.REVOKED:
        raise Forbidden("this site has been revoked")
    if site.cert_fingerprint is None or certificate.fingerprint != site.cert_fingerprint:
        raise Forbidden("this client certificate was not issued at the site's latest enrollment")
