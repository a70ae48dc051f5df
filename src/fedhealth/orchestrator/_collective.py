"""Collective sessions at the orchestrator: one relay per session round, driven over the agent API.

The protocol is ``fedhealth.secagg``'s :class:`CollectiveRelay` (sans-IO); this module is its transport. Each
participant posts call ``i`` (``POST /api/v1/agent/tasks/{task_id}/collective/{i}?wait=S``, a raw body: an
8-byte header and, for a sum, little-endian uint64); once every participant's call ``i`` arrived, each of them
gets the one result in the answer (204 if not within ``S`` seconds; ``GET`` on the same path long-polls).

A collective costs milliseconds, so the route is a plain Starlette endpoint: no FastAPI body parsing or
dependency resolution, no database read or write in the route, and it is found without the router's
search (:mod:`~fedhealth.orchestrator._direct`, inside every middleware). The task's owner is checked
against the session's own table of task ids (loaded when the session starts); the caller's token was
checked by the :class:`~fedhealth.orchestrator._limits.RequestGate` on this very request, store lookup
included, so a revoked site is refused at its next call. Only the session's start (tasks, attempt) and
end (outcome, call count) reach the database and the audit log, through the round engine.

No dropout recovery: a participant whose call ``i`` has not arrived ``call_timeout_s`` after the first
participant's, or whose task ends, fails the session for everyone with that reason (410 to every later
call). The relay then forgets the open call's running sum: nothing over fewer than every participant is
ever computed or revealed. The relay's state is in memory on purpose: after an orchestrator restart a
session round starts again with a fresh attempt.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fastapi import APIRouter
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fedhealth.core import ConfigError, FedHealthError
from fedhealth.crypto import Audience, PublicIdentity
from fedhealth.governance import spec_hash
from fedhealth.orchestrator._auth import Forbidden, Principal, Unauthenticated
from fedhealth.orchestrator._limits import PRINCIPAL, peer_certificate
from fedhealth.orchestrator._store import RoundRow, TaskRow
from fedhealth.protocol import (
    ATTESTATION_HEADER,
    SESSION_HEADER,
    CollectiveSessionInfo,
    SiteAttestation,
    StudySpec,
    collective_plan,
)
from fedhealth.secagg import (
    CollectiveConfig,
    CollectiveOp,
    CollectiveRelay,
    SecAggProtocolError,
    SessionFailedError,
    SessionFailure,
)

log = logging.getLogger("fedhealth.orchestrator")
OCTETS = "application/octet-stream"
COLLECTIVE_PATH = "/api/v1/agent/tasks/{task_id}/collective/{index:int}"


class SessionGone(FedHealthError):
    """This site has no further part in the session: it failed, ended or restarted."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOutcome:
    """What a finished session leaves for the round engine: how many collectives ran, the payload of the
    leader's last broadcast (the session's public result, by convention of the collective recipes), and what
    each site attested with its closing call."""

    calls: int
    released: bytes | None
    attestations: dict[str, SiteAttestation]


