"""The orchestrator as one object: settings, store, blobs, round engine, notifier, authentication, limits and
audit log (:class:`OrchestratorService`), and the seam through which extensions join it.

Route handlers are plain functions of this object (``accept_result(svc, site, task_id, body) -> Ack``);
:func:`start_service` builds it, so tests call the handlers without HTTP, and the app's lifespan is
``start_service`` ... ``svc.close()``.

An :class:`Extension` (governance, privacy) is started here, once the store exists: it builds what it keeps
(its own state, on itself) and answers a :class:`Registration` saying what it contributes to the core (a
study observer, the spec signatures that sites verify). Its routes read its own state; nothing looks for an
extension's observer among the engine's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import anyio
from fastapi import APIRouter
from sqlalchemy import Connection, Engine

from fedhealth.core import Clock, SystemClock
from fedhealth.crypto import IdentityKey, PemPair
from fedhealth.governance import AuditEventType, AuditLog
from fedhealth.orchestrator._auth import AuthService, AuthSettings, Principal
from fedhealth.orchestrator._blobs import BlobStore
from fedhealth.orchestrator._db import make_engine, sqlite_url, upgrade_database
from fedhealth.orchestrator._engine import DEFAULT_APPROVAL_WAIT_S, RoundEngine
from fedhealth.orchestrator._hooks import StudyObserver
from fedhealth.orchestrator._limits import RateLimiter
from fedhealth.orchestrator._notify import TaskNotifier
from fedhealth.orchestrator._store import Store

# The audit log's actor name for the orchestrator (the governance extension writes under the same name).
AUDIT_ACTOR = "orchestrator"

# (signature hex, owner key hex) of a study's spec as its owner signed it; None: submitted unsigned.
SpecSignatures = Callable[[str], tuple[str, str] | None]


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


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtensionContext:
    """What an extension may build its state from when the orchestrator starts."""

    settings: OrchestratorSettings
    store: Store
    blobs: BlobStore


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """What a started extension contributes to the core: each field an explicit hook, None if it has none."""

    observer: StudyObserver | None = None  # hears about studies, rounds and tasks (``_hooks``)
    spec_signatures: SpecSignatures | None = None  # owners' signatures, forwarded to the sites that approve


class Extension(Protocol):
    """A feature of the orchestrator (governance, privacy views...) that owns its routes and its state.

    ``routers`` is called when the app is built; ``start`` once per app start, when the store exists. The
    extension keeps what ``start`` builds on itself, so an extension object serves one app at a time.
    """

    def start(self, context: ExtensionContext) -> Registration: ...

    def routers(self) -> list[APIRouter]: ...


@dataclass
class OrchestratorService:
    """Everything a route handler works with (module docstring)."""

    settings: OrchestratorSettings
    store: Store
    blobs: BlobStore
    engine: RoundEngine
    notifier: TaskNotifier
    auth: AuthService
    limiter: RateLimiter
    audit: AuditLog  # the orchestrator's signed audit log (the one the governance extension writes too)
    database: Engine | None = None  # disposed by :meth:`close` when the service opened it
    spec_signatures: SpecSignatures | None = None
    last_seen: dict[str, datetime] = field(default_factory=dict)

    def signature_of(self, study_id: str) -> tuple[str, str] | None:
        """The owner's signature of a study's spec, if an extension keeps signatures and it was signed."""
        return self.spec_signatures(study_id) if self.spec_signatures is not None else None

    def record(
        self,
        who: Principal,
        event: AuditEventType,
        payload: dict[str, Any],
        connection: Connection | None = None,
    ) -> None:
        """One security action in the orchestrator's audit log, naming who did it."""
        self.audit.append(event, {**payload, "by": who.name}, actor=f"user:{who.name}", connection=connection)

    async def close(self) -> None:
        await self.engine.close()
        if self.database is not None:
            self.database.dispose()


# The name the app and the extensions have used since the first release.
Services = OrchestratorService


async def start_service(
    settings: OrchestratorSettings, extensions: Sequence[Extension] = ()
) -> OrchestratorService:
    """Open the database (migrated), the blob store and the round engine, start each extension, and resume
    the studies that were running (:meth:`RoundEngine.recover`). Call :meth:`OrchestratorService.close`."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    db = make_engine(settings.resolved_database_url, fsync=settings.fsync)
    await anyio.to_thread.run_sync(upgrade_database, db)
    store = Store(db)
    blobs = BlobStore(settings.state_dir / "blobs", fsync=settings.fsync)
    notifier = TaskNotifier()
    context = ExtensionContext(settings=settings, store=store, blobs=blobs)
    registrations = [ext.start(context) for ext in extensions]
    engine = RoundEngine(
        store,
        blobs,
        settings.clock,
        notifier,
        reports_dir=settings.state_dir / "reports",
        observers=[r.observer for r in registrations if r.observer is not None],
        approval_wait_s=settings.approval_wait_s,
    )
    svc = OrchestratorService(
        settings=settings,
        store=store,
        blobs=blobs,
        engine=engine,
        notifier=notifier,
        auth=AuthService(store, settings.signing_key, settings.clock, settings.auth),
        limiter=RateLimiter(settings.rate_per_s, settings.rate_burst),
        audit=AuditLog(db, settings.signing_key, AUDIT_ACTOR, settings.clock),
        database=db,
        # the first extension that keeps signatures answers for them
        spec_signatures=next((r.spec_signatures for r in registrations if r.spec_signatures), None),
    )
    await engine.recover()
    return svc
