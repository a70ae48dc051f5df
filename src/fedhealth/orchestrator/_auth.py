"""Authentication and authorization at the orchestrator.

- Sites enroll once with a one-time, expiring enrollment token and register an Ed25519 public key; the
  private key never leaves the site.
- Agents log in by signing a fresh, single-use server challenge and get a short-lived access token (EdDSA
  JWT, audience ``fedhealth-agent``). Revocation is checked on every request, so it takes effect at once.
- People use named accounts with a role and an API key (kept as a hash) that they trade for a short-lived
  operator token (audience ``fedhealth-operator``).
- An agent token never opens an operator endpoint and an operator token never acts as a site (403).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from fedhealth.core import Clock, CryptoError, FedHealthError, canonical_json
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
from fedhealth.orchestrator._store import SiteStatus, Store
from fedhealth.protocol import OPERATOR_ROLES, Role, agent_login_message


class Unauthenticated(FedHealthError):
    """401: no credentials, or credentials that do not prove who the caller is."""


class Forbidden(FedHealthError):
    """403: the caller is known but may not do this (revoked, wrong kind of token, wrong role)."""


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

    # --- enrollment --------------------------------------------------------------------------------------

    def enrollment_token(self, site: str) -> tuple[str, datetime]:
        token = new_secret("fhe")
        now = self.clock.now()
        expires = now + self.settings.enrollment_token_ttl
        self.store.add_enrollment_token(site, secret_hash(token), now, expires)
        return token, expires

    def enroll(self, *, site: str, token: str, public_key_hex: str) -> datetime:
        try:
            PublicIdentity(bytes.fromhex(public_key_hex))
        except (ValueError, CryptoError) as exc:
            raise Unauthenticated("the public key is not a valid Ed25519 key") from exc
        now = self.clock.now()
        if not self.store.enroll_site(
            site=site, token_hash=secret_hash(token), public_key=public_key_hex, when=now
        ):
            raise Unauthenticated("enrollment token is invalid, already used, or expired")
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
            subject=site, role=Role.SITE.value, audience=Audience.AGENT, ttl=self.settings.agent_token_ttl
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
            subject=user, role=row.role, audience=Audience.OPERATOR, ttl=self.settings.operator_token_ttl
        )

    def new_user(self, name: str, role: Role) -> str:
        if role is Role.SITE:
            raise FedHealthError("sites enroll; they are not users")
        api_key = new_secret("fhk")
        self.store.create_user(name, role.value, secret_hash(api_key), self.clock.now())
        return api_key

    # --- per request -------------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None, audience: Audience) -> Principal:
        """Check a bearer token for an endpoint of ``audience``; raise 401/403 errors otherwise."""
        if not authorization:
            raise Unauthenticated("missing credentials: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("credentials must be a bearer token")
        claims = None
        for candidate in (audience, *(a for a in Audience if a is not audience)):
            try:
                claims = self._verifier.verify(token.strip(), candidate)
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
        if audience is Audience.AGENT:
            if role is not Role.SITE:
                raise Forbidden("only sites may call the agent API")
            status = self.store.site_status(claims.subject)
            if status is SiteStatus.REVOKED:
                raise Forbidden("this site has been revoked")
            if status is not SiteStatus.ACTIVE:
                raise Unauthenticated("unknown site")
        else:
            if role not in OPERATOR_ROLES:
                raise Forbidden("only operators may call the operator API")
            user = self.store.get_user(claims.subject)
            if user is None:
                raise Unauthenticated("unknown user")
            if user.revoked_at is not None:
                raise Forbidden("this user has been revoked")
        return Principal(name=claims.subject, role=role, claims=claims)
