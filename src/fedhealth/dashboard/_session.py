"""Who is using the dashboard: sign-in with an operator's existing credential, the session cookie, CSRF.

- Signing in trades the user's name and API key (the ones in their credential file, as ``fedhealth`` uses)
  for the orchestrator's ordinary short-lived operator token (:meth:`AuthService.operator_token`). The token
  is the session: it rides in a cookie that is ``HttpOnly`` (no script reads it), ``Secure`` (HTTPS only),
  ``SameSite=Strict`` and scoped to ``/ui``. Every request re-authenticates it with
  :meth:`AuthService.authenticate`, so a revoked user, a replaced API key or a changed role takes effect at
  the next click, exactly as on the REST API; when it expires the user signs in again. Under mutual TLS the
  client certificate must name the session's user, as it must name a bearer token's subject (403).
- Every state-changing form carries a CSRF token: an HMAC of the session token under a key derived from the
  orchestrator's signing key (deterministic Ed25519 signature, so every orchestrator process sharing the
  database derives the same key and a restart does not void open forms). The sign-in form, before any
  session exists, uses a double-submit cookie instead.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fedhealth.core import FedHealthError
from fedhealth.crypto import Audience, IdentityKey
from fedhealth.orchestrator import AuthService, CertificateMismatch, PeerCertificate
from fedhealth.protocol import Role

SESSION_COOKIE = "fedhealth_ui"
LOGIN_CSRF_COOKIE = "fedhealth_ui_login"
COOKIE_PATH = "/ui"
CSRF_FIELD = "csrf_token"
_CSRF_PURPOSE = b"fedhealth.dashboard.csrf-key.v1"


class Denied(FedHealthError):
    """The dashboard refuses a request: ``status`` 401 (sign in), 403 (not allowed) or 400 (bad form)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True, kw_only=True)
class UiUser:
    """The signed-in operator of one request."""

    name: str
    role: Role
    token: str
    csrf: str

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def may_see_study(self, owner: str) -> bool:
        """A researcher sees the details of own studies only; admins and auditors see every study."""
        return self.role is not Role.RESEARCHER or owner == self.name

    def may_cancel_study(self, owner: str) -> bool:
        return self.role is Role.ADMIN or (self.role is Role.RESEARCHER and owner == self.name)


@functools.lru_cache(maxsize=8)
def _csrf_key(signing_key: IdentityKey) -> bytes:
    return hashlib.sha256(signing_key.sign(_CSRF_PURPOSE)).digest()


def csrf_for(signing_key: IdentityKey, session_token: str) -> str:
    return hmac.new(_csrf_key(signing_key), session_token.encode(), hashlib.sha256).hexdigest()


def check_csrf(expected: str, given: str | None) -> None:
    if not given or not hmac.compare_digest(expected.encode(), given.encode()):
        raise Denied(403, "the form's CSRF token is missing or wrong: reload the page and try again")


def new_login_csrf() -> str:
    return secrets.token_urlsafe(32)


def current_user(
    auth: AuthService,
    signing_key: IdentityKey,
    session_token: str | None,
    certificate: PeerCertificate | None = None,
) -> UiUser:
    """The operator whose session token this is (checked now against the store, and under mutual TLS against
    the connection's client ``certificate``); raises :class:`Denied`."""
    if not session_token:
        raise Denied(401, "please sign in")
    try:
        principal = auth.authenticate(f"Bearer {session_token}", Audience.OPERATOR, certificate)
    except CertificateMismatch as exc:  # another principal's session (a copied cookie): signing in won't help
        raise Denied(403, str(exc)) from exc
    except FedHealthError as exc:  # expired, revoked, replaced key: sign in again
        raise Denied(401, f"please sign in again ({exc})") from exc
    return UiUser(
        name=principal.name,
        role=principal.role,
        token=session_token,
        csrf=csrf_for(signing_key, session_token),
    )
