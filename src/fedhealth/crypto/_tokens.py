"""Short-lived access tokens: JWTs signed with the orchestrator's Ed25519 key (EdDSA), via PyJWT.

A token names its subject (a site or a user), its role, its audience (the agent API or the operator API),
when it was issued and when it expires (minutes, not days). It may also name the credential it was issued
against (RFC 7800 ``cnf``: a thumbprint of the site's key or the user's API key), so that replacing that
credential invalidates the tokens issued against the old one at once, not when they expire. Verification
checks the signature, the issuer, the audience and the validity period (``iat``, ``nbf``, ``exp``, all
against the verifier's clock with its leeway: PyJWT's own time checks use the host's wall clock and no
leeway, so they are off); every failure raises :class:`CryptoError`, an expired token
:class:`TokenExpiredError` so a client can tell it to renew.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import jwt

from fedhealth.core import Clock, CryptoError, SystemClock
from fedhealth.crypto._recipes import IdentityKey, PublicIdentity

ALGORITHM = "EdDSA"


class Audience(StrEnum):
    AGENT = "fedhealth-agent"
    OPERATOR = "fedhealth-operator"


class TokenExpiredError(CryptoError):
    """The token was valid once but has expired: get a new one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenClaims:
    subject: str
    role: str
    audience: Audience
    issued_at: datetime
    expires_at: datetime
    token_id: str
    confirmation: str | None = None  # ``cnf.jkt``: thumbprint of the credential the token was issued against


class TokenIssuer:
    def __init__(self, key: IdentityKey, issuer: str, clock: Clock | None = None) -> None:
        self._key = key
        self.issuer = issuer
        self._clock = clock or SystemClock()

    def issue(
        self,
        *,
        subject: str,
        role: str,
        audience: Audience,
        ttl: timedelta,
        confirmation: str | None = None,
    ) -> tuple[str, TokenClaims]:
        now = self._clock.now().replace(microsecond=0)
        claims = TokenClaims(
            subject=subject,
            role=role,
            audience=audience,
            issued_at=now,
            expires_at=now + ttl,
            token_id=secrets.token_hex(12),
            confirmation=confirmation,
        )
        payload: dict[str, object] = {
            "iss": self.issuer,
            "sub": subject,
            "role": role,
            "aud": audience.value,
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int(claims.expires_at.timestamp()),
            "jti": claims.token_id,
        }
        if confirmation is not None:
            payload["cnf"] = {"jkt": confirmation}
        return jwt.encode(payload, self._key.crypto_key(), algorithm=ALGORITHM), claims


class TokenVerifier:
    def __init__(
        self, public: PublicIdentity, issuer: str, clock: Clock | None = None, leeway_s: float = 5.0
    ) -> None:
        self._public = public
        self.issuer = issuer
        self._clock = clock or SystemClock()
        self._leeway = leeway_s

    def _check_times(self, expires: float, not_before: float) -> None:
        now = self._clock.now().timestamp()
        if not all(_is_time(t) for t in (expires, not_before)):
            raise CryptoError("invalid token")
        if expires + self._leeway < now:
            raise TokenExpiredError("token expired")
        if not_before - self._leeway > now:
            raise CryptoError("token not yet valid")

    def check_times(self, claims: TokenClaims) -> None:
        """Re-check a verified token's validity period now (for a caller that keeps verified claims):
        :class:`TokenExpiredError` once expired, :class:`CryptoError` before its start."""
        self._check_times(claims.expires_at.timestamp(), claims.issued_at.timestamp())

    def verify(self, token: str, audience: Audience) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != ALGORITHM:
                raise CryptoError("invalid token")
            payload = jwt.decode(
                token,
                self._public.crypto_key(),
                algorithms=[ALGORITHM],
                audience=audience.value,
                issuer=self.issuer,
                options={
                    "require": ["exp", "iat", "sub", "aud", "iss", "jti"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise CryptoError("invalid token") from exc
        # The validity period is checked against the injectable clock, not the process's wall clock: a token
        # issued by another orchestrator process whose clock runs a little ahead is within the leeway. A token
        # starts at the later of iat and nbf.
        times = (payload["exp"], payload["iat"], payload.get("nbf", payload["iat"]))
        if not all(_is_time(t) for t in times):
            raise CryptoError("invalid token")
        self._check_times(payload["exp"], max(payload["iat"], payload.get("nbf", payload["iat"])))
        if not isinstance(payload.get("role"), str):
            raise CryptoError("invalid token")
        confirmation = payload.get("cnf", {})
        if not isinstance(confirmation, dict) or not isinstance(confirmation.get("jkt", ""), str):
            raise CryptoError("invalid token")
        return TokenClaims(
            subject=payload["sub"],
            role=payload["role"],
            audience=audience,
            issued_at=datetime.fromtimestamp(payload["iat"], UTC),
            expires_at=datetime.fromtimestamp(payload["exp"], UTC),
            token_id=payload["jti"],
            confirmation=confirmation.get("jkt"),
        )


# Seconds since the epoch a datetime can hold (year 9999): a time claim beyond it is no time at all.
_LATEST_TIME = 253402300799


def _is_time(value: object) -> bool:
    """Whether a time claim is a NumericDate (RFC 7519): a number, not a bool or a string, in range."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= _LATEST_TIME
