"""The round engine: opens rounds, closes them at quorum-or-deadline, aggregates, and moves studies on.

The rules themselves (when a round closes, its quorum, what a failed secure sum or session does, what opens
next, when the study finishes or fails) are not here: they are :class:`fedhealth.runtime.RoundState`'s,
which the in-memory runner drives too. The engine is their driver against the database and the agent API:
it turns task closures, deadlines and the ends of secure sums and sessions into the machine's events, and
carries out its commands (closing tasks, aggregating, recording the round's end and opening the next one).

It runs on the orchestrator's event loop. All durable state is in the store; the engine's own memory holds
only timers and each open round's ``RoundState`` (rebuilt from the round's tasks), so after a crash
:meth:`RoundEngine.recover` rebuilds it from the database: a round that was open stays open (results
already received are kept) with a fresh deadline, and the study continues from its last completed round.

A study starts only once every site it names has reported its data steward's approval of the exact spec
hash (:meth:`RoundEngine.approval_reported`); until then it is ``awaiting_approval``, and it fails with the
names of the sites that did not approve when a site rejects the spec or its approval deadline passes. The
sites' gates still check the approval on every task: the orchestrator's wait is a courtesy to researchers
(no round 1 that fails for want of a decision), not the enforcement.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from fedhealth.core import (
    Clock,
    ConfigError,
    FedHealthError,
    InputError,
    decode_tensors,
    encode_tensors,
    sha256_hex,
)
from fedhealth.governance import spec_hash
from fedhealth.orchestrator._blobs import BlobKind, BlobStore
from fedhealth.orchestrator._collective import CollectiveSessions
from fedhealth.orchestrator._hooks import StudyObserver
from fedhealth.orchestrator._notify import TaskNotifier
from fedhealth.orchestrator._report import HELD_OUT_WITHHELD, write_report
from fedhealth.orchestrator._secure import SecureRounds
from fedhealth.orchestrator._store import (
    ModelVersion,
    NewRound,
    RoundRow,
    SiteStatus,
    Store,
    StudyRow,
    TaskRow,
)
from fedhealth.privacy import secure_generator
from fedhealth.protocol import (
    ApprovalState,
    DpMode,
    FailureCode,
    RoundStatus,
    SiteAttestation,
    StudySpec,
    StudyStatus,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import (
    SCALING_ROUND,
    AbandonSession,
    Aggregate,
    Aggregated,
    AggregationFailed,
    CloseTasks,
    Combination,
    ConcludeSecureSum,
    ConcludeSession,
    DeadlinePassed,
    FailStudy,
    FinishStudy,
    OpenRound,
    Resumed,
    RetrySession,
    RoundCommand,
    RoundEvent,
    RoundPhase,
    RoundState,
    SecureSum,
    SecureSumDone,
    SecureSumFailed,
    SecureSumRejected,
    SessionDone,
    SessionFailed,
    StudyRules,
    TaskClosed,
    TaskOutcome,
    aggregate,
    central_noise_on_mean,
    check_recipe,
    decode_sum,
    decode_update,
    finish_scaling,
    finish_session,
    first_round,
    initial_model,
    is_collective,
    param_specs,
    participation_of,
    recipe_capabilities,
    server_step,
    study_recipe,
    summarize,
)
from fedhealth.secagg import SessionFailure, Stage

log = logging.getLogger("fedhealth.orchestrator")

# The reason a task of a revoked site is closed with (failed, as a site's own "cannot do it" is): the round
# goes on without the site instead of waiting for it until its deadline.
REVOKED_TASK_REASON = "site_revoked: the site was revoked by an admin"
# How long closing the engine waits for its background work (a report in a worker thread) to end.
BACKGROUND_CLOSE_S = 30.0
# How long a submitted study waits for its sites' approvals unless its submission says otherwise.
DEFAULT_APPROVAL_WAIT_S = 7 * 24 * 3600.0


def _held_out_withheld(spec: StudySpec, kind: TaskKind, tasks: Sequence[TaskRow]) -> list[str]:
    """The sites of a round that withheld their held-out metrics: a site releases none computed from fewer
    than its ``min_cohort_k`` held-out patients after consent (docs/privacy.md). A training round's task
    then completes with no held-out figure; an evaluation task is refused with ``min_cohort_k``. A recipe
    that reads no data, and a training round under site-level DP (its local model is never described),
    report none by design: nobody withheld anything there. Under secure aggregation a training round's
    figures are inside the sum (a withholding site adds zeros), so only refused evaluations can be named."""
    if not recipe_capabilities(spec.recipe).reads_data:
        return []
    if kind is TaskKind.TRAIN and spec.privacy is not None and spec.privacy.mode is not DpMode.RECORD:
        return []

    def withheld(t: TaskRow) -> bool:
        if t.status is TaskStatus.COMPLETED:
            return t.metrics is not None and t.metrics.num_eval_samples == 0
        code = (t.reason or "").partition(": ")[0]
        return kind is TaskKind.EVALUATE and t.status is TaskStatus.FAILED and code == FailureCode.MIN_COHORT

    return sorted(t.site for t in tasks if withheld(t))


@dataclass
class _Closing:
    """What one drive of a round's rules carries from a command to the next (the aggregation's outputs for
    the round's end); nothing of it outlives the drive."""

    round: RoundRow | None = None
    study: StudyRow | None = None
    contributors: int = 0
    model_out: str | None = None
    state_out: str | None = None
    metrics: dict[str, Any] | None = None
    session_calls: int = 0
    at: datetime | None = None


