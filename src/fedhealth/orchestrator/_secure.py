"""Secure rounds at the orchestrator: one SecAgg+ server per open round, driven over the agent API.

The protocol itself lives in ``fedhealth.secagg`` (sans-IO); this module is its transport. A site posts its
message for the current stage; once every expected site has answered or left the round (its task closed: it
reported a failure), or the stage's timeout passes, the stage closes with whoever answered and each continuing
site can fetch the server's next message by long-poll. When the unmask stage closes, the round engine gets the
*sum* and nothing else: the orchestrator never holds a site's unmasked update, and it keeps no masked input
after the round.

The server's state is in memory on purpose (its secrets must not be written down). After an orchestrator
restart an open secure round starts a new attempt with fresh keys: the attempt id is bound into every key
derivation, so a message from the old attempt is refused.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedhealth.core import ConflictError, FedHealthError, InputError
from fedhealth.crypto import PublicIdentity
from fedhealth.orchestrator._store import RoundRow, TaskRow
from fedhealth.protocol import SecureRoundInfo, SiteAttestation, StudySpec, TaskKind, secure_round_plan
from fedhealth.runtime import secure_codec
from fedhealth.secagg import (
    AggregateResult,
    RoundFailedError,
    SecAggConfig,
    SecAggProtocolError,
    SecAggSecurityError,
    SecAggServer,
    Stage,
    VectorCodec,
    decode_message,
)

log = logging.getLogger("fedhealth.orchestrator")

STAGES = {
    s.value: s
    for s in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK)
}
_ORDER = {s: i for i, s in enumerate(STAGES.values())}


class SecureRoundGone(FedHealthError):
    """This site has no further part in the round: it dropped out, or the round ended or restarted."""


@dataclass
class SecureRoundDriver:
    """Drives one SecAgg+ round: stage deadlines, the outbox of each closed stage, waiting agents."""

    round_id: str
    kind: TaskKind
    codec: VectorCodec
    config: SecAggConfig
    server: SecAggServer
    peer_keys: dict[str, str]
    attempt: str
    stage_timeout_s: float
    on_done: Callable[[str], None]
    on_failed: Callable[[str, str], None]
    outbox: dict[Stage, dict[str, bytes]] = field(default_factory=dict)
    dropped_at: dict[str, Stage] = field(default_factory=dict)
    # sites whose task closed during the round (a reported failure): they answer no further stage
    left: set[str] = field(default_factory=set)
    # what each site attested with its first message; written with the tasks when the round closes
    attestations: dict[str, SiteAttestation] = field(default_factory=dict)
    ended: str | None = None  # why the round is over for everyone (failure or result)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _timer: asyncio.TimerHandle | None = None

    def info(self) -> SecureRoundInfo:
        return SecureRoundInfo(config=self.config.to_json(), peer_keys=self.peer_keys, attempt=self.attempt)

    # --- stages --------------------------------------------------------------------------------------------

    def arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        stage = self.server.stage
        self._timer = asyncio.get_running_loop().call_later(self.stage_timeout_s, self._timeout, stage)

    def _timeout(self, stage: Stage) -> None:
        if self.ended is None and self.server.stage is stage:
            log.info(
                "secure round %s: %s stage timed out; closing with %s",
                self.round_id,
                stage.value,
                sorted(self.server.answered()),
            )
            self.close()

    def receive(self, site: str, stage_name: str, body: bytes) -> None:
        """One site's message for ``stage_name``. Re-sending the same message is harmless."""
        if self.ended is not None:
            raise SecureRoundGone(self.ended)
        stage = STAGES.get(stage_name)
        if stage is None:
            raise InputError(f"unknown secure-aggregation stage {stage_name!r}")
        if stage is not self.server.stage:
            if site in self.dropped_at:
                raise SecureRoundGone(f"this site dropped out at the {self.dropped_at[site].value} stage")
            if _ORDER[stage] < _ORDER.get(self.server.stage, len(_ORDER)):
                # A stage this site answered (it would be counted out otherwise) closed since: a re-sent
                # message (a retry after a lost response) changes nothing.
                return
            raise ConflictError(f"the round is at the {self.server.stage.value} stage, not {stage_name}")
        try:
            message = decode_message(body)
        except InputError:
            raise
        if getattr(message, "site_id", None) != site:
            raise InputError("the message was sent by another site")
        try:
            self.server.receive(message)  # type: ignore[arg-type]
        except SecAggSecurityError as exc:
            raise InputError(f"refused: {exc}") from exc
        except SecAggProtocolError as exc:
            raise ConflictError(str(exc)) from exc
        if not self.server.awaiting():
            self.close()
        else:
            self._close_if_decided()  # the sites still awaited may all have left

    def close(self) -> None:
        stage = self.server.stage
        expected = self.server.expected()
        try:
            out = self.server.close_stage()
        except RoundFailedError as exc:
            self._end(f"secure aggregation failed at the {stage.value} stage: {exc}")
            self.on_failed(self.round_id, self.ended or str(exc))
            return
        except SecAggSecurityError as exc:
            self._end(f"secure aggregation aborted at the {stage.value} stage: {exc}")
            self.on_failed(self.round_id, self.ended or str(exc))
            return
        for site in expected - set(out):
            self.dropped_at.setdefault(site, stage)
        self.outbox[stage] = {site: message.to_bytes() for site, message in out.items()}
        if self.server.stage is Stage.DONE:
            if self._timer is not None:
                self._timer.cancel()
            self.ended = "the round is complete"
            self._changed.set()
            self.on_done(self.round_id)
            return
        self.arm()
        self._wake()
        self._close_if_decided()

    def site_left(self, site: str) -> None:
        """``site``'s task closed (it reported that it cannot go on): it will answer no further stage."""
        if self.ended is None and site in self.config.sites:
            self.left.add(site)
            self._close_if_decided()

    def _close_if_decided(self) -> None:
        """Close the stage now, as its timeout would later, when every site still awaited has left: waiting
        can change nothing. (A stage that only some departed sites keep from its threshold still waits for
        the others, so that each site that refuses the round reports its own reason.)"""
        awaiting = self.server.awaiting()
        if self.ended is None and awaiting and awaiting <= self.left:
            log.info(
                "secure round %s: %s stage closes now: %s, still awaited, left the round",
                self.round_id,
                self.server.stage.value,
                sorted(awaiting),
            )
            self.close()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _end(self, reason: str) -> None:
        self.ended = reason
        if self._timer is not None:
            self._timer.cancel()
        self.outbox.clear()
        self._wake()

    def abort(self, reason: str) -> None:
        if self.ended is None:
            if self.server.stage not in (Stage.DONE, Stage.FAILED):
                self.server.abort(reason)
            self._end(reason)

    async def next_message(self, site: str, stage_name: str, wait: float) -> bytes | None:
        """The server's message to ``site`` after ``stage_name`` closes (long-poll); None if not yet."""
        stage = STAGES.get(stage_name)
        if stage is None or stage is Stage.UNMASK:
            raise InputError(f"no message follows the {stage_name!r} stage")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait
        while True:
            closed = self.outbox.get(stage)
            if closed is not None:
                if site in closed:
                    return closed[site]
                raise SecureRoundGone(
                    f"this site dropped out at the {self.dropped_at.get(site, stage).value} stage"
                )
            if self.ended is not None:
                raise SecureRoundGone(self.ended)
            remaining = give_up - loop.time()
            if remaining <= 0:
                return None
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=remaining)
            except TimeoutError:
                return None

    def result(self) -> AggregateResult:
        return self.server.result()

    def can_join(self, site: str) -> bool:
        """Whether ``site`` may still start this round: only before it advertised keys, at that stage. A site
        that already took part (or restarted, losing its round keys) is not handed the task again."""
        return (
            self.ended is None
            and self.server.stage is Stage.ADVERTISE_KEYS
            and site in self.server.expected()
            and site not in self.server.answered()
        )


