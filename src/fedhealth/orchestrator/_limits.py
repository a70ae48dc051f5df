"""The gate in front of every request: who is calling, how fast, and how large a body it may send, all decided
from the request line and headers, before a byte of the body is read.

FastAPI reads and parses a JSON body before it resolves a route's dependencies, so a token check or a rate
limit done in a dependency comes after the body is in memory; an unauthenticated sender of large bodies
could then exhaust the orchestrator's memory. The gate therefore:

1. classifies the route: a plain JSON request (64 KiB), a document (a study spec, a withdrawal notice:
   4 MiB), or an upload (a site's update, secure-aggregation message or collective call: the
   ``--max-body-mb`` limit, and an update is streamed to disk); a declared ``Content-Length`` over the
   limit gets 413 at once, and a body without one is counted as it streams;
2. under mutual TLS, checks the connection's client certificate (a site's must be the one issued at its
   latest enrollment; a revoked site or user is refused);
3. authenticates the bearer token of an agent or operator route (401/403) and takes one token (a fiftieth
   for a collective call, see ``COLLECTIVE_CALL_COST``) from the
   caller's rate bucket (429); login and enrollment routes are limited per client address instead.

Only then does the route run (and read the body). The principal the gate authenticated rides in the request
scope, so the route's own dependency does not authenticate twice.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from starlette.exceptions import HTTPException
from starlette.routing import Match

from fedhealth.core import FedHealthError
from fedhealth.crypto import Audience, certificate_fingerprint
from fedhealth.orchestrator._auth import Forbidden, PeerCertificate, Unauthenticated

PRINCIPAL = "fedhealth.principal"  # key of the authenticated Principal in the request scope's state


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key: ``rate`` requests per second on average, bursts up to ``burst``.

    Keys include client addresses, so the table is pruned of idle (full) buckets when it grows past
    ``max_keys``: a sender of many addresses cannot grow it without bound.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_keys: int = 10_000,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def retry_after(self, key: str, cost: float = 1.0) -> float | None:
        """Take ``cost`` tokens (one by default) for ``key``; None if allowed, else the seconds until they
        are available."""
        if self.rate <= 0:
            return None
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), updated=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return None
        return (cost - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate  # a bucket idle this long is full again: forgetting it is free
        for key in [k for k, b in self._buckets.items() if now - b.updated >= full_after]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class BodyClass(StrEnum):
    JSON = "json"  # every request not named below: small JSON messages
    DOCUMENT = "document"  # a study spec (up to 10,000 sites) or a withdrawal notice (10,000 hashes)
    UPLOAD = "upload"  # a site's update or secure-aggregation message (binary)


@dataclass(frozen=True, slots=True, kw_only=True)
class BodyLimits:
    json_bytes: int = 64 << 10
    document_bytes: int = 4 << 20
    upload_bytes: int = 512 << 20

    def of(self, body: BodyClass) -> int:
        if body is BodyClass.UPLOAD:
            return self.upload_bytes
        if body is BodyClass.DOCUMENT:
            return self.document_bytes
        return self.json_bytes


# updates, secure-aggregation stage messages, collective calls, and the bandwidth probe of `fedhealth site
# check` (up to 32 MB)
_UPLOADS = re.compile(r"^/api/v1/agent/(tasks/[^/]+/(result|secagg/[^/]+|collective/[0-9]+)|probe)\Z")
_COLLECTIVE = re.compile(r"^/api/v1/agent/tasks/[^/]+/collective/[0-9]+\Z")
# A collective call takes this fraction of a rate token: a session makes hundreds of calls a second by
# design, and paces itself (no site can send call i + 1 before every site sent call i), while the bucket
# still bounds a site that loops on one call.
COLLECTIVE_CALL_COST = 0.02
_DOCUMENTS = frozenset(
    {
        "/api/v1/studies",
        "/api/v1/governance/studies",
        "/api/v1/agent/governance/withdrawals",
        "/api/v1/privacy/plan",
    }
)


def body_class(method: str, path: str) -> BodyClass:
    if method == "POST" and _UPLOADS.match(path):
        return BodyClass.UPLOAD
    if method in ("POST", "PUT") and path in _DOCUMENTS:
        return BodyClass.DOCUMENT
    return BodyClass.JSON


class Access(StrEnum):
    PUBLIC = "public"  # health and the API description: no credentials
    LOGIN = "login"  # enrollment and login: no token yet, limited per client address
    AGENT = "agent"  # a site's agent token
    OPERATOR = "operator"  # a user's operator token


LOGIN_PATHS = frozenset(
    {"/api/v1/enroll", "/api/v1/agent/challenge", "/api/v1/agent/token", "/api/v1/auth/token"}
)


def access_of(path: str) -> Access:
    if path in LOGIN_PATHS:
        return Access.LOGIN
    if path.startswith("/api/v1/agent/"):
        return Access.AGENT
    if path.startswith("/api/"):
        return Access.OPERATOR
    return Access.PUBLIC


@functools.lru_cache(maxsize=1024)
def _parse_certificate(pem: str) -> PeerCertificate | None:
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return None
    if not names:
        return None
    return PeerCertificate(name=str(names[0].value), fingerprint=certificate_fingerprint(pem.encode()))


def peer_certificate(scope: Mapping[str, Any]) -> PeerCertificate | None:
    """The client certificate of the request's connection, from the ASGI TLS extension (``_serve`` adds it
    under mutual TLS), or None."""
    tls = scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or ()
    return _parse_certificate(chain[0]) if chain else None


def ceil_seconds(value: float) -> str:
    return str(max(1, math.ceil(value)))


def _has_body(scope: dict[str, Any]) -> bool:
    for name, value in scope.get("headers", ()):
        if (name == b"content-length" and value not in (b"0", b"")) or name == b"transfer-encoding":
            return True
    return False


async def _answer(
    scope: dict[str, Any],
    send: Callable[..., Any],
    status: int,
    error: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if _has_body(scope):  # a body we will not read: close rather than receive it only to drop it
        raw_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class RequestGate:
    """Body size, client certificate, credentials and rate: checked before the body is read (module doc)."""

    def __init__(
        self,
        app: Any,
        *,
        limits: BodyLimits,
        require_client_cert: bool = False,
        enroll_port: int | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.require_client_cert = require_client_cert
        self.enroll_port = enroll_port

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        services = getattr(scope["app"].state, "services", None)
        if services is not None and services.stopped:  # another orchestrator holds the database now
            # the reason (which names the other's database session) stays in this orchestrator's log
            await _answer(
                scope, send, 503, "this orchestrator has stopped: another orchestrator took its database"
            )
            return
        path, method = scope["path"], scope["method"]
        limit = self.limits.of(body_class(method, path))
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _answer(
                    scope, send, 413, f"request body of {int(value)} bytes exceeds the limit of {limit} bytes"
                )
                return
        try:
            self._admit(scope, path)
        except Unauthenticated as exc:
            await _answer(scope, send, 401, str(exc), headers={"WWW-Authenticate": "Bearer"})
            return
        except Forbidden as exc:
            await _answer(scope, send, 403, str(exc))
            return
        except _Throttled as exc:
            wait = round(exc.wait, 3)
            await _answer(
                scope,
                send,
                429,
                "too many requests",
                {"retry_after_s": wait},
                {"Retry-After": ceil_seconds(wait)},
            )
            return
        except FedHealthError as exc:  # e.g. the database is unreachable: not the caller's fault
            await _answer(scope, send, 503, "the service cannot check credentials now", str(exc)[:500])
            return
        if "\x00" in path:  # no id holds one, and PostgreSQL refuses it in any text it is compared with
            await _answer(scope, send, 404, "not found: the path holds a NUL character")
            return
        received = 0

        async def limited_receive() -> Any:
            # Raised inside the route, where the app's exception handlers turn it into a 413 answer.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)

    def _admit(self, scope: dict[str, Any], path: str) -> None:
        svc = scope["app"].state.services
        certificate = peer_certificate(scope)
        on_enroll_port = (
            self.enroll_port is not None and (scope.get("server") or (None, None))[1] == self.enroll_port
        )
        if self.require_client_cert and certificate is None and not on_enroll_port:
            raise Forbidden("a client certificate from the federation CA is required")
        access = access_of(path)
        # First, on every route: a revoked or retired certificate opens nothing. On the agent API the token's
        # check below reads the same site row (status and the certificate of its latest enrollment) and holds
        # the certificate to it, so a second read is spared on the hot path and made only where the token
        # fails, for the certificate's refusal to come first as on every other route.
        if certificate is not None and access is not Access.AGENT:
            svc.auth.check_certificate(certificate)
        if access in (Access.PUBLIC, Access.LOGIN):
            if access is Access.LOGIN:
                client = scope.get("client")
                _throttle(svc.limiter, f"ip:{client[0] if client else '?'}")
            return
        audience = Audience.AGENT if access is Access.AGENT else Audience.OPERATOR
        authorization = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            principal = svc.auth.authenticate(authorization, audience, certificate)
        except (Unauthenticated, Forbidden):
            if certificate is not None and access is Access.AGENT:
                svc.auth.check_certificate(certificate)
            if not _routed(scope):
                return  # no such route: the router answers 404/405 (it reads no body)
            raise
        cost = COLLECTIVE_CALL_COST if _COLLECTIVE.match(path) else 1.0
        _throttle(svc.limiter, f"{'site' if access is Access.AGENT else 'user'}:{principal.name}", cost)
        scope.setdefault("state", {})[PRINCIPAL] = principal


def _routed(scope: dict[str, Any]) -> bool:
    """Whether a route of the app matches the path with this method."""
    return any(route.matches(scope)[0] is Match.FULL for route in scope["app"].router.routes)


class _Throttled(Exception):
    def __init__(self, wait: float) -> None:
        super().__init__("too many requests")
        self.wait = wait


def _throttle(limiter: RateLimiter, key: str, cost: float = 1.0) -> None:
    wait = limiter.retry_after(key, cost)
    if wait is not None:
        raise _Throttled(wait)


class EnrollmentPortMiddleware:
    """On the enrollment listener (no client certificates under mutual TLS), serve enrollment and health only:
    a site without a certificate yet can enroll there, and nothing else is reachable without one."""

    ALLOWED = ("/api/v1/enroll", "/healthz")

    def __init__(self, app: Any, port: int) -> None:
        self.app = app
        self.port = port

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        server = scope.get("server")
        if (
            scope["type"] == "http"
            and server is not None
            and server[1] == self.port
            and scope["path"] not in self.ALLOWED
        ):
            await _answer(scope, send, 403, "only enrollment is served on this port")
            return
        await self.app(scope, receive, send)
