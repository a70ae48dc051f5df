"""The round engine: opens rounds, closes them at quorum-or-deadline, aggregates, and moves studies on.

It runs on the orchestrator's event loop. All durable state is in the store; the engine's own memory holds
only timers, so after a crash :meth:`RoundEngine.recover` rebuilds it from the database: a round that was
open stays open (results already received are kept) with a fresh deadline, and the study continues from its
last completed round.

A study starts only once every site it names has reported its data steward's approval of the exact spec
hash (:meth:`RoundEngine.approval_reported`); until then it is ``awaiting_approval``, and it fails with the
names of the sites that did not approve when a site rejects the spec or its approval deadline passes. The
sites' gates still check the approval on every task: the orchestrator's wait is a courtesy to researchers
(no round 1 that fails for want of a decision), not the enforcement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
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
from fedhealth.orchestrator._report import write_report
from fedhealth.orchestrator._secure import SecureRounds
from fedhealth.orchestrator._store import ModelVersion, NewRound, RoundRow, Store, StudyRow, TaskRow
from fedhealth.privacy import secure_generator
from fedhealth.protocol import (
    ApprovalState,
    DpMode,
    RoundStatus,
    SiteAttestation,
    StudySpec,
    StudyStatus,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import (
    SecureSum,
    SecureSumRejected,
    aggregate,
    central_noise_on_mean,
    check_recipe,
    decode_sum,
    decode_update,
    finish_session,
    initial_model,
    is_collective,
    param_specs,
    server_step,
    summarize,
)
from fedhealth.secagg import SessionFailure, Stage

log = logging.getLogger("fedhealth.orchestrator")
# How long a submitted study waits for its sites' approvals unless its submission says otherwise.
DEFAULT_APPROVAL_WAIT_S = 7 * 24 * 3600.0


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
        self._finalizing: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
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
        for task in list(self._background):
            task.cancel()

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

    def _open_sites(self, round_id: str) -> list[str]:
        return [t.site for t in self.store.tasks_of_round(round_id) if t.is_open]

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
        return NewRound(
            number=1,
            kind=TaskKind.COLLECTIVE if is_collective(spec) else TaskKind.TRAIN,
            sites=spec.train_sites,
            model_in_digest=model_digest,
            deadline_at=now + timedelta(seconds=spec.round_deadline_s),
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

    # --- rounds ------------------------------------------------------------------------------------------

    async def task_closed(self, round_id: str, task_id: str | None = None) -> None:
        """Called after a task of ``round_id`` closed; finishes the round once every task is closed."""
        if task_id is not None:
            task = self.store.get_task(task_id)
            self._notify("task_closed", task)
            driver = self.collective.get(round_id)
            if driver is not None and task.status is not TaskStatus.COMPLETED and driver.ended is None:
                # no dropout recovery: a participant whose task ended takes the session down with it
                driver.fail(SessionFailure.SITE_LOST, f"{task.site}'s task ended ({task.reason})")
                return
        if self.store.count_open_tasks(round_id) == 0:
            await self.finalize(round_id)

    async def finalize(self, round_id: str) -> None:
        """Close a round with the results it has (at its deadline, or when every task is closed)."""
        if round_id in self._finalizing:
            return
        self._finalizing.add(round_id)
        try:
            r = self.store.get_round(round_id)
            if r.status is not RoundStatus.OPEN:
                return
            handle = self._timers.pop(round_id, None)
            if handle is not None:
                handle.cancel()
            study = self.store.get_study(r.study_id)
            if r.kind is TaskKind.COLLECTIVE:
                await self._finish_collective_round(study, r)
                return
            if study.spec.secure_aggregation is not None:
                await self._finish_secure_round(study, r)
                return
            now = self.clock.now()
            # Close late tasks first: a result arriving from now on is refused, so the set of results we
            # aggregate is exactly the set the database says was completed.
            for t in self.store.tasks_of_round(round_id):
                if t.is_open and self.store.close_task(
                    t.id, TaskStatus.TIMED_OUT, "no result by the round deadline", now
                ):
                    self._notify("task_closed", self.store.get_task(t.id))
            tasks = self.store.tasks_of_round(round_id)
            if r.kind is TaskKind.TRAIN:
                await self._finish_train_round(study, r, tasks)
            else:
                self._finish_evaluation_round(study, r, tasks)
        except FedHealthError as exc:
            log.exception("round %s could not be finished", round_id)
            self._fail(round_id, f"round could not be aggregated: {exc}")
        except Exception as exc:  # never leave a round hanging on a bug: fail the study with the reason
            log.exception("internal error finishing round %s", round_id)
            self._fail(round_id, f"internal error while aggregating: {type(exc).__name__}: {exc}")
        finally:
            self._finalizing.discard(round_id)

    def _opened(self, r: RoundRow) -> None:
        """A round was opened (or reopened after a restart): arm its deadline, start its secure protocol if
        the study uses one, and wake its sites' long polls."""
        self._arm(r.id, r.deadline_at)
        spec = self.store.spec(r.study_id)
        if r.kind is TaskKind.COLLECTIVE:
            self._open_collective(r, spec)
        elif spec.secure_aggregation is not None:
            tasks = self.store.tasks_of_round(r.id)
            keys = {}
            for t in tasks:
                site = self.store.get_site_or_none(t.site)
                if site is not None and site.public_key is not None:
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
                    on_done=lambda rid: self._spawn(self.finalize(rid)),
                    on_failed=lambda rid, reason: self._spawn(self._secure_failed(rid, reason)),
                )
            except ConfigError as exc:  # e.g. fewer enrolled sites than the spec's threshold
                self._spawn(self._secure_failed(r.id, f"secure aggregation cannot start: {exc}"))
        self.notifier.notify(self._open_sites(r.id))

    def not_joinable(self, task: TaskRow, round_row: RoundRow) -> bool:
        """For task delivery: a task its site can no longer join (a secure round or session under way)."""
        return self.secure.not_joinable(task, round_row) or self.collective.not_joinable(task, round_row)

    # --- collective sessions (one session round per collective study) ---------------------------------------

    def _open_collective(self, r: RoundRow, spec: StudySpec) -> None:
        """Start the session of a collective round; its tasks go out with the session's set-up."""
        tasks = {t.id: t.site for t in self.store.tasks_of_round(r.id) if t.is_open}
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
                on_done=lambda rid: self._spawn(self.finalize(rid)),
                on_failed=lambda rid, reason: self._spawn(self._collective_failed(rid, reason)),
            )
        except ConfigError as exc:  # e.g. a participant without an enrolled key
            self._spawn(self._collective_failed(r.id, f"the collective session cannot start: {exc}"))

    async def _collective_failed(self, round_id: str, reason: str) -> None:
        driver = self.collective.get(round_id)
        self._close_collective_tasks(round_id, completed=False, reason=reason)
        self.collective.discard(round_id, reason)
        metrics = None
        if driver is not None:  # the audit's session entry counts the calls made before the failure
            metrics = {"session": {"calls": driver.relay.calls, "attempt": driver.config.attempt}}
        self._fail(round_id, reason, metrics)

    def _close_collective_tasks(self, round_id: str, *, completed: bool, reason: str) -> None:
        """Every open task of the session closes at once: completed with the session, or failed with it."""
        driver = self.collective.get(round_id)
        attestations = driver.attestations if driver is not None else {}
        status = TaskStatus.COMPLETED if completed else TaskStatus.FAILED
        outcomes = {
            t.id: (status, None if completed else reason, attestations.get(t.site))
            for t in self.store.tasks_of_round(round_id)
            if t.is_open
        }
        closed = set(self.store.close_tasks(outcomes, self.clock.now()))
        if closed:
            self._notify("tasks_closed", [t for t in self.store.tasks_of_round(round_id) if t.id in closed])

    async def _finish_collective_round(self, study: StudyRow, r: RoundRow) -> None:
        """The session round closes when its session ends (or at the round's deadline): its released result,
        read by the recipe, becomes the round's and the study's metrics."""
        driver = self.collective.get(r.id)
        if driver is None or not driver.done:
            reason = driver.ended if driver is not None and driver.ended else None
            reason = reason or (
                "the collective session did not finish by the round deadline"
                + (f" ({driver.relay.calls} calls done)" if driver is not None else "")
            )
            await self._collective_failed(r.id, reason)
            return
        outcome = driver.outcome()
        self._close_collective_tasks(r.id, completed=True, reason="")
        self.collective.discard(r.id, "the session is complete")
        session = {"calls": outcome.calls, "attempt": driver.config.attempt}
        try:
            result = finish_session(study.spec.recipe, outcome.released)
        except (ValueError, FedHealthError) as exc:
            self._fail(r.id, f"the session's result is unusable: {exc}", {"session": session})
            return
        metrics = {**result, "session": session}
        self.store.finish_round(
            r.id,
            status=RoundStatus.COMPLETED,
            reason=None,
            when=self.clock.now(),
            metrics=metrics,
            study_status=StudyStatus.COMPLETED,
        )
        self._round_done(r.id, None)
        log.info("study %s completed: collective session of %d calls", study.id, outcome.calls)
        self._study_ended(study.id)

    async def _secure_failed(self, round_id: str, reason: str) -> None:
        self._close_secure_tasks(round_id, contributors=())
        self.secure.discard(round_id, reason)
        self._fail(round_id, reason)

    def _close_secure_tasks(self, round_id: str, contributors: Sequence[str]) -> None:
        """Contributors' tasks complete (without any per-site figure); the others are named as dropped."""
        driver = self.secure.get(round_id)
        outcomes: dict[str, tuple[TaskStatus, str | None, SiteAttestation | None]] = {}
        for t in self.store.tasks_of_round(round_id):
            if not t.is_open:
                continue
            attestation = driver.attestations.get(t.site) if driver is not None else None
            if t.site in contributors:
                outcomes[t.id] = (TaskStatus.COMPLETED, None, attestation)
            else:
                stage = driver.dropped_at.get(t.site) if driver is not None else None
                where = f"at the {stage.value} stage" if stage is not None else "before the round ended"
                outcomes[t.id] = (
                    TaskStatus.TIMED_OUT,
                    f"dropped out of secure aggregation {where}",
                    attestation,
                )
        # Every task of the round closes at once, on the path to the next round: one transaction, and one
        # notification that observers may write in one go.
        closed = set(self.store.close_tasks(outcomes, self.clock.now()))
        if closed:
            self._notify("tasks_closed", [t for t in self.store.tasks_of_round(round_id) if t.id in closed])

    async def _finish_secure_round(self, study: StudyRow, r: RoundRow) -> None:
        spec = study.spec
        driver = self.secure.get(r.id)
        if driver is None or driver.server.stage is not Stage.DONE:
            stage = driver.server.stage.value if driver is not None else "unknown"
            reason = (
                f"round {r.number}: secure aggregation did not finish (at the {stage} stage by the deadline)"
            )
            self._close_secure_tasks(r.id, contributors=())
            self.secure.discard(r.id, reason)
            self._fail(r.id, reason)
            return
        result = driver.result()
        contributors = list(result.contributors)
        self._close_secure_tasks(r.id, contributors)
        self.secure.discard(r.id, "the round is complete")
        needed = spec.min_sites if r.kind is TaskKind.TRAIN else 1
        if len(contributors) < needed:
            self._fail(r.id, f"quorum not met: {len(contributors)} contributor(s), {needed} required")
            return
        codec = driver.codec

        def compute() -> tuple[SecureSum, str | None, str | None]:
            sums = decode_sum(codec, spec, np.asarray(result.vector), len(contributors))
            if sums.mean_delta is None:
                return sums, None, None
            specs = param_specs(spec.recipe)
            global_params, _ = decode_tensors(self.blobs.get(r.model_in_digest), specs)
            state: dict[str, Any] = {}
            if study.state_digest:
                state, _ = decode_tensors(self.blobs.get(study.state_digest))
            mean = sums.mean_delta
            if spec.privacy is not None and spec.privacy.mode is DpMode.SITE_CENTRAL:
                mean = central_noise_on_mean(spec, mean, len(contributors), secure_generator())
            new_params, new_state = server_step(spec.strategy, global_params, mean, state)
            model_out = self.blobs.put(encode_tensors(new_params))
            state_out = self.blobs.put(encode_tensors(new_state)) if new_state else None
            return sums, model_out, state_out

        try:
            sums, model_out, state_out = await anyio.to_thread.run_sync(compute)
        except SecureSumRejected as exc:  # a site sent values outside its ranges: nothing of it is used
            log.warning("study %s round %d: %s", study.id, r.number, exc)
            self._fail(r.id, f"secure sum rejected: {exc}")
            return
        metrics = dict(sums.metrics)
        if r.kind is TaskKind.TRAIN:
            assert model_out is not None
            self._advance(
                study,
                r,
                model_out=model_out,
                state_out=state_out,
                metrics=metrics,
                contributors=len(contributors),
            )
            return
        dropped = [t.site for t in self.store.tasks_of_round(r.id) if t.site not in contributors]
        note = f"no evaluation from {', '.join(dropped)}" if dropped else None
        self.store.finish_round(
            r.id,
            status=RoundStatus.COMPLETED,
            reason=note,
            when=self.clock.now(),
            metrics=metrics,
            study_status=StudyStatus.COMPLETED,
            study_reason=note,
        )
        self._round_done(r.id, None)
        log.info("study %s completed (secure): %s", study.id, metrics)
        self._study_ended(study.id)

    def _fail(self, round_id: str, reason: str, metrics: dict[str, Any] | None = None) -> None:
        r = self.store.get_round(round_id)
        if r.status is RoundStatus.OPEN:
            self.store.finish_round(
                round_id,
                status=RoundStatus.FAILED,
                reason=reason,
                metrics=metrics,
                when=self.clock.now(),
                study_status=StudyStatus.FAILED,
                study_reason=f"round {r.number}: {reason}",
            )
            self._round_done(round_id, None)
            self._study_ended(r.study_id)

    async def _finish_train_round(self, study: StudyRow, r: RoundRow, tasks: list[TaskRow]) -> None:
        spec = study.spec
        completed = [t for t in tasks if t.status is TaskStatus.COMPLETED]
        now = self.clock.now()
        if len(completed) < spec.min_sites:
            missing = "; ".join(
                f"{t.site}: {t.status.value} ({t.reason})" for t in tasks if t not in completed
            )
            reason = (
                f"round {r.number}: quorum not met: {len(completed)} valid update(s), "
                f"{spec.min_sites} required ({missing})"
            )
            log.warning("study %s failed: %s", study.id, reason)
            self.store.finish_round(
                r.id,
                status=RoundStatus.FAILED,
                reason=reason,
                when=now,
                study_status=StudyStatus.FAILED,
                study_reason=reason,
            )
            self._round_done(r.id, None)
            self._study_ended(study.id)
            return

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

        model_out, state_out = await anyio.to_thread.run_sync(compute)
        metrics = summarize([t.metrics for t in completed if t.metrics is not None])
        self._advance(
            study, r, model_out=model_out, state_out=state_out, metrics=metrics, contributors=len(completed)
        )

    def _advance(
        self,
        study: StudyRow,
        r: RoundRow,
        *,
        model_out: str,
        state_out: str | None,
        metrics: dict[str, Any],
        contributors: int,
    ) -> None:
        """Close a completed training round, record the model version and open the next round, atomically."""
        spec = study.spec
        now = self.clock.now()
        deadline = now + timedelta(seconds=spec.round_deadline_s)
        if r.number < spec.rounds:
            nxt = NewRound(
                number=r.number + 1,
                kind=TaskKind.TRAIN,
                sites=spec.train_sites,
                model_in_digest=model_out,
                deadline_at=deadline,
            )
        else:
            nxt = NewRound(
                number=r.number + 1,
                kind=TaskKind.EVALUATE,
                sites=spec.evaluation_sites,
                model_in_digest=model_out,
                deadline_at=deadline,
            )
        version = ModelVersion(
            digest=model_out,
            study_id=study.id,
            round=r.number,
            parent_digest=r.model_in_digest,
            created_at=now,
            num_sites=contributors,
            train_loss=metrics.get("train_loss"),
        )
        next_row = self.store.finish_round(
            r.id,
            status=RoundStatus.COMPLETED,
            reason=None,
            when=now,
            metrics=metrics,
            model_out=model_out,
            state_out=state_out,
            version=version,
            next_round=nxt,
        )
        log.info(
            "study %s round %d/%d done: %d/%d sites, %s",
            study.id,
            r.number,
            spec.rounds,
            contributors,
            len(spec.train_sites),
            {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
        )
        assert next_row is not None
        self._round_done(r.id, version)  # before the next round's tasks go out: they carry its commitment
        self._opened(next_row)

    def _finish_evaluation_round(self, study: StudyRow, r: RoundRow, tasks: list[TaskRow]) -> None:
        completed = [t for t in tasks if t.status is TaskStatus.COMPLETED and t.metrics is not None]
        metrics = summarize([t.metrics for t in completed if t.metrics is not None])
        metrics["per_site"] = {t.site: t.metrics.model_dump(mode="json") for t in completed if t.metrics}
        missing = [f"{t.site}: {t.status.value} ({t.reason})" for t in tasks if t not in completed]
        note = f"no evaluation from {'; '.join(missing)}" if missing else None
        self.store.finish_round(
            r.id,
            status=RoundStatus.COMPLETED,
            reason=note,
            when=self.clock.now(),
            metrics=metrics,
            study_status=StudyStatus.COMPLETED,
            study_reason=note,
        )
        self._round_done(r.id, None)
        log.info("study %s completed: %s", study.id, {k: v for k, v in metrics.items() if k != "per_site"})
        self._study_ended(study.id)

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
            await anyio.to_thread.run_sync(self._write_report, study_id)

        self._spawn(report())

    def _write_report(self, study_id: str) -> None:
        if self.reports_dir is not None:
            try:
                write_report(self.store, study_id, self.reports_dir)
            except Exception:  # a report is a convenience: never let it break the round engine
                log.exception("could not write the report of study %s", study_id)
