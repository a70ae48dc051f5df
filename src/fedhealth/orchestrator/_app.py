"""The orchestrator's HTTP surface: agent API, operator API, health. Handlers are thin; the work is in the
store, the blob store and the round engine.

Every error answer has the shape ``{"error": ..., "detail": ...}``. Malformed requests get 422 with a message,
oversized ones 413, unknown objects 404, state conflicts 409; a 500 means a bug.

Credentials, rate and body size are checked by :class:`RequestGate` before a route reads its body. Security
actions (sites created, tokens issued, rotations, revocations, users and their keys, cancelled studies) are
entries in the orchestrator's signed audit log, written in the same transaction as the change they record.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Protocol

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import Connection
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import fedhealth
from fedhealth.core import (
    Clock,
    ConflictError,
    CryptoError,
    FedHealthError,
    InputError,
    NotFoundError,
    SystemClock,
    TensorError,
    sha256_hex,
)
from fedhealth.crypto import Audience, IdentityKey, PemPair, certificate_fingerprint, sign_client_csr
from fedhealth.governance import AuditEventType, AuditLog
from fedhealth.orchestrator._auth import (
    AuthService,
    AuthSettings,
    Forbidden,
    IssuedToken,
    Principal,
    Unauthenticated,
)
from fedhealth.orchestrator._blobs import BlobKind, BlobStore, check_digest
from fedhealth.orchestrator._collective import collective_router
from fedhealth.orchestrator._db import make_engine, sqlite_url, upgrade_database
from fedhealth.orchestrator._engine import DEFAULT_APPROVAL_WAIT_S, RoundEngine
from fedhealth.orchestrator._hooks import StudyObserver
from fedhealth.orchestrator._limits import (
    PRINCIPAL,
    BodyLimits,
    EnrollmentPortMiddleware,
    RateLimiter,
    RequestGate,
    ceil_seconds,
    peer_certificate,
)
from fedhealth.orchestrator._notify import TaskNotifier
from fedhealth.orchestrator._report import build_report, study_info
from fedhealth.orchestrator._secure import SecureRoundDriver, SecureRoundGone
from fedhealth.orchestrator._store import (
    ModelVersion,
    RoundRow,
    SiteRow,
    Store,
    StudyRow,
    TaskRow,
)
from fedhealth.orchestrator._versions import VersionHeadersMiddleware, check_client, record_agent
from fedhealth.protocol import (
    ATTESTATION_HEADER,
    Ack,
    AgentTokenRequest,
    ChallengeRequest,
    ChallengeResponse,
    EnrollRequest,
    EnrollResponse,
    OperatorTokenRequest,
    ProtocolMismatch,
    ResultManifest,
    Role,
    SiteAttestation,
    SiteCreate,
    SiteCreated,
    SiteInfo,
    StudyInfo,
    StudySpec,
    StudyStatus,
    Task,
    TaskFailure,
    TaskKind,
    TaskPoll,
    TaskStatus,
    TokenResponse,
    UserCreate,
    UserCreated,
    UserInfo,
)
from fedhealth.runtime import decode_update, param_specs
from fedhealth.secagg import Stage

log = logging.getLogger("fedhealth.orchestrator")
SAFETENSORS = "application/octet-stream"
# Models up to this size travel inside their task (base64 in the JSON); larger ones are downloaded.
INLINE_MODEL_MAX_BYTES = 64 << 10
# An update holds the model's tensors plus a header and the result manifest; this bounds the latter two.
UPDATE_OVERHEAD_BYTES = 1 << 20
# The audit log's actor name for the orchestrator (the governance observer writes under the same name).
AUDIT_ACTOR = "orchestrator"


@dataclass(kw_only=True)
class OrchestratorSettings:
    state_dir: Path
    signing_key: IdentityKey
    ca: PemPair | None = None  # to sign sites' TLS client certificates at enrollment (mutual TLS)
    enroll_port: int | None = None  # a listener without client certificates that serves enrollment only
    database_url: str | None = None
    fsync: bool = False
    max_body_bytes: int = 512 << 20  # uploads (a site's update or secure-aggregation message)
    json_body_bytes: int = 64 << 10  # every other request, except documents
    document_body_bytes: int = 4 << 20  # study specs and withdrawal notices
    require_client_cert: bool = False  # mutual TLS on the main port (set by ``serve``)
    max_wait_s: float = 60.0
    rate_per_s: float = 200.0  # per site or user; 0 disables
    rate_burst: int = 400
    approval_wait_s: float = DEFAULT_APPROVAL_WAIT_S  # a study's wait for its sites' approvals, by default
    auth: AuthSettings = field(default_factory=AuthSettings)
    clock: Clock = field(default_factory=SystemClock)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or sqlite_url(self.state_dir / "orchestrator.sqlite")


class Extension(Protocol):
    """A feature of the orchestrator (governance, privacy views...): an observer of studies and/or routes."""

    def observer(
        self, store: Store, blobs: BlobStore, settings: OrchestratorSettings
    ) -> StudyObserver | None: ...

    def routers(self) -> list[APIRouter]: ...


class ApiError(Exception):
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


@dataclass
class Services:
    settings: OrchestratorSettings
    store: Store
    blobs: BlobStore
    engine: RoundEngine
    notifier: TaskNotifier
    auth: AuthService
    limiter: RateLimiter
    audit: AuditLog  # the orchestrator's signed audit log (the one the governance extension writes too)
    last_seen: dict[str, datetime] = field(default_factory=dict)


# The dependencies below are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread
# pool, which costs two thread switches per request; what they do (a token check, one indexed query) is
# shorter than that.
async def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


Svc = Annotated[Services, Depends(services)]


async def read_body(request: Request) -> bytes:
    """The whole body; its size limit is enforced by :class:`RequestGate`."""
    try:
        chunks = [chunk async for chunk in request.stream()]
    except ClientDisconnect as exc:  # the sender died mid-upload: nothing was stored, it may retry
        raise ApiError(400, "the client disconnected before the body was complete") from exc
    return b"".join(chunks)


def _throttle(svc: Services, key: str) -> None:
    wait = svc.limiter.retry_after(key)
    if wait is not None:
        raise ApiError(
            429, "too many requests", {"retry_after_s": round(wait, 3)}, {"Retry-After": ceil_seconds(wait)}
        )


def _principal(svc: Services, request: Request, authorization: str | None, audience: Audience) -> Principal:
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


def _check_certificate_names(request: Request, name: str) -> None:
    """Under mutual TLS a login names the principal its client certificate was issued to."""
    certificate = peer_certificate(request.scope)
    if certificate is not None and certificate.name != name:
        raise Forbidden("the client certificate does not belong to the principal logging in")


def create_app(
    settings: OrchestratorSettings,
    on_ready: Callable[[], None] | None = None,
    *,
    extensions: Sequence[Extension] = (),
) -> FastAPI:
    """The orchestrator's ASGI app. Each :class:`Extension` adds a study observer (built in the lifespan,
    once the store exists) and/or routes."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        db = make_engine(settings.resolved_database_url, fsync=settings.fsync)
        await anyio.to_thread.run_sync(upgrade_database, db)
        store = Store(db)
        blobs = BlobStore(settings.state_dir / "blobs", fsync=settings.fsync)
        notifier = TaskNotifier()
        observers = [ext.observer(store, blobs, settings) for ext in extensions]
        engine = RoundEngine(
            store,
            blobs,
            settings.clock,
            notifier,
            reports_dir=settings.state_dir / "reports",
            observers=[o for o in observers if o is not None],
            approval_wait_s=settings.approval_wait_s,
        )
        app.state.services = Services(
            settings=settings,
            store=store,
            blobs=blobs,
            engine=engine,
            notifier=notifier,
            auth=AuthService(store, settings.signing_key, settings.clock, settings.auth),
            limiter=RateLimiter(settings.rate_per_s, settings.rate_burst),
            audit=AuditLog(db, settings.signing_key, AUDIT_ACTOR, settings.clock),
        )
        await engine.recover()
        app.state.shutdown = notifier.shutdown
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await engine.close()
            db.dispose()

    app = FastAPI(
        title="fedhealth orchestrator",
        version=fedhealth.__version__,
        lifespan=lifespan,
        responses={
            404: {"description": "Not found"},
            409: {"description": "Conflict with the current state"},
            413: {"description": "Request body too large"},
            422: {"description": "Malformed request"},
        },
    )

    app.add_middleware(
        RequestGate,
        limits=BodyLimits(
            json_bytes=settings.json_body_bytes,
            document_bytes=settings.document_body_bytes,
            upload_bytes=settings.max_body_bytes,
        ),
        require_client_cert=settings.require_client_cert,
        enroll_port=settings.enroll_port,
    )
    app.add_middleware(VersionHeadersMiddleware)  # every answer states the protocol and release
    for ext in extensions:  # an extension may wrap every request (e.g. the metrics' request timer)
        getattr(ext, "install_middleware", lambda _app: None)(app)
    if settings.enroll_port is not None:
        app.add_middleware(EnrollmentPortMiddleware, port=settings.enroll_port)
    for ext in extensions:
        for router in ext.routers():
            app.include_router(router)
    app.include_router(collective_router())
    from fedhealth.orchestrator._routes_sites import sites_router  # imports this module's dependencies

    app.include_router(sites_router())  # study approvals, site readiness and probes, versions

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

    @app.exception_handler(FedHealthError)
    async def _fedhealth(_: Request, exc: FedHealthError) -> JSONResponse:
        return _error(400, str(exc))

    # --- health ------------------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": fedhealth.__version__}

    # --- enrollment and login ----------------------------------------------------------------------------

    @app.post("/api/v1/enroll", response_model=EnrollResponse, tags=["enrollment"])
    async def enroll(svc: Svc, body: EnrollRequest) -> EnrollResponse:
        """A site registers its Ed25519 public key with its one-time enrollment token.

        401: the token is unknown, superseded by a newer one, spent or expired. 409: the token is valid but
        the site is enrolled already (an enrolled site gets a new key only by an admin's rotation).
        """
        certificate = None
        if body.tls_csr is not None and svc.settings.ca is not None:
            # checked before the token is spent, so a bad request does not burn the site's token
            try:
                certificate = sign_client_csr(svc.settings.ca, body.tls_csr.encode(), common_name=body.site)
            except CryptoError as exc:
                raise ApiError(422, "invalid certificate signing request", str(exc)) from exc
        fingerprint = certificate_fingerprint(certificate) if certificate is not None else None
        with svc.audit.transaction() as c:
            when = svc.auth.enroll(
                site=body.site,
                token=body.token,
                public_key_hex=body.public_key,
                cert_fingerprint=fingerprint,
                connection=c,
            )
            svc.audit.append(
                AuditEventType.ENROLLMENT,
                {
                    "site": body.site,
                    "public_key": body.public_key,
                    "enrolled_at": when.isoformat(),
                    "certificate_fingerprint": fingerprint,
                },
                actor=f"site:{body.site}",
                connection=c,
            )
        log.info("site %s enrolled (key %s…)", body.site, body.public_key[:16])
        return EnrollResponse(
            site=body.site, enrolled_at=when, tls_certificate=certificate.decode() if certificate else None
        )

    @app.post("/api/v1/agent/challenge", response_model=ChallengeResponse, tags=["enrollment"])
    async def agent_challenge(svc: Svc, request: Request, body: ChallengeRequest) -> ChallengeResponse:
        _check_certificate_names(request, body.site)
        check_client(request.headers, client_name="agent", where="at this site")
        challenge, expires = svc.auth.challenge(body.site)
        return ChallengeResponse(challenge=challenge, expires_at=expires)

    @app.post("/api/v1/agent/token", response_model=TokenResponse, tags=["enrollment"])
    async def agent_token(svc: Svc, request: Request, body: AgentTokenRequest) -> TokenResponse:
        """Trade a signature over a fresh challenge for a short-lived agent token."""
        _check_certificate_names(request, body.site)
        peer = check_client(request.headers, client_name="agent", where="at this site")
        token, claims = svc.auth.agent_token(
            site=body.site, challenge=body.challenge, signature_hex=body.signature
        )
        record_agent(svc.store, body.site, peer)
        return TokenResponse(access_token=token, expires_at=claims.expires_at, role=Role.SITE)

    @app.post("/api/v1/auth/token", response_model=TokenResponse, tags=["operator"])
    async def operator_token(svc: Svc, request: Request, body: OperatorTokenRequest) -> TokenResponse:
        """Trade a user's API key for a short-lived operator token."""
        _check_certificate_names(request, body.user)
        check_client(request.headers, client_name="command", where="here")
        token, claims = svc.auth.operator_token(user=body.user, api_key=body.api_key)
        return TokenResponse(access_token=token, expires_at=claims.expires_at, role=Role(claims.role))

    # --- agent API ---------------------------------------------------------------------------------------

    def _task_message(svc: Services, task: TaskRow, r: RoundRow) -> Task:
        spec = svc.store.spec(task.study_id)
        small = svc.blobs.get_if_small(r.model_in_digest, INLINE_MODEL_MAX_BYTES)
        return Task(
            task_id=task.id,
            study_id=task.study_id,
            round=r.number,
            kind=task.kind,
            dataset=spec.dataset,
            recipe=spec.recipe,
            model_digest=r.model_in_digest,
            # a small model travels with its task: one request less per site and round
            model_inline=base64.b64encode(small).decode("ascii") if small is not None else None,
            seed=spec.seed,
            deadline=r.deadline_at,
            spec=spec,
            secure_round=driver.info() if (driver := svc.engine.secure.get(r.id)) is not None else None,
            collective=session.info() if (session := svc.engine.collective.get(r.id)) is not None else None,
        )

    @app.get("/api/v1/agent/tasks/next", response_model=TaskPoll, tags=["agent"])
    async def next_task(svc: Svc, site: Site, wait: Annotated[float, Query(ge=0, le=60)] = 25.0) -> TaskPoll:
        """Long-poll: answers as soon as a task for this site exists, or after ``wait`` seconds with none."""
        now = svc.settings.clock.now()
        seen = svc.last_seen.get(site)
        if seen is None or now - seen > timedelta(seconds=5):
            svc.store.touch_site(site, now)
            svc.last_seen[site] = now
        loop = asyncio.get_running_loop()
        give_up = loop.time() + min(wait, svc.settings.max_wait_s)
        while True:
            waiter = svc.notifier.waiter(site)
            found = svc.store.next_task(site, skip=svc.engine.not_joinable)
            if found is not None:
                waiter.cancel()
                task, round_row = found
                if task.status is TaskStatus.PENDING:
                    svc.store.mark_delivered(task.id, svc.settings.clock.now())
                message = _task_message(svc, task, round_row)
                for observer in svc.engine.observers:
                    message = observer.decorate_task(message)
                return TaskPoll(task=message)
            remaining = give_up - loop.time()
            if remaining <= 0 or svc.notifier.shutting_down:
                waiter.cancel()
                return TaskPoll(task=None)
            await asyncio.wait({waiter}, timeout=remaining)
            waiter.cancel()

    @app.get("/api/v1/agent/models/{digest}", tags=["agent"], response_class=Response)
    async def get_model(svc: Svc, site: Site, digest: str) -> Response:
        """The input model of one of this site's open tasks. Any other digest (another site's upload, the
        model of a task this site was not given, nothing at all) gets the same 404."""
        check_digest(digest)
        if not svc.store.site_may_read_model(site, digest):
            raise ApiError(404, "no model with this digest belongs to a task of this site")
        return Response(svc.blobs.get(digest), media_type=SAFETENSORS)

    def _own_task(svc: Services, site: str, task_id: str, kind: TaskKind) -> TaskRow:
        task = svc.store.get_task(task_id)
        if task.site != site:
            raise ApiError(403, "this task belongs to another site")
        if task.kind is not kind:
            raise ApiError(409, f"task {task_id} is a {task.kind.value} task")
        return task

    async def _reject(svc: Services, task: TaskRow, message: str) -> ApiError:
        svc.store.close_task(task.id, TaskStatus.REJECTED, message, svc.settings.clock.now())
        log.warning("rejected the result of %s from %s: %s", task.id, task.site, message)
        await svc.engine.task_closed(task.round_id, task.id)
        return ApiError(422, "invalid update", message)

    @app.post(
        "/api/v1/agent/tasks/{task_id}/result",
        response_model=Ack,
        tags=["agent"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload_result(svc: Svc, site: Site, task_id: str, request: Request) -> Ack:
        """Upload a training result: the update as a safetensors file, the result manifest in its metadata.

        A retried upload of the same bytes is acknowledged once stored; different bytes for a finished task
        get 409. An invalid update (malformed, wrong names/shapes/dtypes, NaN/Inf) closes the task as rejected
        and gets 422; the round goes on with the other sites.
        """
        task = _own_task(svc, site, task_id, TaskKind.TRAIN)
        if not task.is_open and task.status is not TaskStatus.COMPLETED:
            raise ApiError(409, f"task is {task.status.value}: {task.reason}")
        spec = svc.store.spec(task.study_id)
        specs = param_specs(spec.recipe)
        # no update of this model can be larger: anything beyond is refused before it is stored
        limit = sum(s.numel * np.dtype(s.dtype).itemsize for s in specs) + UPDATE_OVERHEAD_BYTES
        writer = svc.blobs.writer(BlobKind.UPDATE)  # streamed to disk, not held in memory while it arrives
        try:
            try:
                async for chunk in request.stream():
                    if writer.size + len(chunk) > limit:
                        raise ApiError(
                            413,
                            f"an update of this study's model is at most {limit} bytes",
                            None,
                            {"Connection": "close"},
                        )
                    writer.write(chunk)
            except ClientDisconnect as exc:  # the sender died mid-upload: nothing was stored, it may retry
                raise ApiError(400, "the client disconnected before the body was complete") from exc
            digest = writer.digest
            task = svc.store.get_task(task_id)
            if task.status is TaskStatus.COMPLETED:
                if task.result_digest == digest:
                    return Ack(detail="already stored")
                raise ApiError(409, "a different result was already stored for this task")
            if not task.is_open:
                raise ApiError(409, f"task is {task.status.value}: {task.reason}")
            body = await anyio.to_thread.run_sync(writer.read)
            try:
                _, manifest = await anyio.to_thread.run_sync(decode_update, body, specs)
            except TensorError as exc:
                raise await _reject(svc, task, str(exc)) from exc
            except ValidationError as exc:
                raise await _reject(
                    svc, task, f"malformed result manifest: {exc.errors()[0]['msg']}"
                ) from exc
            del body
            if manifest.task_id != task_id:
                raise await _reject(svc, task, "the result manifest names another task")
            if manifest.metrics is None:
                raise await _reject(svc, task, "the result manifest lacks the site's metrics")
            await anyio.to_thread.run_sync(writer.commit)
        finally:
            writer.discard()  # a no-op once committed
        stored = svc.store.complete_task(
            task_id,
            digest=digest,
            num_samples=manifest.metrics.num_samples,
            metrics=manifest.metrics,
            when=svc.settings.clock.now(),
            attestation=manifest.attestation,
        )
        if not stored:
            again = svc.store.get_task(task_id)
            if again.status is TaskStatus.COMPLETED and again.result_digest == digest:
                return Ack(detail="already stored")
            raise ApiError(409, f"task is {again.status.value}: {again.reason}")
        await svc.engine.task_closed(task.round_id, task.id)
        return Ack()

    @app.post("/api/v1/agent/tasks/{task_id}/evaluation", response_model=Ack, tags=["agent"])
    async def upload_evaluation(svc: Svc, site: Site, task_id: str, body: ResultManifest) -> Ack:
        task = _own_task(svc, site, task_id, TaskKind.EVALUATE)
        if body.task_id != task_id:
            raise ApiError(422, "the result manifest names another task")
        if body.metrics is None:
            raise ApiError(422, "an evaluation result needs metrics")
        if task.status is TaskStatus.COMPLETED:
            if task.metrics == body.metrics:
                return Ack(detail="already stored")
            raise ApiError(409, "a different result was already stored for this task")
        if not task.is_open:
            raise ApiError(409, f"task is {task.status.value}: {task.reason}")
        svc.store.complete_task(
            task_id,
            digest=None,
            num_samples=0,
            metrics=body.metrics,
            when=svc.settings.clock.now(),
            attestation=body.attestation,
        )
        await svc.engine.task_closed(task.round_id, task.id)
        return Ack()

    def _secure_task(svc: Services, site: str, task_id: str) -> tuple[TaskRow, SecureRoundDriver]:
        task = svc.store.get_task(task_id)
        if task.site != site:
            raise ApiError(403, "this task belongs to another site")
        driver = svc.engine.secure.get(task.round_id)
        if driver is None or not task.is_open:
            raise ApiError(410, "no secure round is running for this task")
        return task, driver

    @app.post(
        "/api/v1/agent/tasks/{task_id}/secagg/{stage}",
        response_model=Ack,
        tags=["agent"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def secagg_send(
        svc: Svc,
        site: Site,
        task_id: str,
        stage: str,
        request: Request,
        wait: Annotated[float, Query(ge=0, le=60)] = 0.0,
    ) -> Ack | Response:
        """Send this site's SecAgg+ message for ``stage`` (advertise_keys, share_keys, masked_input,
        consistency, unmask).

        The site's attestation for the task rides along in the ``X-Fedhealth-Attestation`` header (base64
        of its JSON); it is stored with the task when the round closes. With ``wait`` > 0 (not for unmask)
        the answer is the server's message to this site after the stage closes, as ``GET`` of the same path
        would give it (204: not within ``wait`` seconds; the message sent is kept): one request per stage
        instead of two. 410 means this site has no further part in the round (it was counted out, or the
        round ended).
        """
        body = await read_body(request)
        attestation = _attestation_header(request)
        _, driver = _secure_task(svc, site, task_id)
        try:
            driver.receive(site, stage, body)
            if attestation is not None:
                driver.attestations[site] = attestation  # stored with the task when the round closes
            log.info("task %s: %s message received from %s", task_id, stage, site)
            if wait <= 0 or stage == Stage.UNMASK.value:
                return Ack()
            data = await driver.next_message(site, stage, min(wait, svc.settings.max_wait_s))
        except SecureRoundGone as exc:
            raise ApiError(410, "no longer part of this secure round", str(exc)) from exc
        if data is None:
            return Response(status_code=204)
        return Response(data, media_type=SAFETENSORS)

    def _attestation_header(request: Request) -> SiteAttestation | None:
        value = request.headers.get(ATTESTATION_HEADER)
        if value is None:
            return None
        try:
            return SiteAttestation.model_validate_json(base64.b64decode(value, validate=True))
        except (ValueError, binascii.Error) as exc:
            raise ApiError(422, f"invalid {ATTESTATION_HEADER} header", str(exc)[:500]) from exc

    @app.get("/api/v1/agent/tasks/{task_id}/secagg/{stage}", tags=["agent"], response_class=Response)
    async def secagg_receive(
        svc: Svc, site: Site, task_id: str, stage: str, wait: Annotated[float, Query(ge=0, le=60)] = 25.0
    ) -> Response:
        """Long-poll for the server's SecAgg+ message to this site after ``stage`` closes (204: not yet)."""
        _, driver = _secure_task(svc, site, task_id)
        try:
            data = await driver.next_message(site, stage, min(wait, svc.settings.max_wait_s))
        except SecureRoundGone as exc:
            raise ApiError(410, "no longer part of this secure round", str(exc)) from exc
        if data is None:
            return Response(status_code=204)
        return Response(data, media_type=SAFETENSORS)

    @app.post("/api/v1/agent/tasks/{task_id}/failure", response_model=Ack, tags=["agent"])
    async def report_failure(svc: Svc, site: Site, task_id: str, body: TaskFailure) -> Ack:
        """A site that cannot do a task says why; the round goes on without it."""
        task = svc.store.get_task(task_id)
        if task.site != site:
            raise ApiError(403, "this task belongs to another site")
        if task.is_open:
            svc.store.close_task(
                task_id,
                TaskStatus.FAILED,
                f"{body.code}: {body.reason}",
                svc.settings.clock.now(),
                attestation=body.attestation,
            )
            log.warning("site %s could not do %s: %s: %s", site, task_id, body.code, body.reason)
            await svc.engine.task_closed(task.round_id, task.id)
        return Ack()

    # --- operator API: sites ------------------------------------------------------------------------------

    @app.post("/api/v1/sites", response_model=SiteCreated, status_code=201, tags=["operator"])
    async def create_site(svc: Svc, admin: Admin, body: SiteCreate) -> SiteCreated:
        """Register a site and issue its one-time enrollment token (hand it to the site out of band)."""
        with svc.audit.transaction() as c:
            svc.store.create_site(body.name, svc.settings.clock.now(), connection=c)
            issued = svc.auth.enrollment_token(body.name, connection=c)
            _audit(svc, admin, AuditEventType.SITE_CREATED, {"site": body.name}, c)
            _audit(svc, admin, AuditEventType.SITE_TOKEN_ISSUED, _token_entry(body.name, issued), c)
        return SiteCreated(name=body.name, enrollment_token=issued.token, expires_at=issued.expires_at)

    @app.post("/api/v1/sites/{name}/enrollment-token", response_model=SiteCreated, tags=["operator"])
    async def new_enrollment_token(svc: Svc, admin: Admin, name: str) -> SiteCreated:
        """A fresh enrollment token for a site that has not enrolled yet (a lost token): the site's earlier
        tokens stop working. An enrolled site gets 409: re-keying it is ``POST /api/v1/sites/{name}/rotate``.
        """
        with svc.audit.transaction() as c:
            issued = svc.auth.enrollment_token(name, connection=c)
            _audit(svc, admin, AuditEventType.SITE_TOKEN_ISSUED, _token_entry(name, issued), c)
        return SiteCreated(name=name, enrollment_token=issued.token, expires_at=issued.expires_at)

    @app.post("/api/v1/sites/{name}/rotate", response_model=SiteCreated, tags=["operator"])
    async def rotate_site(svc: Svc, admin: Admin, name: str) -> SiteCreated:
        """Re-key an enrolled site: its key, every token issued against it and its TLS client certificate
        stop working at once, and the answer holds the enrollment token for its new key (the site is
        pending until it enrolls with it)."""
        with svc.audit.transaction() as c:
            token, expires, before = svc.auth.rotate(name, connection=c)
            entry = {
                "site": name,
                "old_key": before.public_key,
                "old_certificate_fingerprint": before.cert_fingerprint,
                "expires_at": expires.isoformat(),
            }
            _audit(svc, admin, AuditEventType.SITE_ROTATED, entry, c)
        log.warning("site %s rotated by %s: its old key is retired", name, admin.name)
        return SiteCreated(name=name, enrollment_token=token, expires_at=expires)

    @app.post("/api/v1/sites/{name}/revoke", response_model=SiteInfo, tags=["operator"])
    async def revoke_site(svc: Svc, admin: Admin, name: str) -> SiteInfo:
        """Revoke a site: every request it makes from now on is refused with 403."""
        svc.store.get_site(name)
        with svc.audit.transaction() as c:
            if svc.store.revoke_site(name, svc.settings.clock.now(), connection=c):
                _audit(svc, admin, AuditEventType.SITE_REVOKED, {"site": name}, c)
        log.warning("site %s revoked by %s", name, admin.name)
        return _site_info(svc.store.get_site(name))

    @app.get("/api/v1/sites", response_model=list[SiteInfo], tags=["operator"])
    async def list_sites(svc: Svc, _: Reader) -> list[SiteInfo]:
        return [_site_info(s) for s in svc.store.list_sites()]

    # --- operator API: users ------------------------------------------------------------------------------

    @app.post("/api/v1/users", response_model=UserCreated, status_code=201, tags=["operator"])
    async def create_user(svc: Svc, admin: Admin, body: UserCreate) -> UserCreated:
        if body.role is Role.SITE:
            raise ApiError(422, "sites enroll; they are not users")
        with svc.audit.transaction() as c:
            api_key = svc.auth.new_user(body.name, body.role, connection=c)
            _audit(svc, admin, AuditEventType.USER_CREATED, {"user": body.name, "role": body.role.value}, c)
        return UserCreated(name=body.name, role=body.role, api_key=api_key)

    @app.get("/api/v1/users", response_model=list[UserInfo], tags=["operator"])
    async def list_users(svc: Svc, _: Admin) -> list[UserInfo]:
        return [
            UserInfo(name=u.name, role=Role(u.role), created_at=u.created_at, revoked_at=u.revoked_at)
            for u in svc.store.list_users()
        ]

    @app.post("/api/v1/users/{name}/api-key", response_model=UserCreated, tags=["operator"])
    async def new_api_key(svc: Svc, admin: Admin, name: str) -> UserCreated:
        """Replace a user's API key (shown once): the old key, and every token issued against it, stop
        working at once."""
        user = svc.store.get_user(name)
        if user is None:
            raise ApiError(404, f"user {name!r} does not exist")
        with svc.audit.transaction() as c:
            api_key = svc.auth.new_api_key(name, connection=c)
            _audit(svc, admin, AuditEventType.USER_KEY_CHANGED, {"user": name}, c)
        return UserCreated(name=name, role=Role(user.role), api_key=api_key)

    @app.post("/api/v1/users/{name}/revoke", response_model=Ack, tags=["operator"])
    async def revoke_user(svc: Svc, admin: Admin, name: str) -> Ack:
        if svc.store.get_user(name) is None:
            raise ApiError(404, f"user {name!r} does not exist")
        if name == admin.name:
            raise ApiError(409, "an admin cannot revoke their own account")
        with svc.audit.transaction() as c:
            if svc.store.revoke_user(name, svc.settings.clock.now(), connection=c):
                _audit(svc, admin, AuditEventType.USER_REVOKED, {"user": name}, c)
        return Ack()

    # --- operator API: studies and models -----------------------------------------------------------------

    @app.post("/api/v1/studies", response_model=StudyInfo, status_code=201, tags=["operator"])
    async def create_study(
        svc: Svc, owner: Researcher, body: StudySpec, approval_wait_s: ApprovalWait = None
    ) -> StudyInfo:
        if body.owner != owner.name:
            raise ApiError(
                422, "invalid study", f"the spec's owner must be the submitting user ({owner.name!r})"
            )
        try:
            study = await svc.engine.create_study(body, owner.name, approval_wait_s=approval_wait_s)
        except (NotFoundError, InputError) as exc:  # unknown or revoked sites: a malformed study
            raise ApiError(422, "invalid study", str(exc)) from exc
        return study_info(svc.store, study.id)

    @app.get("/api/v1/studies", response_model=list[StudyInfo], tags=["operator"])
    async def list_studies(svc: Svc, _: Reader, status: StudyStatus | None = None) -> list[StudyInfo]:
        return [study_info(svc.store, s.id, with_rounds=False) for s in svc.store.list_studies(status)]

    @app.get("/api/v1/studies/{study_id}", response_model=StudyInfo, tags=["operator"])
    async def get_study(svc: Svc, _: Reader, study_id: str) -> StudyInfo:
        return study_info(svc.store, study_id)

    @app.post("/api/v1/studies/{study_id}/cancel", response_model=StudyInfo, tags=["operator"])
    async def cancel_study(svc: Svc, who: Researcher, study_id: str) -> StudyInfo:
        """Cancel a running study: its owner or an admin only."""
        study = svc.store.get_study(study_id)
        _owner_or_admin(who, study, "cancel it")
        if study.status not in (StudyStatus.RUNNING, StudyStatus.AWAITING_APPROVAL):
            raise ApiError(409, f"study is {study.status.value}")
        reason = f"cancelled by {who.name}"
        await svc.engine.cancel_study(study_id, reason)
        after = svc.store.get_study(study_id)
        if after.status is not StudyStatus.CANCELLED or after.reason != reason:
            raise ApiError(409, f"study is {after.status.value}")  # it ended otherwise meanwhile
        # The engine committed the cancellation; its entry follows (as the observers' entries follow the
        # changes they record).
        _audit(
            svc,
            who,
            AuditEventType.STUDY_CANCELLED,
            {"study_id": study_id, "study": study.name, "owner": study.spec.owner, "reason": reason},
        )
        log.warning("study %s cancelled by %s", study_id, who.name)
        return study_info(svc.store, study_id)

    @app.get("/api/v1/studies/{study_id}/model", tags=["operator"], response_class=Response)
    async def get_study_model(svc: Svc, who: Researcher, study_id: str) -> Response:
        """The study's latest released model (safetensors): its owner or an admin only. 404 until a round
        has released one."""
        study = svc.store.get_study(study_id)
        _owner_or_admin(who, study, "download its model")
        version = svc.store.model_version(study.model_digest)
        if version is None or study.completed_rounds == 0:
            raise ApiError(404, "no model of this study has been released yet")
        return _model_response(svc, version)

    @app.get("/api/v1/models/{digest}", tags=["operator"], response_class=Response)
    async def get_released_model(svc: Svc, who: Researcher, digest: str) -> Response:
        """A released model version by its digest (any round's, as the provenance lists them): admins any,
        researchers those of their own studies. Nothing else the orchestrator stores is served here."""
        check_digest(digest)
        version = svc.store.model_version(digest)
        if version is None:
            raise ApiError(404, "no released model has this digest")
        _owner_or_admin(who, svc.store.get_study(version.study_id), "download its models")
        return _model_response(svc, version)

    @app.get("/api/v1/studies/{study_id}/report", tags=["operator"])
    async def get_study_report(svc: Svc, _: Reader, study_id: str) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(build_report, svc.store, study_id)

    return app


def _audit(
    svc: Services,
    who: Principal,
    event: AuditEventType,
    payload: dict[str, Any],
    connection: Connection | None = None,
) -> None:
    """One security action in the orchestrator's audit log, naming who did it."""
    svc.audit.append(event, {**payload, "by": who.name}, actor=f"user:{who.name}", connection=connection)


def _token_entry(site: str, issued: IssuedToken) -> dict[str, Any]:
    # never the token nor its hash: the entry says that one was issued, when it expires, what it replaced
    return {"site": site, "expires_at": issued.expires_at.isoformat(), "cancelled_tokens": issued.cancelled}


def _owner_or_admin(who: Principal, study: StudyRow, what: str) -> None:
    if who.role is not Role.ADMIN and study.spec.owner != who.name:
        raise Forbidden(f"only the study's owner ({study.spec.owner}) or an admin may {what}")


def _model_response(svc: Services, version: ModelVersion) -> Response:
    return Response(
        svc.blobs.get(version.digest),
        media_type=SAFETENSORS,
        headers={"X-Fedhealth-Model-Digest": version.digest},
    )


def _site_info(row: SiteRow) -> SiteInfo:
    return SiteInfo(
        name=row.name,
        status=row.status.value,
        fingerprint=sha256_hex(bytes.fromhex(row.public_key)) if row.public_key else None,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
        enrolled_at=row.enrolled_at,
        revoked_at=row.revoked_at,
        software_version=row.software_version,
        protocol_version=row.protocol_version,
    )