def round_config(
    spec: StudySpec, kind: TaskKind, *, study_id: str, number: int, attempt: str, sites: list[str]
) -> SecAggConfig:
    """A round's SecAgg+ configuration. Everything but the participants (``sites`` that the spec names for
    ``kind``) comes from the approved spec, which each site checks the round against: the threshold follows
    the spec's site list for the kind, not how many sites are here. Raises ``ConfigError`` if the round
    cannot be held (e.g. fewer sites than the threshold)."""
    plan = secure_round_plan(spec, kind)
    return SecAggConfig(
        study_id=f"{study_id}/{attempt}",
        round=number,
        sites=tuple(sorted(set(sites) & set(plan.sites))),
        threshold=plan.threshold,
        collusion=plan.collusion,
        vector_length=secure_codec(spec, kind).length,
        full_graph_max_sites=plan.full_graph_max_sites,
        neighbourhood_size=plan.neighbourhood_size,
    )


class SecureRounds:
    """The open secure rounds of this orchestrator process, and their open tasks (task id -> site, round)."""

    def __init__(self) -> None:
        self._drivers: dict[str, SecureRoundDriver] = {}
        self._tasks: dict[str, tuple[str, str]] = {}

    def start(
        self,
        *,
        round_id: str,
        study_id: str,
        number: int,
        kind: TaskKind,
        spec: StudySpec,
        sites: list[str],
        identities: dict[str, str],
        on_done: Callable[[str], None],
        on_failed: Callable[[str, str], None],
        tasks: Mapping[str, str] | None = None,
    ) -> SecureRoundDriver:
        """Start the round's SecAgg+ server; ``tasks`` maps the round's open task ids to their sites, for
        :meth:`by_task` (the engine calls :meth:`task_closed` when one closes)."""
        sa = spec.secure_aggregation
        assert sa is not None
        attempt = secrets.token_hex(8)
        config = round_config(spec, kind, study_id=study_id, number=number, attempt=attempt, sites=sites)
        ordered = list(config.sites)
        codec = secure_codec(spec, kind)
        server = SecAggServer(
            config, identities={s: PublicIdentity(bytes.fromhex(identities[s])) for s in ordered}
        )
        driver = SecureRoundDriver(
            round_id=round_id,
            kind=kind,
            codec=codec,
            config=config,
            server=server,
            peer_keys={s: identities[s] for s in ordered},
            attempt=attempt,
            stage_timeout_s=sa.stage_timeout_s,
            on_done=on_done,
            on_failed=on_failed,
        )
        self.discard(round_id, "the round restarted with fresh keys")
        self._drivers[round_id] = driver
        self._tasks.update((task_id, (site, round_id)) for task_id, site in (tasks or {}).items())
        driver.arm()
        log.info(
            "secure round %s (%s, attempt %s): %d sites, threshold %d, vector %d",
            round_id,
            kind.value,
            attempt,
            len(ordered),
            config.threshold,
            codec.length,
        )
        return driver

    def get(self, round_id: str) -> SecureRoundDriver | None:
        return self._drivers.get(round_id)

    def by_task(self, task_id: str) -> tuple[str, SecureRoundDriver] | None:
        """The site and round driver of an open task of a running secure round; None if this process does not
        hold one (the caller then reads the task). A task closed by another orchestrator process sharing the
        database is not seen here, as this process's round rules do not see it either."""
        held = self._tasks.get(task_id)
        if held is None:
            return None
        driver = self._drivers.get(held[1])
        return (held[0], driver) if driver is not None else None

    def task_closed(self, task_id: str) -> None:
        """A task closed: from now on its site's messages are answered as for any closed task (410), and its
        round stops waiting for that site."""
        held = self._tasks.pop(task_id, None)
        if held is not None:
            site, round_id = held
            driver = self._drivers.get(round_id)
            if driver is not None:
                driver.site_left(site)

    def not_joinable(self, task: TaskRow, round_row: RoundRow) -> bool:
        """For task delivery: a secure round's task the site can no longer join is not handed out."""
        driver = self._drivers.get(round_row.id)
        return driver is not None and not driver.can_join(task.site)

    def discard(self, round_id: str, reason: str) -> None:
        driver = self._drivers.pop(round_id, None)
        if driver is not None:
            driver.abort(reason)
            for task_id in [t for t, (_, r) in self._tasks.items() if r == round_id]:
                del self._tasks[task_id]

    def close(self) -> None:
        for round_id in list(self._drivers):
            self.discard(round_id, "the orchestrator is shutting down")


def result_vector(result: AggregateResult) -> np.ndarray:
    return np.asarray(result.vector, dtype=np.uint32)
