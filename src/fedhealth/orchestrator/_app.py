"""The orchestrator's ASGI app: the routers of every area, the extensions' routers, the request gate and
the error mapping, around one :class:`OrchestratorService` built in the lifespan.

Where a route goes (each router's handlers are plain functions of the service, tested without HTTP):

- ``_routes_auth``: health, enrollment, the agent's and the operator's login;
- ``_routes_tasks``: the agent's long poll and a task's result, evaluation or failure;
- ``_routes_secure``: SecAgg+ stage messages; ``_collective``: collective-session calls;
- ``_routes_models``: model downloads from the blob store;
- ``_routes_sites``: study approvals, readiness and probes;
- ``_routes_studies``: the operator's studies and reports; ``_routes_admin``: sites and users;
- an :class:`Extension` (``_governance``, ``_privacy``): its own routes and state.

Credentials, rate and body size are checked by :class:`RequestGate` before a route reads its body. The
collective calls are matched ahead of the router (``_direct``), inside every middleware. Security
actions (sites created, tokens issued, rotations, revocations, users and their keys, cancelled studies) are
entries in the orchestrator's signed audit log, written in the same transaction as the change they record.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from starlette.routing import Route
from starlette.types import ASGIApp

import fedhealth
from fedhealth.learning import preload_libraries
from fedhealth.orchestrator._collective import COLLECTIVE_PATH, collective_router
from fedhealth.orchestrator._direct import install_direct_routes
from fedhealth.orchestrator._http import ApiError, install_error_handlers
from fedhealth.orchestrator._limits import BodyLimits, EnrollmentPortMiddleware, RequestGate
from fedhealth.orchestrator._routes_admin import admin_router
from fedhealth.orchestrator._routes_auth import auth_router
from fedhealth.orchestrator._routes_models import models_router
from fedhealth.orchestrator._routes_secure import secure_router
from fedhealth.orchestrator._routes_sites import sites_router
from fedhealth.orchestrator._routes_studies import studies_router
from fedhealth.orchestrator._routes_tasks import tasks_router
from fedhealth.orchestrator._service import (
    Extension,
    OrchestratorService,
    OrchestratorSettings,
    Services,
    start_service,
)
from fedhealth.orchestrator._versions import VersionHeadersMiddleware

__all__ = [
    "ApiError",
    "Extension",
    "OrchestratorService",
    "OrchestratorSettings",
    "Services",
    "core_routers",
    "create_app",
]


def core_routers() -> list[APIRouter]:
    """The routes of the orchestrator itself, by area (module docstring)."""
    return [
        collective_router(),
        sites_router(),  # study approvals, site readiness and probes, versions
        auth_router(),
        tasks_router(),
        models_router(),
        secure_router(),
        admin_router(),
        studies_router(),
    ]


class _Orchestrator(FastAPI):
    """FastAPI with the version headers outside every other layer: Starlette's server-error layer (a bug's
    500) and the enrollment port's refusals answer outside the middleware an app adds, and every answer states
    the protocol and release (docs/architecture.md, "Versions on the wire")."""

    def build_middleware_stack(self) -> ASGIApp:
        return VersionHeadersMiddleware(super().build_middleware_stack())


def create_app(
    settings: OrchestratorSettings,
    on_ready: Callable[[], None] | None = None,
    *,
    extensions: Sequence[Extension] = (),
) -> FastAPI:
    """The orchestrator's ASGI app. Each :class:`Extension` adds its routes now and is started (its state
    built, its observer registered) in the lifespan, once the store exists."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = await start_service(settings, extensions)
        app.state.services = svc
        # the recipes' libraries, loaded beside the service rather than by the first study's submission
        # (checking a boosting study's params imports its library: ~1.5 s of CPU, inside the study's time)
        # /healthz says "loading" until they are in (their import adds ~130 MB to the process)
        app.state.libraries = "loading"

        def preload() -> None:
            preload_libraries()
            app.state.libraries = "loaded"

        threading.Thread(target=preload, name="preload-libraries", daemon=True).start()
        app.state.shutdown = svc.notifier.shutdown
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await svc.close()

    app = _Orchestrator(
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
    for ext in extensions:  # an extension may wrap every request (e.g. the metrics' request timer)
        getattr(ext, "install_middleware", lambda _app: None)(app)
    if settings.enroll_port is not None:
        app.add_middleware(EnrollmentPortMiddleware, port=settings.enroll_port)
    for ext in extensions:
        for router in ext.routers():
            app.include_router(router)
    routers = core_routers()
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    # the collective calls skip the router's search (every check of the middleware above still applies)
    collective = [
        r for rt in routers for r in rt.routes if isinstance(r, Route) and r.path == COLLECTIVE_PATH
    ]
    install_direct_routes(app, collective, marker="/collective/")
    return app