@dataclass
class CollectiveSessionDriver:
    """Drives one session's relay: per-call deadlines, waiting sites, the end of the session."""

    round_id: str
    config: CollectiveConfig
    relay: CollectiveRelay
    peer_keys: dict[str, str]
    tasks: dict[str, str]  # task id -> site
    call_timeout_s: float
    on_done: Callable[[str], None]
    on_failed: Callable[[str, str], None]
    attestations: dict[str, SiteAttestation] = field(default_factory=dict)
    ended: str | None = None  # why the session is over for everyone (its failure, or its completion)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _timer: asyncio.TimerHandle | None = None
    _timed_index: int = -1
    _buffers: dict[tuple[str, int], bytearray] = field(default_factory=dict)

    def info(self) -> CollectiveSessionInfo:
        return CollectiveSessionInfo(
            sites=list(self.config.sites), peer_keys=self.peer_keys, attempt=self.config.attempt
        )

    def outcome(self) -> SessionOutcome:
        return SessionOutcome(
            calls=self.relay.calls, released=self.relay.released, attestations=dict(self.attestations)
        )

    @property
    def done(self) -> bool:
        return self.relay.done

    def can_join(self, site: str) -> bool:
        """Whether ``site`` may still be handed the session's task: only before it sent its set-up call (a
        site that restarted has lost its session key; handing it the task again would not help)."""
        return self.ended is None and self.relay.index == 0 and site in self.relay.missing()

    # --- calls ---------------------------------------------------------------------------------------------

    def body_buffer(self, site: str, index: int, length: int) -> bytearray:
        """Where ``site``'s call ``index`` is read: one of two buffers per site, by the index's parity, so a
        long session does not fault in fresh memory for every call (at 8 MB a call, that cost as much as the
        call). The relay may keep the first body of a call as the running sum and its result; that result
        is needed until the next call completes, and ``site``'s call ``index + 2`` cannot arrive before
        then: the next call completes only once every site posted it, each after reading this result."""
        key = (site, index % 2)
        buffer = self._buffers.get(key)
        if buffer is None or len(buffer) != length:
            buffer = self._buffers[key] = bytearray(length)
        return buffer

    async def call(self, site: str, index: int, body: bytearray, wait: float) -> bytes | memoryview | None:
        """Take ``site``'s call ``index`` and wait up to ``wait`` s for its result (None: not yet)."""
        if self.relay.done:
            return self.relay.result(index)  # the closing call again (its answer was lost): the same answer
        if self.ended is not None:
            raise SessionGone(self.ended)
        try:
            completed = self.relay.receive(site, index, body)
        except SessionFailedError as exc:
            self.fail(exc.reason, exc.detail)
            raise SessionGone(self.ended or str(exc)) from None
        if completed:
            self._completed()
        else:
            self._arm()
        return await self.result(index, wait)

    async def result(self, index: int, wait: float) -> bytes | memoryview | None:
        """The result of call ``index`` (long-poll); None if it is not complete within ``wait`` seconds."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait
        while True:
            if self.relay.failure is not None:
                raise SessionGone(self.ended or str(self.relay.failure))
            data = self.relay.result(index)  # raises SecAggProtocolError for an index long closed
            if data is not None:
                return data
            if self.ended is not None:
                raise SessionGone(self.ended)
            remaining = give_up - loop.time()
            if remaining <= 0:
                return None
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=remaining)
            except TimeoutError:
                return None

    def _completed(self) -> None:
        self._disarm()
        if self.relay.done:
            self.ended = "the session is complete"
            log.info("collective session %s complete: %d calls", self.round_id, self.relay.calls)
            self._wake()
            self.on_done(self.round_id)
            return
        self._wake()

    # --- deadlines and failure ------------------------------------------------------------------------------

    def arm_setup(self) -> None:
        """The set-up has a deadline from the start: a participant that never joins fails the session."""
        self._arm(force=True)

    def _arm(self, force: bool = False) -> None:
        index = self.relay.index
        if self._timed_index == index and not force:
            return  # the first call of this index armed it; later arrivals do not extend it
        self._disarm()
        self._timed_index = index
        self._timer = asyncio.get_running_loop().call_later(self.call_timeout_s, self._timeout, index)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timeout(self, index: int) -> None:
        if self.ended is not None or self.relay.index != index or self.relay.done:
            return
        missing = ", ".join(self.relay.missing())
        what = "the session's set-up" if index == 0 else f"collective call {index}"
        self.fail(
            SessionFailure.SITE_LOST,
            f"{missing} did not take part in {what} within {self.call_timeout_s:g} s",
        )

    def fail(self, reason: SessionFailure, detail: str) -> None:
        """End the session for everyone with ``reason`` and tell the engine (once)."""
        if self.ended is not None:
            return
        error = self.relay.fail(reason, detail)
        self.ended = f"collective session failed: {error}"
        self._disarm()
        log.warning("collective session %s: %s", self.round_id, self.ended)
        self._wake()
        self.on_failed(self.round_id, self.ended)

    def abort(self, reason: str) -> None:
        """Stop the session without telling the engine (the engine is the one stopping it)."""
        if self.ended is None:
            if not self.relay.done:
                self.relay.fail(SessionFailure.ABORTED, reason)
            self.ended = reason
            self._disarm()
            self._wake()

    def release(self) -> None:
        """Drop the read buffers (the session is over; its outcome and last answer stay)."""
        self._buffers.clear()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


def session_config(
    spec: StudySpec, *, study_id: str, number: int, attempt: str, sites: list[str]
) -> CollectiveConfig:
    """A session's configuration. Everything but the attempt comes from the approved spec, which each site
    checks the session against; the session needs every participant the spec names (no subset: there is no
    dropout recovery, and the spec names who is in the sum). Raises ``ConfigError``."""
    try:
        plan = collective_plan(spec)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    missing = sorted(set(plan.sites) - set(sites))
    if missing:
        raise ConfigError(f"the session needs every site of the spec; not available: {', '.join(missing)}")
    return CollectiveConfig(
        study_id=study_id,
        round=number,
        attempt=attempt,
        spec_hash=spec_hash(spec.model_dump(mode="json")),
        sites=plan.sites,
        collusion=plan.collusion,
    )


class CollectiveSessions:
    """The open collective sessions of this orchestrator process (the engine starts and ends them)."""

    # Ended sessions kept to answer late calls (a closing call re-sent after its answer was lost gets the
    # same answer; any other gets the session's reason), the oldest going first when there are more.
    RETIRED = 64

    def __init__(self) -> None:
        self._drivers: dict[str, CollectiveSessionDriver] = {}
        self._by_task: dict[str, CollectiveSessionDriver] = {}
        self._retired: OrderedDict[str, CollectiveSessionDriver] = OrderedDict()

    def start(
        self,
        *,
        round_id: str,
        study_id: str,
        number: int,
        spec: StudySpec,
        tasks: Mapping[str, str],
        identities: Mapping[str, str],
        on_done: Callable[[str], None],
        on_failed: Callable[[str, str], None],
    ) -> CollectiveSessionDriver:
        """Open the session of a round: ``tasks`` maps each task id to its site, ``identities`` each site to
        its enrolled Ed25519 public key (hex). Raises ``ConfigError`` if the session cannot be held."""
        attempt = secrets.token_hex(8)
        enrolled = [s for s in tasks.values() if s in identities]
        config = session_config(spec, study_id=study_id, number=number, attempt=attempt, sites=enrolled)
        relay = CollectiveRelay(
            config, {s: PublicIdentity(bytes.fromhex(identities[s])) for s in config.sites}
        )
        assert spec.secure_aggregation is not None  # collective_plan required it
        driver = CollectiveSessionDriver(
            round_id=round_id,
            config=config,
            relay=relay,
            peer_keys={s: identities[s] for s in config.sites},
            tasks={t: s for t, s in tasks.items() if s in config.sites},
            call_timeout_s=spec.secure_aggregation.stage_timeout_s,
            on_done=on_done,
            on_failed=on_failed,
        )
        self.discard(round_id, "the session restarted with fresh keys")
        self._drivers[round_id] = driver
        for task_id in driver.tasks:
            self._by_task[task_id] = driver
        driver.arm_setup()
        log.info(
            "collective session %s (attempt %s): %d sites, leader %s",
            round_id,
            attempt,
            config.n,
            config.leader,
        )
        return driver

    def get(self, round_id: str) -> CollectiveSessionDriver | None:
        return self._drivers.get(round_id)

    def for_task(self, task_id: str) -> CollectiveSessionDriver | None:
        return self._by_task.get(task_id)

    def not_joinable(self, task: TaskRow, round_row: RoundRow) -> bool:
        """For task delivery: a session's task its site can no longer join is not handed out."""
        driver = self._drivers.get(round_row.id)
        return driver is not None and not driver.can_join(task.site)

    def discard(self, round_id: str, reason: str) -> None:
        """End a round's session (the engine's call: it completed, failed, or the study ended)."""
        driver = self._drivers.pop(round_id, None)
        if driver is None:
            return
        driver.abort(reason)
        driver.release()
        self._retired[round_id] = driver
        while len(self._retired) > self.RETIRED:
            _, old = self._retired.popitem(last=False)
            for task_id in old.tasks:
                if self._by_task.get(task_id) is old:
                    del self._by_task[task_id]

    def site_locked_out(self, site: str) -> None:
        """``site`` was revoked or re-keyed: every open session it takes part in fails (its waiting calls,
        and the others', are answered 410 with the reason at once)."""
        for driver in list(self._drivers.values()):
            if site in driver.config.sites and not driver.done:
                driver.fail(SessionFailure.SITE_LOST, f"{site} was revoked or re-keyed during the session")

    def close(self) -> None:
        for round_id in list(self._drivers):
            self.discard(round_id, "the orchestrator is shutting down")


