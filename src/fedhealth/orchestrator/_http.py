"""What every route shares: the service and the caller as FastAPI dependencies, the request body, and the
mapping of errors to answers.

Every error answer has the shape ``{"error": ..., "detail": ...}``. Malformed requests get 422 with a message,
oversized ones 413, unknown objects 404, state conflicts 409; a 500 means a bug. Handlers raise
:class:`ApiError` (or a :class:`~fedhealth.core.FedHealthError`, mapped below) and know nothing of HTTP
otherwise.
"""

from __future__ import annotations

import base64
import binascii
import errno
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fedhealth.core import ConflictError, FedHealthError, InputError, NotFoundError
from fedhealth.crypto import Audience
from fedhealth.orchestrator._auth import CertificateMismatch, Forbidden, Principal, Unauthenticated
from fedhealth.orchestrator._blobs import DamagedBlobError
from fedhealth.orchestrator._limits import PRINCIPAL, ceil_seconds, peer_certificate
from fedhealth.orchestrator._service import OrchestratorService
from fedhealth.protocol import ATTESTATION_HEADER, ProtocolMismatch, Role, SiteAttestation

SAFETENSORS = "application/octet-stream"
DISK_FULL_RETRY_S = 60  # Retry-After of a refusal for a full disk
DATABASE_RETRY_S = 5  # Retry-After when the database connection was lost
# The OpenAPI description of a route whose body is a safetensors file.
SAFETENSORS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}},
    }
}