class RoundEngine:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        clock: Clock,
        notifier: TaskNotifier,
        reports_dir: Path | None = None,
        observers: Sequence[StudyObserver] = (),
        approval_wait_s: float = DEFAULT_APPROVAL_WAIT_S,
    ) -> None:
        self.approval_wait_s = approval_wait_s
        self._approval_timers: dict[str, asyncio.TimerHandle] = {}
        self.observers: list[StudyObserver] = list(observers)
        self.store = store
        self.blobs = blobs
        self.clock = clock
        self.notifier = notifier
        self.reports_dir = reports_dir
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._rounds: dict[str, RoundState] = {}  # the rules of each open round this process drives
        self._background: set[asyncio.Task[Any]] = set()
        self._reports: set[asyncio.Future[None]] = set()  # reports being written in worker threads
        self.secure = SecureRounds()
        self.collective = CollectiveSessions()

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def recover(self) -> None:
        """Re-arm every open round after a start-up; finish those whose tasks are all closed already."""
        now = self.clock.now()
        for r in self.store.open_rounds():
            spec = self.store.spec(r.study_id)
            deadline = now + timedelta(seconds=spec.round_deadline_s)
            self.store.set_deadline(r.id, deadline)
            log.info("resuming study %s at round %d (%s)", r.study_id, r.number, r.kind.value)
            self._opened(self.store.get_round(r.id))
            await self.task_closed(r.id)
        for study in self.store.awaiting_studies():
            assert study.approval_deadline_at is not None
            self._arm_approval(study.id, study.approval_deadline_at)
            await self._check_approvals(study)

    async def close(self) -> None:
        self.secure.close()
        self.collective.close()
        for handle in [*self._timers.values(), *self._approval_timers.values()]:
            handle.cancel()
        self._timers.clear()
        self._approval_timers.clear()
        self._rounds.clear()
        for task in list(self._background):
            task.cancel()
        if self._reports:
            # A report being written in a worker thread goes on when its task is cancelled, and it queries
            # the database, which the service disposes of next: wait for it (a CI run dropped a test's schema
            # under one: "relation rounds does not exist", and a connection was left open).
            await asyncio.wait(list(self._reports), timeout=BACKGROUND_CLOSE_S)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _arm(self, round_id: str, deadline: datetime) -> None:
        delay = max(0.0, (deadline - self.clock.now()).total_seconds())
        loop = asyncio.get_running_loop()
        old = self._timers.pop(round_id, None)
        if old is not None:
            old.cancel()
        self._timers[round_id] = loop.call_later(delay, lambda: self._spawn(self.finalize(round_id)))

    # --- studies -----------------------------------------------------------------------------------------

    async def create_study(
        self, spec: StudySpec, owner: str = "admin", *, approval_wait_s: float | None = None
    ) -> StudyRow:
        """Store a submitted study. It runs at once if every site it names has approved its spec hash
        already; otherwise it waits for their approvals for ``approval_wait_s`` (default: the engine's)."""
        check_recipe(spec)  # an unknown recipe or version, or params it refuses: 422 with "field: rule"
        if spec.secure_aggregation is not None:
            self._check_site_keys(spec)
        for observer in self.observers:
            # may refuse the study; in a thread, as checks can take seconds (noise calibration)
            await anyio.to_thread.run_sync(observer.check_study, spec, owner)
        # its sites before its model: a study refused for them leaves no blob behind
        self.store.check_study_sites({*spec.train_sites, *spec.evaluation_sites})
        # a collective study has no model: its one session round starts from the empty one
        params = {} if is_collective(spec) else initial_model(spec.recipe, spec.seed)
        digest = self.blobs.put(encode_tensors(params))
        now = self.clock.now()
        digest_of_spec = spec_hash(spec.model_dump(mode="json"))
        named = sorted({*spec.train_sites, *spec.evaluation_sites})
        approvals = self.store.approvals_of(digest_of_spec, named)
        approved = all(state is ApprovalState.APPROVED for state in approvals.values())
        first = self._first_round(spec, digest, now) if approved else None
        wait = self.approval_wait_s if approval_wait_s is None else approval_wait_s
        approval_deadline = now + timedelta(seconds=wait)
        study, round_row = self.store.create_study(
            spec=spec,
            model_digest=digest,
            state_digest=None,
            first=first,
            when=now,
            spec_hash=digest_of_spec,
            approval_deadline_at=approval_deadline,
        )
        log.info(
            "study %s (%s) created: %d rounds over %d sites%s",
            study.id,
            spec.name,
            spec.rounds,
            len(spec.train_sites),
            "" if approved else f"; awaiting the approval of {', '.join(self._not_approved(approvals))}",
        )
        self._notify("study_created", study, owner)
        if round_row is not None:
            self._opened(round_row)
        else:
            self._arm_approval(study.id, approval_deadline)
            await self._check_approvals(study)
        return self.store.get_study(study.id)

    @staticmethod
    def _first_round(spec: StudySpec, model_digest: str, now: datetime) -> NewRound:
        first = first_round(StudyRules.of(spec), now)
        return NewRound(
            number=first.number,
            kind=first.kind,
            sites=first.sites,
            model_in_digest=model_digest,
            deadline_at=first.deadline_at,
        )

    def _check_site_keys(self, spec: StudySpec) -> None:
        """A secure study's fingerprints must be the sites' enrolled keys: every site would refuse its rounds
        otherwise (the spec is what the stewards approve; the sites check each round against it)."""
        assert spec.secure_aggregation is not None
        wrong = []
        for site, fingerprint in sorted(spec.secure_aggregation.site_keys.items()):
            row = self.store.get_site_or_none(site)
            if row is None or row.public_key is None:
                wrong.append(f"{site} (not enrolled)")
            elif sha256_hex(bytes.fromhex(row.public_key)) != fingerprint:
                wrong.append(f"{site} (enrolled key {sha256_hex(bytes.fromhex(row.public_key))[:16]}...)")
        if wrong:
            raise InputError(
                "secure_aggregation.site_keys does not match the enrolled identity keys of "
                + ", ".join(wrong)
            )

    async def cancel_study(self, study_id: str, reason: str) -> None:
        if self.store.end_study(study_id, StudyStatus.CANCELLED, reason, self.clock.now()):
            self._disarm_approval(study_id)
            for r in self.store.rounds_of(study_id):
                self._rounds.pop(r.id, None)
                handle = self._timers.pop(r.id, None)
                if handle is not None:
                    handle.cancel()
                self.secure.discard(r.id, reason)
                self.collective.discard(r.id, reason)
            self._study_ended(study_id)

    # --- approvals -----------------------------------------------------------------------------------------

    async def approval_reported(self, site: str, digest: str, state: ApprovalState) -> None:
        """A site reported its steward's decision on a spec hash: start or fail the studies waiting on it."""
        self.store.record_approval(site, digest, state, self.clock.now())
        for study in self.store.awaiting_studies(digest):
            if site in study.named_sites:
                await self._check_approvals(study)

    @staticmethod
    def _not_approved(approvals: dict[str, ApprovalState]) -> list[str]:
        return [site for site, state in approvals.items() if state is not ApprovalState.APPROVED]

    async def _check_approvals(self, study: StudyRow) -> None:
        """Start an awaiting study whose sites all approved; fail one that a site rejected."""
        assert study.spec_hash is not None
        approvals = self.store.approvals_of(study.spec_hash, study.named_sites)
        rejected = [site for site, state in approvals.items() if state is ApprovalState.REJECTED]
        if rejected:
            self._end_awaiting(
                study.id,
                f"not approved: the data steward of {', '.join(rejected)} rejected spec "
                f"{study.spec_hash[:12]}",
            )
            return
        if self._not_approved(approvals):
            return
        row = self.store.start_study(
            study.id, self._first_round(study.spec, study.model_digest, self.clock.now()), self.clock.now()
        )
        if row is None:
            return  # started or ended meanwhile
        self._disarm_approval(study.id)
        log.info("study %s approved by every site it names: round 1 opens", study.id)
        self._opened(row)

    def _arm_approval(self, study_id: str, deadline: datetime) -> None:
        delay = max(0.0, (deadline - self.clock.now()).total_seconds())
        self._disarm_approval(study_id)
        self._approval_timers[study_id] = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._approval_deadline(study_id))
        )

    def _disarm_approval(self, study_id: str) -> None:
        handle = self._approval_timers.pop(study_id, None)
        if handle is not None:
            handle.cancel()

    async def _approval_deadline(self, study_id: str) -> None:
        self._approval_timers.pop(study_id, None)
        study = self.store.get_study(study_id)
        if study.status is not StudyStatus.AWAITING_APPROVAL or study.spec_hash is None:
            return
        missing = self._not_approved(self.store.approvals_of(study.spec_hash, study.named_sites))
        if not missing:  # every approval arrived in the same instant
            await self._check_approvals(study)
            return
        self._end_awaiting(study_id, f"approval deadline passed: not approved by {', '.join(missing)}")

    def _end_awaiting(self, study_id: str, reason: str) -> None:
        ended = self.store.end_study(
            study_id, StudyStatus.FAILED, reason, self.clock.now(), only_from=StudyStatus.AWAITING_APPROVAL
        )
        if ended:
            self._disarm_approval(study_id)
            log.warning("study %s failed: %s", study_id, reason)
            self._study_ended(study_id)

    # --- rounds: the driver of the round rules (fedhealth.runtime.RoundState) ------------------------------

    async def task_closed(self, round_id: str, task_id: str | None = None) -> None:
        """Called after task ``task_id`` of ``round_id`` closed; without a task, takes the round up again
        after a restart (it closes at once if every task closed meanwhile). The round's rules decide."""
        if task_id is None:
            await self._drive(round_id, Resumed())
            return
        task = self.store.get_task(task_id)
        self._notify("task_closed", task)
        if not task.is_open:
            self.secure.task_closed(task.id)
            await self._drive(round_id, TaskClosed(site=task.site, status=task.status, reason=task.reason))

    async def close_revoked_tasks(self, site: str) -> None:
        """``site`` was revoked: its open tasks close as failed now (:data:`REVOKED_TASK_REASON`) and their
        rounds go on without it, as after any site's failure. A revoked site never answers again, so they
        would otherwise wait for it until their deadline. Not on a rotation: the re-keyed site may still
        enroll again and finish them."""
        await self._close_revoked(self.store.open_tasks_of_site(site))

    async def _close_revoked(self, revoked: Sequence[TaskRow]) -> None:
        for task in revoked:  # each still open (another path may have closed it meanwhile) closes and counts
            if self.store.close_task(task.id, TaskStatus.FAILED, REVOKED_TASK_REASON, self.clock.now()):
                log.warning("task %s closed: its site %s is revoked", task.id, task.site)
                await self.task_closed(task.round_id, task.id)

    async def finalize(self, round_id: str) -> None:
        """The round's deadline passed: it closes with the results it has."""
        await self._drive(round_id, DeadlinePassed())

    def _round_state(self, round_id: str) -> tuple[RoundState | None, bool]:
        """The rules of an open round, and whether they were just read from the database (a round this
        process did not open: it may have closed its last task meanwhile)."""
        state = self._rounds.get(round_id)
        if state is not None:
            return state, False
        r = self.store.get_round(round_id)
        if r.status is not RoundStatus.OPEN:
            return None, False
        return self._load_round(r, self.store.tasks_of_round(round_id)), True

    def _load_round(self, r: RoundRow, tasks: Sequence[TaskRow]) -> RoundState:
        state = RoundState(
            StudyRules.of(self.store.spec(r.study_id)),
            number=r.number,
            kind=r.kind,
            tasks=[TaskOutcome(site=t.site, status=t.status, reason=t.reason) for t in tasks],
        )
        self._rounds[r.id] = state
        return state

    async def _drive(self, round_id: str, event: RoundEvent) -> None:
        """Feed ``event`` to the round's rules, then carry out their commands in order, feeding back what a
        command reports (how a secure sum or session ended, how the aggregation went) until none is left."""
        state, loaded = self._round_state(round_id)
        if state is None:
            return
        pending = deque(state.handle(Resumed()) if loaded else ())
        pending.extend(state.handle(event))
        closing = _Closing()
        while pending:
            command = pending.popleft()
            try:
                answer = await self._carry_out(round_id, state, command, closing)
            except FedHealthError as exc:
                log.exception("round %s could not be finished", round_id)
                answer = AggregationFailed(reason=f"round could not be aggregated: {exc}")
            except Exception as exc:  # never leave a round hanging on a bug: fail the study with the reason
                log.exception("internal error finishing round %s", round_id)
                answer = AggregationFailed(
                    reason=f"internal error while aggregating: {type(exc).__name__}: {exc}"
                )
            if answer is None:
                continue
            if state.phase is RoundPhase.ENDED and isinstance(answer, AggregationFailed):
                # The rules' last word (open the next round, finish the study) could not be written: the
                # round must not hang open without rules or a deadline, so it fails with the reason.
                self._fail(round_id, FailStudy(round=state.number, reason=answer.reason))
                continue
            pending.extend(state.handle(answer))

    async def _carry_out(
        self, round_id: str, state: RoundState, command: RoundCommand, closing: _Closing
    ) -> RoundEvent | None:
        match command:
            case CloseTasks():
                self._close_tasks(round_id, state, command)
            case ConcludeSecureSum():
                return self._secure_outcome(round_id)
            case ConcludeSession():
                return self._session_outcome(round_id)
            case AbandonSession(reason=reason):
                driver = self.collective.get(round_id)
                if driver is not None and driver.ended is None:
                    # no dropout recovery: the session fails for everyone; its on_failed reports back
                    driver.fail(SessionFailure.SITE_LOST, reason)
                # else its end is on its way already (its on_done or on_failed was called)
            case Aggregate(contributors=contributors):
                return await self._aggregate(round_id, state, contributors, closing)
            case OpenRound():
                self._advance(round_id, command, closing)
            case RetrySession():
                self._retry(round_id, state, command)
            case FinishStudy(note=note):
                self._finish(round_id, state, note, closing)
            case FailStudy():
                self._fail(round_id, command, closing)
        return None

    def _close_tasks(self, round_id: str, state: RoundState, command: CloseTasks) -> None:
        """Close the tasks the rules closed. A plain round's late tasks close one by one; a secure round's or
        session's all at once (one transaction, one notification that observers may write in one go), with
        what each site attested and, for a secure dropout, the stage it dropped out at."""
        now = self.clock.now()
        tasks = {t.site: t for t in self.store.tasks_of_round(round_id)}
        if state.combination is Combination.PLAIN:
            for outcome in command.outcomes:
                task = tasks[outcome.site]
                if self.store.close_task(task.id, outcome.status, outcome.reason or "", now):
                    self._notify("task_closed", self.store.get_task(task.id))
            return
        secure = self.secure.get(round_id)
        session = self.collective.get(round_id)
        attestations = secure.attestations if secure is not None else {}
        if session is not None:
            attestations = session.attestations
        outcomes: dict[str, tuple[TaskStatus, str | None, SiteAttestation | None]] = {}
        for outcome in command.outcomes:
            reason = outcome.reason
            stage = secure.dropped_at.get(outcome.site) if secure is not None else None
            if stage is not None and outcome.status is not TaskStatus.COMPLETED:
                reason = f"dropped out of secure aggregation at the {stage.value} stage"
            outcomes[tasks[outcome.site].id] = (outcome.status, reason, attestations.get(outcome.site))
        closed = set(self.store.close_tasks(outcomes, now))
        for task_id in closed:
            self.secure.task_closed(task_id)
        if closed:
            self._notify("tasks_closed", [t for t in self.store.tasks_of_round(round_id) if t.id in closed])

    def _secure_outcome(self, round_id: str) -> SecureSumDone | SecureSumFailed:
        """How the round's secure sum ended (its result stands if it completed before the round closed)."""
        driver = self.secure.get(round_id)
        if driver is None or driver.server.stage is not Stage.DONE:
            stage = driver.server.stage.value if driver is not None else "unknown"
            return SecureSumFailed(
                reason=f"secure aggregation did not finish (at the {stage} stage by the deadline)"
            )
        result = driver.result()
        if result.misbehaving:  # the sum is right (rebuilt from the right shares); a lead worth logging
            log.warning(
                "round %s: %s revealed a secret share off its owner's polynomial (a wrong share, or one its "
                "owner dealt wrong); the sum was rebuilt without it",
                round_id,
                ", ".join(result.misbehaving),
            )
        return SecureSumDone(contributors=tuple(result.contributors))

    async def _secure_settled(self, round_id: str) -> None:
        await self._drive(round_id, self._secure_outcome(round_id))

    def _session_outcome(self, round_id: str) -> SessionDone | SessionFailed:
        """How the round's collective session ended (or, still running, why it did not finish)."""
        driver = self.collective.get(round_id)
        if driver is not None and driver.done:
            return SessionDone()
        reason = driver.ended if driver is not None and driver.ended else None
        return SessionFailed(
            reason=reason
            or (
                "the collective session did not finish by the round deadline"
                + (f" ({driver.relay.calls} calls done)" if driver is not None else "")
            )
        )

    def _opened(self, r: RoundRow) -> None:
        """A round was opened (or reopened after a restart): take up its rules, arm its deadline, start its
        secure protocol or collective session if the study uses one, and wake its sites' long polls."""
        tasks = self.store.tasks_of_round(r.id)
        state = self._load_round(r, tasks)
        self._arm(r.id, r.deadline_at)
        spec = self.store.spec(r.study_id)
        if state.combination is Combination.SESSION:
            self._open_collective(r, spec, tasks)
        elif state.combination is Combination.SECURE:
            keys = {}
            revoked_sites = []
            for t in tasks:
                site = self.store.get_site_or_none(t.site)
                # a revoked site is no participant: its task closes below (site_revoked), as the round opens
                if site is not None and site.status is SiteStatus.REVOKED:
                    revoked_sites.append(t.site)
                elif site is not None and site.public_key is not None:
                    keys[t.site] = site.public_key
            try:
                self.secure.start(
                    round_id=r.id,
                    study_id=r.study_id,
                    number=r.number,
                    kind=r.kind,
                    spec=spec,
                    sites=sorted(keys),
                    identities=keys,
                    on_done=lambda rid: self._spawn(self._secure_settled(rid)),
                    on_failed=lambda rid, reason: self._spawn(
                        self._drive(rid, SecureSumFailed(reason=reason))
                    ),
                    tasks={t.id: t.site for t in tasks if t.is_open and t.site in keys},
                )
            except ConfigError as exc:  # e.g. fewer enrolled sites than the spec's threshold
                reason = f"secure aggregation cannot start: {exc}"
                if revoked_sites:  # the round cannot be held without them: its reason names them
                    reason += f" (without {', '.join(sorted(revoked_sites))}: {REVOKED_TASK_REASON})"
                failed = SecureSumFailed(reason=reason)
                revoked_tasks = [t for t in tasks if t.is_open and t.site in revoked_sites]
                self._spawn(self._secure_cannot_start(r.id, revoked_tasks, failed))
        self.notifier.notify([t.site for t in tasks if t.is_open])
        # a site revoked while its study runs is still named by its spec: its task in each later round
        # fails at once (as if the site had said it cannot do it) rather than waiting out the deadline
        if revoked := [t for t in tasks if t.is_open and self._is_revoked(t.site)]:
            self._spawn(self._close_revoked(revoked))

    async def _secure_cannot_start(
        self, round_id: str, revoked: Sequence[TaskRow], failed: SecureSumFailed
    ) -> None:
        """A secure round that cannot start fails; the tasks of its revoked sites close first, as the round
        opens, with their own reason (the round's failure would otherwise close them as dropped out of the
        secure sum). They close in the store only: the round's rules learn of them with its failure, driven
        at once, which leaves them as they are (a round whose every task was a revoked site's would
        otherwise close at its last one as a secure sum that did not finish)."""
        for task in revoked:
            if self.store.close_task(task.id, TaskStatus.FAILED, REVOKED_TASK_REASON, self.clock.now()):
                log.warning("task %s closed: its site %s is revoked", task.id, task.site)
                self._notify("task_closed", self.store.get_task(task.id))
        await self._drive(round_id, failed)

    def _is_revoked(self, site: str) -> bool:
        row = self.store.get_site_or_none(site)
        return row is not None and row.status is SiteStatus.REVOKED

    def not_joinable(self, task: TaskRow, round_row: RoundRow) -> bool:
        """For task delivery: a task its site can no longer join (a secure round or session under way)."""
        return self.secure.not_joinable(task, round_row) or self.collective.not_joinable(task, round_row)

    def _open_collective(self, r: RoundRow, spec: StudySpec, round_tasks: Sequence[TaskRow]) -> None:
        """Start the session of a collective round; its tasks go out with the session's set-up."""
        tasks = {t.id: t.site for t in round_tasks if t.is_open}
        keys = {}
        for site_name in tasks.values():
            site = self.store.get_site_or_none(site_name)
            if site is not None and site.public_key is not None:
                keys[site_name] = site.public_key
        try:
            self.collective.start(
                round_id=r.id,
                study_id=r.study_id,
                number=r.number,
                spec=spec,
                tasks=tasks,
                identities=keys,
                on_done=lambda rid: self._spawn(self._drive(rid, SessionDone())),
                on_failed=lambda rid, reason: self._spawn(self._drive(rid, SessionFailed(reason=reason))),
            )
        except ConfigError as exc:  # e.g. a participant without an enrolled key
            failed = SessionFailed(reason=f"the collective session cannot start: {exc}")
            self._spawn(self._drive(r.id, failed))

    # --- aggregation and the end of a round -----------------------------------------------------------------

    async def _aggregate(
        self, round_id: str, state: RoundState, contributors: tuple[str, ...], closing: _Closing
    ) -> Aggregated | AggregationFailed:
        """Combine a counted round: the model step of a training round, the figures of an evaluation, the
        result a session released. Heavy work runs in a worker thread, off the event loop."""
        r = self.store.get_round(round_id)
        study = self.store.get_study(r.study_id)
        closing.round, closing.study, closing.contributors = r, study, len(contributors)
        match state.combination, r.kind:
            case Combination.SESSION, _:
                scaling = state.rules.scaling_step and r.number == SCALING_ROUND
                failure = self._aggregate_session(round_id, study.spec, closing, scaling=scaling)
                if scaling:  # the pre-step changes no model: round 1 trains the initial one
                    closing.model_out = r.model_in_digest
            case Combination.SECURE, _:
                failure = await self._aggregate_secure(r, study, closing)
            case _, TaskKind.TRAIN:
                failure = await self._aggregate_updates(r, study, contributors, closing)
            case _:
                tasks = self.store.tasks_of_round(round_id)
                completed = [t for t in tasks if t.site in contributors and t.metrics is not None]
                metrics = summarize(
                    study.spec.strategy, [t.metrics for t in completed if t.metrics is not None]
                )
                withheld = _held_out_withheld(study.spec, r.kind, tasks)
                # a site that withheld its figures answered with none: no row of its own in the table
                metrics["per_site"] = {
                    t.site: t.metrics.model_dump(mode="json")
                    for t in completed
                    if t.metrics is not None and t.site not in withheld
                }
                if withheld:
                    metrics[HELD_OUT_WITHHELD] = withheld
                closing.metrics = metrics
                failure = None
        if failure is not None:
            return AggregationFailed(reason=failure)
        closing.at = self.clock.now()
        return Aggregated(at=closing.at)

    async def _aggregate_updates(
        self, r: RoundRow, study: StudyRow, contributors: tuple[str, ...], closing: _Closing
    ) -> str | None:
        spec = study.spec
        completed = [t for t in self.store.tasks_of_round(r.id) if t.site in contributors]
        specs = param_specs(spec.recipe)

        def compute() -> tuple[str, str | None]:
            global_params, _ = decode_tensors(self.blobs.get(r.model_in_digest), specs)
            state: dict[str, Any] = {}
            if study.state_digest:
                state, _ = decode_tensors(self.blobs.get(study.state_digest))
            updates = []
            for t in completed:  # sorted by site name: a fixed order makes the float sums reproducible
                assert t.result_digest is not None
                assert t.num_samples is not None
                delta, _ = decode_update(self.blobs.get(t.result_digest, kind=BlobKind.UPDATE), specs)
                updates.append((t.num_samples, delta))
            new_params, new_state = aggregate(spec.strategy, global_params, updates, state, spec=spec)
            model_out = self.blobs.put(encode_tensors(new_params))
            state_out = self.blobs.put(encode_tensors(new_state)) if new_state else None
            return model_out, state_out

        closing.model_out, closing.state_out = await anyio.to_thread.run_sync(compute)
        closing.metrics = summarize(
            study.spec.strategy, [t.metrics for t in completed if t.metrics is not None]
        )
        if withheld := _held_out_withheld(spec, r.kind, completed):
            closing.metrics[HELD_OUT_WITHHELD] = withheld
        return None

    async def _aggregate_secure(self, r: RoundRow, study: StudyRow, closing: _Closing) -> str | None:
        spec = study.spec
        driver = self.secure.get(r.id)
        assert driver is not None  # the rules count a secure round only on its sum's result
        result = driver.result()
        codec = driver.codec
        n = len(result.contributors)
        self.secure.discard(r.id, "the round is complete")  # its secrets go before the heavy work starts

        def compute() -> tuple[SecureSum, str | None, str | None]:
            sums = decode_sum(codec, spec, np.asarray(result.vector), n)
            if sums.mean_delta is None:
                return sums, None, None
            specs = param_specs(spec.recipe)
            global_params, _ = decode_tensors(self.blobs.get(r.model_in_digest), specs)
            state: dict[str, Any] = {}
            if study.state_digest:
                state, _ = decode_tensors(self.blobs.get(study.state_digest))
            mean = sums.mean_delta
            if spec.privacy is not None and spec.privacy.mode is DpMode.SITE_CENTRAL:
                mean = central_noise_on_mean(spec, mean, n, secure_generator())
            recipe = study_recipe(spec.recipe)
            new_params, new_state = server_step(
                spec.strategy,
                global_params,
                mean,
                state,
                averaged=recipe.averaged_tensors(),
                control_variates=recipe.control_variate_tensors(),
                participation=participation_of(spec, n),
            )
            model_out = self.blobs.put(encode_tensors(new_params))
            state_out = self.blobs.put(encode_tensors(new_state)) if new_state else None
            return sums, model_out, state_out

        try:
            sums, closing.model_out, closing.state_out = await anyio.to_thread.run_sync(compute)
        except SecureSumRejected as exc:  # a site sent values outside its ranges: nothing of it is used
            log.warning("study %s round %d: %s", study.id, r.number, exc)
            return f"secure sum rejected: {exc}"
        closing.metrics = dict(sums.metrics)
        if withheld := _held_out_withheld(spec, r.kind, self.store.tasks_of_round(r.id)):
            closing.metrics[HELD_OUT_WITHHELD] = withheld
        return None

    def _aggregate_session(
        self, round_id: str, spec: StudySpec, closing: _Closing, *, scaling: bool = False
    ) -> str | None:
        """The session's released result, read by the recipe (or, for a scaling pre-step, as the federated
        scaling), becomes the round's metrics (and a collective study's result)."""
        driver = self.collective.get(round_id)
        assert driver is not None  # the rules count a session round only once its session completed
        outcome = driver.outcome()
        session = {"calls": outcome.calls, "attempt": driver.config.attempt}
        closing.session_calls = outcome.calls
        self.collective.discard(round_id, "the session is complete")
        try:
            if scaling:
                result = finish_scaling(outcome.released)
            else:
                result = finish_session(spec.recipe, outcome.released)
        except (ValueError, FedHealthError) as exc:
            closing.metrics = {"session": session}
            if scaling:  # the pre-step's refusal is its one line (a constant feature, too few rows)
                return str(exc)
            return f"the session's result is unusable: {exc}"
        closing.metrics = {**result, "session": session}
        return None

    def _end_round(self, round_id: str, reason: str) -> None:
        """Forget a round that ended: its rules, its deadline, and its secure sum or session if still held."""
        self._rounds.pop(round_id, None)
        handle = self._timers.pop(round_id, None)
        if handle is not None:
            handle.cancel()
        self.secure.discard(round_id, reason)
        self.collective.discard(round_id, reason)

    def _fail(self, round_id: str, command: FailStudy, closing: _Closing | None = None) -> None:
        r = self.store.get_round(round_id)
        metrics = closing.metrics if closing is not None else None
        driver = self.collective.get(round_id)
        if driver is not None:  # the audit's session entry counts the calls made before the failure
            metrics = {"session": {"calls": driver.relay.calls, "attempt": driver.config.attempt}}
        self._end_round(round_id, command.reason)
        if r.status is RoundStatus.OPEN:
            log.warning("study %s failed: %s", r.study_id, command.study_reason)
            self.store.finish_round(
                round_id,
                status=RoundStatus.FAILED,
                reason=command.reason,
                metrics=metrics,
                when=self.clock.now(),
                study_status=StudyStatus.FAILED,
                study_reason=command.study_reason,
            )
            self._round_done(round_id, None)
            self._study_ended(r.study_id)

    def _retry(self, round_id: str, state: RoundState, command: RetrySession) -> None:
        """Close a failed session round (the study goes on) and open the study's next session round, its
        retry, atomically: the sites resume from what they checkpointed (the recipe's business)."""
        r = self.store.get_round(round_id)
        spec = self.store.spec(r.study_id)
        driver = self.collective.get(round_id)
        metrics = None
        if driver is not None:  # the audit's session entry counts the calls made before the failure
            metrics = {"session": {"calls": driver.relay.calls, "attempt": driver.config.attempt}}
        now = self.clock.now()
        self._end_round(round_id, command.reason)
        nxt = NewRound(
            number=command.number,
            kind=TaskKind.COLLECTIVE,
            sites=command.sites,
            model_in_digest=r.model_in_digest,
            deadline_at=now + timedelta(seconds=spec.round_deadline_s),
        )
        next_row = self.store.finish_round(
            round_id,
            status=RoundStatus.FAILED,
            reason=command.reason,
            metrics=metrics,
            when=now,
            next_round=nxt,
        )
        log.warning(
            "study %s: session round %d failed (%s); retry %d of %d",
            r.study_id,
            r.number,
            command.reason,
            command.number - 1,
            state.rules.session_attempts - 1,
        )
        self._round_done(round_id, None)
        assert next_row is not None
        self._opened(next_row)

    def _advance(self, round_id: str, command: OpenRound, closing: _Closing) -> None:
        """Close a completed training round, record the model version and open the next round, atomically."""
        r, study = closing.round, closing.study
        assert r is not None
        assert study is not None
        assert closing.model_out is not None
        spec = study.spec
        metrics = closing.metrics or {}
        now = closing.at or self.clock.now()
        nxt = NewRound(
            number=command.number,
            kind=command.kind,
            sites=command.sites,
            model_in_digest=closing.model_out,
            deadline_at=command.deadline_at,
        )
        # the scaling pre-step ends with the model it started from: no new model version
        version = (
            None
            if r.kind is TaskKind.COLLECTIVE
            else ModelVersion(
                digest=closing.model_out,
                study_id=study.id,
                round=r.number,
                parent_digest=r.model_in_digest,
                created_at=now,
                num_sites=closing.contributors,
                train_loss=metrics.get("train_loss"),
            )
        )
        self._end_round(round_id, "the round is complete")
        next_row = self.store.finish_round(
            r.id,
            status=RoundStatus.COMPLETED,
            reason=None,
            when=now,
            metrics=metrics,
            model_out=closing.model_out,
            state_out=closing.state_out,
            version=version,
            next_round=nxt,
        )
        log.info(
            "study %s round %d/%d done: %d/%d sites, %s",
            study.id,
            r.number,
            spec.rounds,
            closing.contributors,
            len(spec.train_sites),
            {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
        )
        assert next_row is not None
        self._round_done(r.id, version)  # before the next round's tasks go out: they carry its commitment
        self._opened(next_row)

    def _finish(self, round_id: str, state: RoundState, note: str | None, closing: _Closing) -> None:
        """Close the study's last round (an evaluation, or its session) and the study with it."""
        assert closing.round is not None
        study_id = closing.round.study_id
        metrics = closing.metrics or {}
        self._end_round(round_id, "the round is complete")
        self.store.finish_round(
            round_id,
            status=RoundStatus.COMPLETED,
            reason=note,
            when=self.clock.now(),
            metrics=metrics,
            study_status=StudyStatus.COMPLETED,
            study_reason=note,
        )
        self._round_done(round_id, None)
        if state.kind is TaskKind.COLLECTIVE:
            log.info("study %s completed: collective session of %d calls", study_id, closing.session_calls)
        else:
            how = " (secure)" if state.rules.combination is Combination.SECURE else ""
            shown = {k: v for k, v in metrics.items() if k != "per_site"}
            log.info("study %s completed%s: %s", study_id, how, shown)
        self._study_ended(study_id)

    def _notify(self, event: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:  # an observer's failure must not stop the round engine
                log.exception("observer %s failed on %s", type(observer).__name__, event)

    def _round_done(self, round_id: str, version: ModelVersion | None) -> None:
        r = self.store.get_round(round_id)
        tasks = self.store.tasks_of_round(round_id)
        self._notify("round_finished", self.store.get_study(r.study_id), r, tasks, version)

    def _study_ended(self, study_id: str) -> None:
        self._notify("study_finished", self.store.get_study(study_id))

        async def report() -> None:  # off the event loop: the privacy section may run an accountant
            work = asyncio.ensure_future(anyio.to_thread.run_sync(self._write_report, study_id))
            self._reports.add(work)
            work.add_done_callback(self._reports.discard)
            await asyncio.shield(work)  # cancelled with the engine, the thread goes on: close() waits for it

        self._spawn(report())

    def _write_report(self, study_id: str) -> None:
        if self.reports_dir is not None:
            try:
                write_report(self.store, study_id, self.reports_dir)
            except Exception:  # a report is a convenience: never let it break the round engine
                log.exception("could not write the report of study %s", study_id)