# --- routes ----------------------------------------------------------------------------------------------


def _error(status: int, error: str, detail: object = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def _site(request: Request) -> str:
    """The calling site, as the request gate authenticated it (or here, for an app without the gate)."""
    principal = request.scope.get("state", {}).get(PRINCIPAL)
    if isinstance(principal, Principal) and principal.claims.audience is Audience.AGENT:
        return principal.name
    svc = request.app.state.services
    return svc.auth.authenticate(  # type: ignore[no-any-return]
        request.headers.get("authorization"), Audience.AGENT, peer_certificate(request.scope)
    ).name


def _wait(request: Request, limit: float, default: float) -> float:
    raw = request.query_params.get("wait")
    if raw is None:
        return min(default, limit)
    try:
        wait = float(raw)
    except ValueError:
        raise ValueError("wait must be a number of seconds") from None
    if not 0 <= wait <= 60:
        raise ValueError("wait must be within 0..60 seconds")
    return min(wait, limit)


def _driver(request: Request, site: str) -> CollectiveSessionDriver | JSONResponse:
    svc = request.app.state.services
    task_id = request.path_params["task_id"]
    driver = svc.engine.collective.for_task(task_id)
    if driver is None:
        return _error(410, "no collective session is running for this task")
    if driver.tasks[task_id] != site:
        return _error(403, "this task belongs to another site")
    if request.headers.get(SESSION_HEADER) != driver.config.attempt:
        return _error(410, "no longer part of this collective session", "the session restarted")
    return driver  # type: ignore[no-any-return]


async def _read_body(request: Request, driver: CollectiveSessionDriver, site: str) -> bytearray:
    """The call's body, read into the site's reused buffer when its length is declared (the gate has
    checked it against the upload limit before a byte was read)."""
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
        return body
    length = int(declared)
    index = request.path_params["index"]
    # a re-sent call is read aside: its first copy may be the running sum or the result others are reading
    body = (
        bytearray(length) if driver.relay.received(site, index) else driver.body_buffer(site, index, length)
    )
    view = memoryview(body)
    got = 0
    async for chunk in request.stream():
        if got + len(chunk) > length:
            raise ValueError("the body is longer than its Content-Length")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    if got != length:
        raise ValueError("the body is shorter than its Content-Length")
    return body


def _attestation(request: Request) -> SiteAttestation | None:
    value = request.headers.get(ATTESTATION_HEADER)
    if value is None:
        return None
    return SiteAttestation.model_validate_json(base64.b64decode(value, validate=True))


def _answer(data: bytes | memoryview | None) -> Response:
    if data is None:
        return Response(status_code=204)
    return Response(data, media_type=OCTETS)


async def collective_call(request: Request) -> Response:
    """``POST .../collective/{index}?wait=S``: this site's call ``index``; the answer is its result once every
    participant sent theirs (204: not within ``S``; 410: the session is over for this site, with why)."""
    try:
        site = _site(request)
    except (Unauthenticated, Forbidden) as exc:
        return _error(401 if isinstance(exc, Unauthenticated) else 403, str(exc))
    found = _driver(request, site)
    if isinstance(found, JSONResponse):
        return found
    try:
        wait = _wait(request, request.app.state.services.settings.max_wait_s, 0.0)
        attestation = _attestation(request)
    except (ValueError, binascii.Error) as exc:
        return _error(422, "malformed request", str(exc)[:500])
    try:
        body = await _read_body(request, found, site)
    except ClientDisconnect:  # the sender died mid-call: nothing was taken, it may retry
        return _error(400, "the client disconnected before the body was complete")
    except ValueError as exc:
        return _error(400, str(exc))
    if attestation is not None and body[4:5] == bytes([CollectiveOp.END]):
        found.attestations[site] = attestation  # stored with the task when the session ends
    try:
        data = await found.call(site, request.path_params["index"], body, wait)
    except SessionGone as exc:
        return _error(410, "no longer part of this collective session", str(exc))
    except SecAggProtocolError as exc:
        return _error(409, str(exc))
    return _answer(data)


async def collective_result(request: Request) -> Response:
    """``GET .../collective/{index}?wait=S``: long-poll for the result of call ``index`` (204: not yet)."""
    try:
        site = _site(request)
    except (Unauthenticated, Forbidden) as exc:
        return _error(401 if isinstance(exc, Unauthenticated) else 403, str(exc))
    found = _driver(request, site)
    if isinstance(found, JSONResponse):
        return found
    try:
        wait = _wait(request, request.app.state.services.settings.max_wait_s, 25.0)
    except ValueError as exc:
        return _error(422, "malformed request", str(exc))
    try:
        data = await found.result(request.path_params["index"], wait)
    except SessionGone as exc:
        return _error(410, "no longer part of this collective session", str(exc))
    except SecAggProtocolError as exc:
        return _error(409, str(exc))
    return _answer(data)


def collective_router() -> APIRouter:
    """The agent API's collective routes (plain Starlette routes: raw bytes in and out, no body parsing)."""
    router = APIRouter()
    router.routes.extend(
        [
            Route(COLLECTIVE_PATH, collective_call, methods=["POST"], include_in_schema=False),
            Route(COLLECTIVE_PATH, collective_result, methods=["GET"], include_in_schema=False),
        ]
    )
    return router
