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

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import anyio
from fastapi import APIRouter
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from fedhealth.core import Clock, ConfigError, SystemClock
from fedhealth.crypto import IdentityKey, PemPair
from fedhealth.governance import AuditEventType, AuditLog
from fedhealth.orchestrator._auth import AuthService, AuthSettings, Principal
from fedhealth.orchestrator._blobs import BlobStore
from fedhealth.orchestrator._db import (
    OrchestratorLock,
    lock_orchestrator,
    make_engine,
    sqlite_url,
    upgrade_database,
)
from fedhealth.orchestrator._engine import DEFAULT_APPROVAL_WAIT_S, RoundEngine
from fedhealth.orchestrator._hooks import NullObserver, StudyObserver
from fedhealth.orchestrator._limits import RateLimiter
from fedhealth.orchestrator._notify import TaskNotifier
from fedhealth.orchestrator._store import Store, StudyRow

log = logging.getLogger("fedhealth.orchestrator")

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
    # How long a start waits for the lock of an orchestrator that is going away (a supervisor's restart).
    lock_wait_s: float = 5.0
    # Set by ``serve`` from before it listens (it refuses in one line there); otherwise start_service
    # takes the lock itself and its service's close() releases it.
    lock: OrchestratorLock | None = None
    # How often a running orchestrator asks whether it still holds its PostgreSQL lock (one query on the
    # lock's own connection, none per request): a lock whose connection ended is taken again, or, if
    # another orchestrator took it meanwhile, this one stops driving rounds (docs/security.md, "Durability").
    lock_check_s: float = 2.0
    # Called with the reason when another orchestrator took the lock; ``serve`` stops the server with it.
    on_lock_lost: Callable[[str], None] | None = None

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
    lock: OrchestratorLock | None = None  # released by :meth:`close` when the service took it
    stopped: str | None = None  # why the service stopped driving rounds (another took its lock), if it did
    lock_watch: asyncio.Task[None] | None = None  # :func:`_watch_lock`, ended by :meth:`close`

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

    def site_locked_out(self, site: str) -> None:
        """A site was revoked or re-keyed (call on the event loop, after the change is stored): its waiting
        polls are woken, and refused when they ask again; a collective session it takes part in fails now
        for every participant (its calls are refused from here on) rather than at the call's deadline."""
        self.notifier.notify([site])
        self.engine.collective.site_locked_out(site)

    async def site_revoked(self, site: str) -> None:
        """A site was revoked for good (call on the event loop, after the change is stored): as
        :meth:`site_locked_out`, and its open tasks close as failed, so their rounds go on without it."""
        self.site_locked_out(site)
        await self.engine.close_revoked_tasks(site)

    async def close(self) -> None:
        if self.lock_watch is not None:
            self.lock_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.lock_watch  # a check in progress finishes before the lock is released
            self.lock_watch = None
        await self.engine.close()
        if self.database is not None:
            self.database.dispose()
        if self.lock is not None:
            self.lock.release()


# The name the app and the extensions have used since the first release.
Services = OrchestratorService