class ApiError(Exception):
    """An answer other than success, with its status, one-line error and optional detail."""

    def __init__(
        self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


def _error(
    status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map handlers' errors to answers of the one error shape (module docstring)."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return _error(422, "malformed request", detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # a body cut off at its limit: close rather than receive the rest only to drop it
        headers = {"Connection": "close"} if exc.status_code == 413 else None
        return _error(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(Unauthenticated)
    async def _unauthenticated(_: Request, exc: Unauthenticated) -> JSONResponse:
        return _error(401, str(exc), headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Forbidden)
    async def _forbidden(_: Request, exc: Forbidden) -> JSONResponse:
        return _error(403, str(exc))

    @app.exception_handler(NotFoundError)
    async def _not_found(_: Request, exc: NotFoundError) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(ConflictError)
    async def _conflict(_: Request, exc: ConflictError) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(InputError)
    async def _input(_: Request, exc: InputError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(ProtocolMismatch)
    async def _protocol_mismatch(_: Request, exc: ProtocolMismatch) -> JSONResponse:
        return _error(426, str(exc))

    @app.exception_handler(DamagedBlobError)
    async def _damaged(_: Request, exc: DamagedBlobError) -> JSONResponse:
        # the server's stored bytes, not the request, are at fault
        return _error(500, str(exc))

    @app.exception_handler(FedHealthError)
    async def _fedhealth(_: Request, exc: FedHealthError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(OSError)
    async def _os_error(_: Request, exc: OSError) -> JSONResponse:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # nothing was stored: the client may send it again
            return _error(
                503,
                "the orchestrator's disk is full: nothing was stored; send it again later",
                headers={"Retry-After": str(DISK_FULL_RETRY_S)},
            )
        raise exc  # any other: the server's generic 500, as before

    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        # the database connection dropped (a restart, a failover, pg_terminate_backend) or the server is
        # unreachable: the pool replaces the connection, so the same request may well pass in a moment
        if exc.connection_invalidated or isinstance(exc, OperationalError):
            return _error(
                503,
                "the orchestrator lost its database connection; send the request again",
                headers={"Retry-After": str(DATABASE_RETRY_S)},
            )
        raise exc  # a constraint or a bug: the server's generic 500


# The dependencies below are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread
# pool, which costs two thread switches per request; what they do (a token check, one indexed query) is
# shorter than that.
async def services(request: Request) -> OrchestratorService:
    return request.app.state.services  # type: ignore[no-any-return]


Svc = Annotated[OrchestratorService, Depends(services)]


async def read_body(request: Request) -> bytes:
    """The whole body; its size limit is enforced by :class:`RequestGate`."""
    return b"".join([chunk async for chunk in body_stream(request)])


async def body_stream(request: Request) -> AsyncIterator[bytes]:
    """The body as it arrives, for handlers that store it as it comes."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect as exc:  # the sender died mid-upload: nothing was stored, it may retry
        raise ApiError(400, "the client disconnected before the body was complete") from exc


def attestation_header(request: Request) -> SiteAttestation | None:
    """The site's attestation riding along in the ``X-Fedhealth-Attestation`` header (base64 of its JSON)."""
    value = request.headers.get(ATTESTATION_HEADER)
    if value is None:
        return None
    try:
        return SiteAttestation.model_validate_json(base64.b64decode(value, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ApiError(422, f"invalid {ATTESTATION_HEADER} header", str(exc)[:500]) from exc


def _throttle(svc: OrchestratorService, key: str) -> None:
    wait = svc.limiter.retry_after(key)
    if wait is not None:
        raise ApiError(
            429, "too many requests", {"retry_after_s": round(wait, 3)}, {"Retry-After": ceil_seconds(wait)}
        )


def _principal(
    svc: OrchestratorService, request: Request, authorization: str | None, audience: Audience
) -> Principal:
    """The caller the gate authenticated (and rate-limited) before the body was read."""
    found = request.scope.get("state", {}).get(PRINCIPAL)
    if isinstance(found, Principal) and found.claims.audience is audience:
        return found
    # Not through the gate (an app mounted without it): authenticate here.
    principal = svc.auth.authenticate(authorization, audience, peer_certificate(request.scope))
    _throttle(svc, f"{'site' if audience is Audience.AGENT else 'user'}:{principal.name}")
    return principal


async def require_site(
    svc: Svc, request: Request, authorization: Annotated[str | None, Header()] = None
) -> str:
    """The agent API's caller: a site with a valid, unexpired agent token for its current key."""
    return _principal(svc, request, authorization, Audience.AGENT).name


Site = Annotated[str, Depends(require_site)]


async def site_recheck(
    svc: Svc, request: Request, authorization: Annotated[str | None, Header()] = None
) -> Callable[[], object]:
    """The agent API caller's credentials, to ask again: a long poll calls it whenever it is woken, so a
    site revoked or re-keyed while it waits is refused then (403 or 401), not when its wait ends."""
    certificate = peer_certificate(request.scope)
    return lambda: svc.auth.authenticate(authorization, Audience.AGENT, certificate)


Recheck = Annotated[Callable[[], object], Depends(site_recheck)]


def require_roles(*roles: Role) -> Callable[..., Coroutine[Any, Any, Principal]]:
    async def dependency(
        svc: Svc, request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Principal:
        principal = _principal(svc, request, authorization, Audience.OPERATOR)
        if principal.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise Forbidden(f"role {principal.role.value!r} may not do this (needs one of: {allowed})")
        return principal

    return dependency


Admin = Annotated[Principal, Depends(require_roles(Role.ADMIN))]
Researcher = Annotated[Principal, Depends(require_roles(Role.ADMIN, Role.RESEARCHER))]
Reader = Annotated[Principal, Depends(require_roles(Role.ADMIN, Role.RESEARCHER, Role.AUDITOR))]

# How long a submitted study may wait for its sites' approvals (query parameter of the submit routes).
ApprovalWait = Annotated[float | None, Query(gt=0, le=366 * 24 * 3600)]
# How long a long-poll may wait for its answer.
Wait = Annotated[float, Query(ge=0, le=60)]


def check_certificate_names(request: Request, name: str) -> None:
    """Under mutual TLS a login names the principal its client certificate was issued to."""
    certificate = peer_certificate(request.scope)
    if certificate is not None and certificate.name != name:
        raise CertificateMismatch("the client certificate does not belong to the principal logging in")
