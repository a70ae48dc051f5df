"""The site's privacy gate: every training task is paid for from the dataset's budget before data is read.

The site keeps a budget ``(epsilon, delta)`` per registered dataset in its ledger (``HOME/site.sqlite``, the
``privacy_*`` tables; ``fedhealth site budget set DATASET --epsilon E --delta D --home HOME``). For each task
:class:`PrivacyGate` does, in the agent's pipeline (after the governance gate):

``before_data``    (training tasks) check the study's privacy spec with the orchestrator's own rules
                   (:func:`fedhealth.runtime.check_privacy`) and work out what this round releases about the
                   dataset's records (:func:`fedhealth.runtime.task_plan`); the first time this agent sees a
                   study, check that its remaining rounds fit the budget at all; then *reserve* this round on
                   the ledger (one locked transaction: compose with everything already spent or reserved on
                   the dataset, by every study, and refuse if the total would exceed the budget). Nothing of
                   the dataset has been opened yet. Refusals: ``budget_exceeded`` (the reason names the
                   figures), ``budget_not_set`` (a DP study on a dataset without a budget),
                   ``budget_already_charged`` (a task id that already holds a charge: a retried task needs a
                   new id), ``invalid_privacy`` (a spec the services cannot honour).
``after_training`` commit what was released (the plan: the trainers take their parameters from it).
``prepare_data``   (rows counted, nothing computed yet) refuse with ``invalid_privacy`` a delta, the study's
                   or the budget's, at or above 1/n for the dataset's n training rows.
``on_refused`` / ``on_failed``  release the reservation if no computation on patient rows began
                   (``ctx.data_read`` false: missing file, parse error, schema mismatch, a refusal); charge
                   it in full if it had (a failure code may then reflect the rows).
``attest``         state the ledger's figures for the orchestrator (:class:`fedhealth.protocol.PrivacySpend`),
                   the study's epsilon at the ledger's delta and at the spec's (what a model card prints).

Collective sessions (``TaskKind.COLLECTIVE``) of a recipe that reads data go through the same steps: what a
session releases is what its recipe declares for its own noise (``session_dp``, e.g. ``stats`` with a noise
multiplier: one Gaussian release, :func:`fedhealth.runtime.session_plan`); a session without noise releases
exact figures and counts as a study without differential privacy.

Studies without differential privacy: a dataset that has a budget refuses them (their epsilon is infinite:
the budget could not stay a guarantee); a dataset without one runs them as before budgets existed. The same
holds for a DP-SGD spec with noise multiplier 0 (a clipping-only baseline). Evaluation tasks read only the
held-out split and release aggregate metrics; they are not charged (docs/privacy.md says why).

A reservation that is never settled (the agent was killed while training) stays counted in full forever; the
gate lists such reservations in its log at start-up. Refusals reach the site's audit log through the
governance gate's ``on_refused``; each charge is a ``budget.spent`` entry in the same log (through
``ctx.state[AUDIT_LOG_STATE]``), written after the ledger's commit: the ledger is the authority.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from fedhealth.agent._home import SiteHome
from fedhealth.agent._pipeline import PassGate, TaskContext, TaskRefused
from fedhealth.core import Clock, FedHealthError, InputError
from fedhealth.data import TabularDataset
from fedhealth.governance import AuditEventType, AuditLog
from fedhealth.privacy import (
    AccountantKind,
    BudgetLedger,
    BudgetNotSetError,
    DpPlan,
    GaussianRelease,
    Reservation,
    ReservationStateError,
    SpendReceipt,
    TaskOverBudgetError,
    epsilon,
    sqlite_engine,
)
from fedhealth.protocol import AccountantName, PrivacySpend, Task, TaskKind
from fedhealth.runtime import (
    check_privacy,
    recipe_capabilities,
    reproducible_noise_enabled,
    session_plan,
    study_recipe,
    task_plan,
)

log = logging.getLogger("fedhealth.agent")

STATE_KEY = "privacy"
AUDIT_LOG_STATE = "governance.audit_log"  # where the governance gate leaves the site's AuditLog

BUDGET_EXCEEDED = "budget_exceeded"
BUDGET_NOT_SET = "budget_not_set"
BUDGET_ALREADY_CHARGED = "budget_already_charged"
INVALID_PRIVACY = "invalid_privacy"

# What a study without differential privacy releases, as the ledger sees it: infinite epsilon.
_NO_NOISE = DpPlan.of(GaussianRelease(noise_multiplier=0.0))
# Tasks that compute something released about the records: training rounds, and collective sessions (their
# recipe declares the noise it adds, ``session_dp``; one without noise releases exact figures).
_CHARGED_KINDS = (TaskKind.TRAIN, TaskKind.COLLECTIVE)


@dataclass
class _TaskNotes:
    """What the gate did for one task (``ctx.state[STATE_KEY]``)."""

    plan: DpPlan
    reservation: Reservation | None = None
    task_epsilon: float | None = None  # at the budget's delta
    receipt: SpendReceipt | None = None
    settled: bool = False


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "infinite"


class PrivacyGate(PassGate):
    """The site's budget ledger in the task pipeline (module docstring)."""

    def __init__(
        self,
        engine: sa.Engine,
        *,
        clock: Clock | None = None,
        accountant: AccountantKind = AccountantKind.PLD,
    ) -> None:
        BudgetLedger.create_schema(engine)
        self.ledger = BudgetLedger(engine, clock, accountant=accountant)
        self.reproducible_noise = reproducible_noise_enabled()
        # Reservations this process made for tasks whose data it never read: if the orchestrator hands the
        # same task out again (say the model download failed), it is paid for already.
        self._untouched: dict[str, Reservation] = {}
        self._checked_studies: set[tuple[str, str]] = set()
        if self.reproducible_noise:
            log.warning(
                "FEDHEALTH_REPRODUCIBLE_NOISE=1: differential-privacy noise is drawn from the study seed; "
                "anyone who knows the seed can remove it. Use this for benchmarks and tests only."
            )
        self.report_pending()

    @classmethod
    def from_home(cls, home: SiteHome) -> PrivacyGate:
        return cls(sqlite_engine(home.database_path))

    def report_pending(self) -> list[Reservation]:
        """Log every reservation never settled (the agent stopped while a task held it); they stay charged."""
        pending = self.ledger.pending()
        for r in pending:
            log.warning(
                "privacy ledger: reservation %s (task %s of study %s on dataset %r, reserved %s) was never "
                "settled: the agent stopped after reserving; it stays counted in full",
                r.reservation_id,
                r.task_id,
                r.study_id,
                r.dataset,
                r.reserved_at.isoformat(),
            )
        return pending

    # --- the pipeline --------------------------------------------------------------------------------------

    def before_data(self, ctx: TaskContext) -> None:
        task = ctx.task
        # Only training on patient rows releases anything about them; a recipe that reads no data (a
        # transport benchmark's) computes nothing on them, so there is nothing to account.
        if task.kind not in _CHARGED_KINDS or not recipe_capabilities(task.recipe).reads_data:
            return
        spec = task.spec
        try:
            if task.kind is TaskKind.COLLECTIVE:
                # a collective session releases what its recipe declares (its own noise), or is exact
                session = session_plan(spec)
                plan = _NO_NOISE if session is None or session.is_empty else session
            else:
                check_privacy(spec)
                plan = task_plan(spec, task.kind, ctx.site) if spec.privacy is not None else _NO_NOISE
        except InputError as exc:
            raise TaskRefused(INVALID_PRIVACY, str(exc)) from exc
        notes = _TaskNotes(plan=plan)
        ctx.state[STATE_KEY] = notes
        noiseless = any(r.noise_multiplier == 0 for r in plan.releases)
        held = self._untouched.get(task.task_id)
        if held is not None:
            # The same task again, its data never read: already reserved, but only for what it reserved. A
            # task id the orchestrator reuses for another dataset, study or plan would otherwise run on a
            # reservation of something else, its own budget never checked nor charged.
            if (held.dataset, held.study_id, held.planned) != (task.dataset, task.study_id, plan):
                raise TaskRefused(
                    BUDGET_ALREADY_CHARGED,
                    f"task {task.task_id} holds a reservation for another dataset, study or privacy plan; "
                    "that charge stays on the ledger, and this task is not run under it",
                )
            notes.reservation = held
            return
        try:
            if spec.privacy is not None and not noiseless:
                self._check_study(ctx)
            reservation = self.ledger.reserve(task.dataset, task.study_id, task.task_id, plan)
        except BudgetNotSetError as exc:
            if noiseless:
                return  # no budget on this dataset: a study without noise runs as before budgets existed
            if spec.privacy is None:  # a collective session with its recipe's own noise
                raise TaskRefused(
                    BUDGET_NOT_SET, f"{exc}; this session adds noise whose spend the ledger must account"
                ) from exc
            needs = epsilon(plan, delta=spec.privacy.delta)
            raise TaskRefused(
                BUDGET_NOT_SET,
                f"{exc}; this task alone needs epsilon {_fmt(needs)} at delta {spec.privacy.delta:g}",
            ) from exc
        except TaskOverBudgetError as exc:
            prefix = (
                "the study has no differential privacy (epsilon infinite); "
                if spec.privacy is None and noiseless
                else ""
            )
            raise TaskRefused(BUDGET_EXCEEDED, prefix + exc.check.reason) from exc
        except ReservationStateError as exc:
            raise TaskRefused(
                BUDGET_ALREADY_CHARGED,
                f"{exc}: its charge stays on the ledger (a run that stopped after reserving may have "
                "released something), and the task is not run again",
            ) from exc
        notes.reservation = reservation
        self._untouched[task.task_id] = reservation

    def _check_study(self, ctx: TaskContext) -> None:
        """Refuse now if the study's remaining rounds cannot all fit: better than spending the budget on a
        study that would be refused half-way. Advisory (read-only); the reservation is the guarantee."""
        task = ctx.task
        key = (task.dataset, task.study_id)
        remaining = task.spec.rounds - task.round + 1
        if key in self._checked_studies or remaining < 2:
            return
        notes: _TaskNotes = ctx.state[STATE_KEY]
        check = self.ledger.check(task.dataset, DpPlan(releases=notes.plan.releases * remaining))
        if not check.allowed:
            raise TaskRefused(
                BUDGET_EXCEEDED,
                f"refused on dataset {check.dataset!r} (budget epsilon {check.budget_epsilon:g} at delta "
                f"{check.delta:g}): the study's {remaining} remaining training rounds need epsilon "
                f"{_fmt(check.task_epsilon)} on their own; with the {_fmt(check.spent_epsilon)} already "
                f"spent or reserved the total would reach {_fmt(check.projected_epsilon)}, over the budget",
            )
        self._checked_studies.add(key)

    def prepare_data(self, ctx: TaskContext, dataset: TabularDataset) -> TabularDataset:
        self._untouched.pop(ctx.task.task_id, None)  # the data is read from here on
        notes: _TaskNotes | None = ctx.state.get(STATE_KEY)
        privacy = ctx.task.spec.privacy
        # n is the training rows; with none left (consent, the split), the held-out rows, which a
        # statistics session still describes: skipping the check there let any delta through.
        records, which = (
            (dataset.num_train, "training") if dataset.num_train > 0 else (dataset.num_test, "held-out")
        )
        if notes is not None and records > 0:
            # A delta of 1/n or more allows publishing one patient's record outright: no guarantee at all.
            # Refused here, before anything is computed on the rows (the reservation is released). Whatever
            # the release: a training study's DP, or a collective session's own noise (a noisy statistics
            # session states its delta in its recipe's params).
            deltas: dict[str, float] = {}
            if privacy is not None:
                deltas["the study's"] = privacy.delta
            session_delta = _session_delta(ctx.task) if ctx.task.kind is TaskKind.COLLECTIVE else None
            if session_delta is not None:
                deltas["the session's"] = session_delta
            if notes.reservation is not None:
                deltas["the site's budget"] = self.ledger.budget(ctx.task.dataset).delta
            for whose, delta in deltas.items():
                if delta >= 1.0 / records:
                    raise TaskRefused(
                        INVALID_PRIVACY,
                        f"{whose} delta {delta:g} is not below 1/n = {1.0 / records:.3g} for the "
                        f"{records} {which} records of dataset {ctx.task.dataset!r}",
                    )
        return dataset

    def after_training(self, ctx: TaskContext) -> None:
        notes: _TaskNotes | None = ctx.state.get(STATE_KEY)
        if notes is not None and notes.reservation is not None and not notes.settled:
            self._commit(ctx, notes, outcome="committed")

    def on_refused(self, ctx: TaskContext, refusal: TaskRefused) -> None:
        self._settle_unfinished(ctx, f"refused: {refusal.code}")

    def on_failed(self, ctx: TaskContext, error: BaseException) -> None:
        self._settle_unfinished(ctx, f"failed: {type(error).__name__}")

    def _settle_unfinished(self, ctx: TaskContext, why: str) -> None:
        notes: _TaskNotes | None = ctx.state.get(STATE_KEY)
        if notes is None or notes.reservation is None or notes.settled:
            return
        self._untouched.pop(ctx.task.task_id, None)
        try:
            if ctx.data_read:
                # Something data-dependent may have left the site (a failure report, a refusal's reason).
                self._commit(ctx, notes, outcome=f"charged in full ({why} after the data was read)")
            else:
                self.ledger.release(notes.reservation)
                notes.settled = True
                self._audit(ctx, {"outcome": f"released ({why} before any data was read)", **self._ids(ctx)})
        except FedHealthError:
            log.exception("privacy ledger: could not settle task %s; it stays reserved", ctx.task.task_id)

    def _commit(self, ctx: TaskContext, notes: _TaskNotes, *, outcome: str) -> None:
        assert notes.reservation is not None
        receipt = self.ledger.commit(notes.reservation, notes.plan)
        notes.settled = True
        notes.receipt = receipt
        notes.task_epsilon = receipt.actual_epsilon
        self._untouched.pop(ctx.task.task_id, None)
        if receipt.over_budget or receipt.exceeds_plan:
            log.error(
                "privacy ledger: task %s took dataset %r to epsilon %s (over budget: %s, above plan: %s)",
                ctx.task.task_id,
                receipt.dataset,
                _fmt(receipt.total_epsilon),
                receipt.over_budget,
                receipt.exceeds_plan,
            )
        self._audit(
            ctx,
            {
                "outcome": outcome,
                **self._ids(ctx),
                "reservation_id": receipt.reservation_id,
                "released": notes.plan.to_json(),
                "task_epsilon": _json_float(receipt.actual_epsilon),
                "total_epsilon": _json_float(receipt.total_epsilon),
                "over_budget": receipt.over_budget,
                "exceeds_plan": receipt.exceeds_plan,
                "accountant": self.ledger.accountant.value,
                "reproducible_noise": self.reproducible_noise,
            },
        )

    @staticmethod
    def _ids(ctx: TaskContext) -> dict[str, Any]:
        return {
            "task_id": ctx.task.task_id,
            "study_id": ctx.task.study_id,
            "round": ctx.task.round,
            "dataset": ctx.task.dataset,
        }

    def _audit(self, ctx: TaskContext, payload: dict[str, Any]) -> None:
        audit = ctx.state.get(AUDIT_LOG_STATE)
        if not isinstance(audit, AuditLog):
            return  # no governance gate in this pipeline: the ledger alone records the spend
        try:
            audit.append(AuditEventType.BUDGET_SPENT, payload)
        except FedHealthError:
            log.exception("could not write the budget entry of task %s to the audit log", ctx.task.task_id)

    def attest(self, ctx: TaskContext) -> None:
        task = ctx.task
        notes: _TaskNotes | None = ctx.state.get(STATE_KEY)
        if notes is None and task.spec.privacy is None:
            return
        try:
            statement = self.ledger.statement(task.dataset)
        except BudgetNotSetError:
            return
        except FedHealthError:
            log.exception("privacy ledger: no statement for task %s", task.task_id)
            return
        study = next((s for s in statement.studies if s.study_id == task.study_id), None)
        study_epsilon = study.epsilon if study is not None else 0.0
        charged = notes.task_epsilon if notes is not None and notes.receipt is not None else None
        if not all(math.isfinite(v) for v in (study_epsilon, statement.spent_epsilon, charged or 0.0)):
            return  # a release without noise is on the ledger: no finite figure to state
        # The ledger accounts at its budget's delta; a model card prints the spec's: state the study's epsilon
        # at that delta too, so nobody prints one figure beside the other delta.
        spec_delta = task.spec.privacy.delta if task.spec.privacy is not None else None
        spec_epsilon = (
            self.ledger.study_epsilon(task.dataset, task.study_id, delta=spec_delta)
            if spec_delta is not None
            else None
        )
        ctx.attestation["privacy"] = PrivacySpend(
            dataset=task.dataset,
            delta=statement.delta,
            study_epsilon=study_epsilon,
            total_epsilon=statement.spent_epsilon,
            budget_epsilon=statement.budget_epsilon,
            task_epsilon=charged,
            accountant=AccountantName(self.ledger.accountant.value),
            spec_delta=spec_delta,
            spec_study_epsilon=_json_float(spec_epsilon) if spec_epsilon is not None else None,
            reproducible_noise=self.reproducible_noise,
        ).model_dump(mode="json")


def _session_delta(task: Task) -> float | None:
    """A collective session's own delta as its recipe reads it: from the validated params, not the raw JSON,
    where a delta written as a string ("0.2") is the recipe's 0.2 but no number to an isinstance check (it
    slipped past the 1/n check; tests/privacy/test_privacy_doc_attacks.py)."""
    try:
        value = getattr(study_recipe(task.spec.recipe).params, "delta", None)
    except InputError:
        value = task.spec.recipe.params.get("delta")  # refused elsewhere; still checked here if numeric
    return float(value) if isinstance(value, int | float) else None


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