async def start_service(
    settings: OrchestratorSettings, extensions: Sequence[Extension] = ()
) -> OrchestratorService:
    """Take the orchestrator's lock (one orchestrator per database and state folder: a second would run the
    same rounds), open the database (migrated) and the blob store (blobs no row names collected), the round
    engine, start each extension, and resume the studies that were running (:meth:`RoundEngine.recover`).
    Call :meth:`OrchestratorService.close`."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    lock = None
    if settings.lock is None:
        lock = await anyio.to_thread.run_sync(
            lambda: lock_orchestrator(
                settings.state_dir, settings.resolved_database_url, wait_s=settings.lock_wait_s
            )
        )
    db = make_engine(settings.resolved_database_url, fsync=settings.fsync)
    try:
        await anyio.to_thread.run_sync(upgrade_database, db)
        store = Store(db)
        blobs = BlobStore(settings.state_dir / "blobs", fsync=settings.fsync)
        # Locked, and before anything serves or aggregates: no blob is being written (module docstring).
        belongs = await anyio.to_thread.run_sync(_collect, store, blobs)
        return await _start(settings, extensions, db, store, blobs, lock, belongs)
    except BaseException:
        db.dispose()
        if lock is not None:
            lock.release()
        raise


def _collect(store: Store, blobs: BlobStore) -> bool:
    """Remove the blobs no row names, if this database is the one the blobs belong to (a start on the wrong
    database must not take every model for an orphan: :meth:`BlobStore.kept_for`); whether it is."""
    studies, named = store.study_ids(), store.named_digests()
    if not blobs.kept_for(studies, named):
        log.warning(
            "the database lacks studies whose blobs are in %s: is it the federation's database? "
            "blobs no row names are kept (a start on the database they belong to collects them)",
            blobs.root,
        )
        return False
    collected = blobs.collect(named)
    if collected:
        log.info("removed %d stored blobs that no database row names", collected)
    blobs.keep_for(studies)
    return True


class _KeptFor(NullObserver):
    """Records each new study beside the blobs (:meth:`BlobStore.keep_for`), so that a later start on a
    database without it does not collect its blobs, even after a crash."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs

    def study_created(self, study: StudyRow, owner: str) -> None:
        self._blobs.keep_for({study.id})


async def _start(
    settings: OrchestratorSettings,
    extensions: Sequence[Extension],
    db: Engine,
    store: Store,
    blobs: BlobStore,
    lock: OrchestratorLock | None,
    belongs: bool,
) -> OrchestratorService:
    notifier = TaskNotifier()
    context = ExtensionContext(settings=settings, store=store, blobs=blobs)
    registrations = [ext.start(context) for ext in extensions]
    engine = RoundEngine(
        store,
        blobs,
        settings.clock,
        notifier,
        reports_dir=settings.state_dir / "reports",
        observers=[
            *([_KeptFor(blobs)] if belongs else []),  # only where the blobs are this database's
            *(r.observer for r in registrations if r.observer is not None),
        ],
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
        lock=lock,
        # the first extension that keeps signatures answers for them
        spec_signatures=next((r.spec_signatures for r in registrations if r.spec_signatures), None),
    )
    await engine.recover()
    held = lock if lock is not None else settings.lock
    if held is not None and settings.lock_check_s > 0:
        svc.lock_watch = asyncio.create_task(_watch_lock(svc, held), name="orchestrator-lock-watch")
    return svc


async def _watch_lock(svc: OrchestratorService, lock: OrchestratorLock) -> None:
    """Keep this orchestrator the only one on its database while it runs. A PostgreSQL advisory lock lives
    as long as its connection: one ended under the running orchestrator (``pg_terminate_backend``, a server
    restart or failover) would let a second orchestrator in beside it. Every ``lock_check_s`` the lock's own
    connection is asked; a lost lock is taken again at once, and if another orchestrator holds it by then
    this one stops driving rounds (``serve`` exits with the reason), so the two never both run them."""
    while True:
        await asyncio.sleep(svc.settings.lock_check_s)
        try:
            held = await anyio.to_thread.run_sync(lock.check)
        except ConfigError as exc:
            svc.stopped = (
                "another orchestrator took this database's lock while this one's lock connection was down; "
                f"this one stops running rounds ({exc})"
            )
            log.error("%s", svc.stopped)
            await svc.engine.close()
            if svc.settings.on_lock_lost is not None:
                svc.settings.on_lock_lost(svc.stopped)
            return
        except Exception as exc:  # the database is unreachable (so is the pool's): asked again next turn
            cause = exc.orig if isinstance(exc, DBAPIError) else exc
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            log.warning("cannot check the orchestrator's database lock (%s); trying again", reason)
            continue
        if not held:
            log.warning("the orchestrator's database lock ended with its connection; it is held again")
