"""The site's privacy-budget ledger: check, reserve durably, then commit what was actually spent.

Each registered dataset has a budget ``(epsilon, delta)`` set by the site. Every task that will release
anything derived from the dataset declares a :class:`~fedhealth.privacy.DpPlan`. The agent calls, in order:

1. :meth:`BudgetLedger.reserve` -- *before any data is read*. In one locked transaction it composes everything
   already committed or reserved on the dataset (all studies) with the planned release, refuses with
   :class:`TaskOverBudgetError` if the total epsilon at the budget's delta would exceed the budget, and
   otherwise writes the reservation and commits. When ``reserve`` returns, the reservation is on disk.
2. :meth:`BudgetLedger.commit` -- once the release is final (before it leaves the site): the reservation is
   replaced by what was actually spent (fewer steps after an early stop, say).
   Or :meth:`BudgetLedger.release` -- only if the task never touched the data.

Guarantees and choices:

- **Never under-counts.** A reservation that is neither committed nor released -- the agent was killed
  between reading data and committing -- counts in full, in every later check, forever. :meth:`pending` lists
  such reservations so an operator can see them; nothing removes them automatically, because nobody can know
  whether the release left the site.
- **A task reserves once per dataset.** A second ``reserve`` with the same task id is refused
  (:class:`ReservationStateError`): a retried task must come with a new task id, so that a release that did
  leave before a crash is not silently paid for only once.
- **Actual above plan is recorded, not refused.** If a commit's actual release has a larger epsilon than the
  plan, the privacy loss has already happened; refusing to record it would under-count. The receipt says
  ``exceeds_plan`` and ``over_budget`` so the agent can audit and alert. Trainers take their parameters from
  the plan, so this indicates a bug.
- **Composition, not addition.** All releases on a dataset, across studies, compose through the accountant;
  identical mechanisms are merged first (``k + m`` repetitions), so checking stays fast after many rounds.
  ``remaining`` in a statement is budget minus composed spend; it is informative only, as epsilons do not add.
- **Concurrency.** Checks and writes run under a lock that serializes them per database (SQLite:
  ``BEGIN IMMEDIATE``) or per dataset (PostgreSQL: ``SELECT ... FOR UPDATE`` on the budget row), so two
  reservations that fit alone but not together cannot both pass.
- **Durability.** SQLite keeps a committed transaction through a process crash in any mode; through power loss
  it needs ``synchronous=FULL`` (its default outside WAL mode, and what :func:`sqlite_engine` sets).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from fedhealth.core import (
    Clock,
    InputError,
    NotFoundError,
    ServiceUnavailableError,
    SystemClock,
    canonical_json,
    create_private_file,
    is_valid_name,
    new_id,
)
from fedhealth.privacy._accounting import AccountantKind, DpPlan, check_delta, epsilon
from fedhealth.privacy._errors import (
    BudgetNotSetError,
    DpParameterError,
    ReservationStateError,
    TaskOverBudgetError,
)

_metadata = sa.MetaData()

_budgets = sa.Table(
    "privacy_budget",
    _metadata,
    sa.Column("dataset", sa.String(63), primary_key=True),
    sa.Column("epsilon", sa.Double, nullable=False),
    sa.Column("delta", sa.Double, nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
)

_spends = sa.Table(
    "privacy_spend",
    _metadata,
    sa.Column("reservation_id", sa.String(64), primary_key=True),
    sa.Column("dataset", sa.String(63), sa.ForeignKey("privacy_budget.dataset"), nullable=False),
    sa.Column("study_id", sa.String(128), nullable=False),
    sa.Column("task_id", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("planned", sa.Text, nullable=False),
    sa.Column("actual", sa.Text, nullable=True),
    sa.Column("exceeds_plan", sa.Boolean, nullable=False, default=False),
    sa.Column("reserved_at", sa.String(40), nullable=False),
    sa.Column("settled_at", sa.String(40), nullable=True),
    sa.UniqueConstraint("dataset", "task_id", name="uq_privacy_spend_dataset_task"),
    sa.Index("ix_privacy_spend_dataset_status", "dataset", "status"),
)


class SpendStatus(StrEnum):
    """The life of a ledger entry: reserved, then committed (spent) or released (never touched data)."""

    RESERVED = "reserved"
    COMMITTED = "committed"
    RELEASED = "released"


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """A dataset's budget: the composition of everything released must stay (epsilon, delta)-DP."""

    dataset: str
    epsilon: float
    delta: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Reservation:
    """A durable claim on a dataset's budget for one task's planned release."""

    reservation_id: str
    dataset: str
    study_id: str
    task_id: str
    planned: DpPlan
    reserved_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetCheck:
    """The figures behind a decision to accept or refuse a task; ``reason`` says it in one sentence."""

    dataset: str
    budget_epsilon: float
    delta: float
    accountant: AccountantKind
    spent_epsilon: float
    task_epsilon: float
    projected_epsilon: float
    allowed: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "accountant": self.accountant.value,
            "spent_epsilon": _json_float(self.spent_epsilon),
            "task_epsilon": _json_float(self.task_epsilon),
            "projected_epsilon": _json_float(self.projected_epsilon),
            "allowed": self.allowed,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SpendReceipt:
    """The outcome of a commit: what was planned and spent, and the dataset's total afterwards."""

    reservation_id: str
    dataset: str
    study_id: str
    task_id: str
    planned_epsilon: float
    actual_epsilon: float
    exceeds_plan: bool
    total_epsilon: float
    over_budget: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class StudySpend:
    """One study's share of a dataset's spend: its own releases composed, and its task counts."""

    study_id: str
    epsilon: float
    committed_tasks: int
    reserved_tasks: int

    def to_json(self) -> dict[str, Any]:
        return {
            "study_id": self.study_id,
            "epsilon": _json_float(self.epsilon),
            "committed_tasks": self.committed_tasks,
            "reserved_tasks": self.reserved_tasks,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetStatement:
    """A dataset's budget, total spend (all studies composed, reservations included) and spend per study."""

    dataset: str
    budget_epsilon: float
    delta: float
    accountant: AccountantKind
    spent_epsilon: float
    studies: tuple[StudySpend, ...]

    @property
    def remaining_epsilon(self) -> float:
        """Budget minus the composed spend (not additive: a task's own epsilon may not fit in it exactly)."""
        return max(0.0, self.budget_epsilon - self.spent_epsilon)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "budget_epsilon": self.budget_epsilon,
            "delta": self.delta,
            "accountant": self.accountant.value,
            "spent_epsilon": _json_float(self.spent_epsilon),
            "remaining_epsilon": self.remaining_epsilon,
            "studies": [s.to_json() for s in self.studies],
        }


def _json_float(value: float) -> float | None:
    # JSON has no infinity; null means "infinite" (a release without noise).
    return value if math.isfinite(value) else None


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "infinite (a release without noise)"


def sqlite_engine(path: str | Path) -> sa.Engine:
    """An engine on the site's SQLite file with the settings the ledger relies on. A new file is created
    0600 first: the ledger sits beside the site's consent records."""
    if str(path) != ":memory:":
        create_private_file(Path(path))
    engine = sa.create_engine(
        f"sqlite:///{Path(path)}", connect_args={"timeout": 30.0, "check_same_thread": False}
    )

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def _check_id(name: str, value: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 128:
        raise InputError(f"{name} must be a string of 1 to 128 characters, got {value!r}")
    return value


def _check_dataset(dataset: str) -> str:
    if not isinstance(dataset, str) or not is_valid_name(dataset):
        raise InputError(
            f"dataset name {dataset!r} is not valid: use 1 to 63 lowercase letters, digits, '_', '.' or '-'"
        )
    return dataset


def _plan_text(plan: DpPlan) -> str:
    return canonical_json(plan.to_json()).decode()


def _plan_of(text: str) -> DpPlan:
    return DpPlan.from_json(json.loads(text))


def _in_reservation_window(dataset: str) -> None:
    """Test seam, a no-op: :meth:`BudgetLedger.reserve` calls it between reading the spend and writing the
    reservation, so a test can hold two reservations there at once and show that the lock keeps them apart."""


class BudgetLedger:
    """Per-dataset privacy budgets and spend at one site, in the site's database (SQLite or PostgreSQL)."""

    metadata: ClassVar[sa.MetaData] = _metadata

    def __init__(
        self,
        engine: sa.Engine,
        clock: Clock | None = None,
        *,
        accountant: AccountantKind = AccountantKind.PLD,
    ) -> None:
        self._engine = engine
        self._clock: Clock = clock or SystemClock()
        self._accountant = AccountantKind(accountant)
        self._sqlite = engine.dialect.name == "sqlite"

    @staticmethod
    def create_schema(engine: sa.Engine) -> None:
        """Create the ledger's tables if they are missing (idempotent)."""
        _metadata.create_all(engine)

    @property
    def accountant(self) -> AccountantKind:
        return self._accountant

    # -- transactions --------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[sa.Connection]:
        """A write transaction that holds the ledger's lock from its first statement.

        SQLite: ``BEGIN IMMEDIATE`` takes the database write lock before anything is read (pysqlite's own
        implicit BEGIN is deferred, so two transactions could both read and then both write). PostgreSQL: an
        ordinary transaction; callers lock the dataset's budget row with :meth:`_budget_row`.
        """
        with self._connect() as conn:
            if not self._sqlite:
                with conn.begin():
                    yield conn
                return
            conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")

    @contextmanager
    def _connect(self) -> Iterator[sa.Connection]:
        """A connection; SQLAlchemy's operational errors (database locked, unreachable) become ours."""
        try:
            with self._engine.connect() as conn:
                yield conn
        except sa.exc.OperationalError as exc:
            raise ServiceUnavailableError(f"the site's ledger database is unavailable: {exc.orig}") from exc

    def _budget_row(self, conn: sa.Connection, dataset: str, *, lock: bool) -> Budget:
        stmt = sa.select(_budgets).where(_budgets.c.dataset == dataset)
        if lock and not self._sqlite:
            stmt = stmt.with_for_update()
        row = conn.execute(stmt).one_or_none()
        if row is None:
            raise BudgetNotSetError(
                f"no privacy budget is set for dataset {dataset!r}; the site sets one with "
                f"`fedhealth site budget set {dataset} --epsilon E --delta D`"
            )
        return Budget(dataset=row.dataset, epsilon=row.epsilon, delta=row.delta)

    def _entries(self, conn: sa.Connection, dataset: str) -> list[tuple[str, SpendStatus, DpPlan]]:
        """(study, status, counted plan) of each live entry: committed count as spent, reserved as planned."""
        rows = conn.execute(
            sa.select(_spends.c.study_id, _spends.c.status, _spends.c.planned, _spends.c.actual)
            .where(_spends.c.dataset == dataset, _spends.c.status != SpendStatus.RELEASED.value)
            .order_by(_spends.c.reserved_at, _spends.c.reservation_id)
        ).all()
        entries = []
        for row in rows:
            status = SpendStatus(row.status)
            text = row.actual if status is SpendStatus.COMMITTED else row.planned
            entries.append((row.study_id, status, _plan_of(text)))
        return entries

    def _epsilon(self, plan: DpPlan, budget: Budget) -> float:
        return epsilon(plan, delta=budget.delta, accountant=self._accountant)

    def _check(
        self, budget: Budget, spent_plan: DpPlan, planned: DpPlan, projected: float | None = None
    ) -> BudgetCheck:
        spent = self._epsilon(spent_plan, budget)
        task = self._epsilon(planned, budget)
        if projected is None:
            projected = self._epsilon(spent_plan + planned, budget)
        allowed = projected <= budget.epsilon
        where = f"dataset {budget.dataset!r} (budget epsilon {budget.epsilon:g} at delta {budget.delta:g})"
        if allowed:
            reason = (
                f"accepted on {where}: this task needs epsilon {_fmt(task)} on its own; with the "
                f"{_fmt(spent)} already spent or reserved the total reaches {_fmt(projected)}"
            )
        else:
            reason = (
                f"refused on {where}: this task needs epsilon {_fmt(task)} on its own; with the "
                f"{_fmt(spent)} already spent or reserved the total would reach {_fmt(projected)}, "
                f"over the budget"
            )
        return BudgetCheck(
            dataset=budget.dataset,
            budget_epsilon=budget.epsilon,
            delta=budget.delta,
            accountant=self._accountant,
            spent_epsilon=spent,
            task_epsilon=task,
            projected_epsilon=projected,
            allowed=allowed,
            reason=reason,
        )

    # -- budgets -------------------------------------------------------------------------------------------

    def set_budget(self, dataset: str, epsilon: float, delta: float) -> Budget:
        """Set (or change) a dataset's budget. Lowering it below the spend refuses every later task."""
        _check_dataset(dataset)
        if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not math.isfinite(epsilon):
            raise DpParameterError(f"budget epsilon must be a finite number, got {epsilon!r}")
        if epsilon <= 0:
            raise DpParameterError(f"budget epsilon must be positive, got {epsilon!r}")
        delta = check_delta(delta)
        values = {
            "dataset": dataset,
            "epsilon": float(epsilon),
            "delta": delta,
            "updated_at": self._clock.now().isoformat(),
        }
        insert = (sqlite_dialect.insert if self._sqlite else pg_dialect.insert)(_budgets).values(**values)
        upsert = insert.on_conflict_do_update(
            index_elements=[_budgets.c.dataset],
            set_={k: insert.excluded[k] for k in ("epsilon", "delta", "updated_at")},
        )
        with self._locked() as conn:
            conn.execute(upsert)
        return Budget(dataset=dataset, epsilon=float(epsilon), delta=delta)

    def budget(self, dataset: str) -> Budget:
        """The dataset's budget, or :class:`BudgetNotSetError`."""
        with self._connect() as conn:
            return self._budget_row(conn, _check_dataset(dataset), lock=False)

    def budgets(self) -> list[Budget]:
        """Every budget set at this site, by dataset name."""
        with self._connect() as conn:
            rows = conn.execute(sa.select(_budgets).order_by(_budgets.c.dataset)).all()
        return [Budget(dataset=r.dataset, epsilon=r.epsilon, delta=r.delta) for r in rows]

    # -- check, reserve, commit, release ---------------------------------------------------------------------

    def check(self, dataset: str, planned: DpPlan) -> BudgetCheck:
        """Would ``planned`` fit now? Read-only; the answer may change before a :meth:`reserve`."""
        _check_dataset(dataset)
        with self._connect() as conn:
            budget = self._budget_row(conn, dataset, lock=False)
            entries = self._entries(conn, dataset)
        return self._check(
            budget, DpPlan(releases=tuple(r for _, _, p in entries for r in p.releases)), planned
        )

    def reserve(self, dataset: str, study_id: str, task_id: str, planned: DpPlan) -> Reservation:
        """Durably reserve ``planned`` for a task, or raise :class:`TaskOverBudgetError` and write nothing.

        Call it before reading any data; when it returns, the reservation is committed to the database.
        """
        _check_dataset(dataset)
        _check_id("study id", study_id)
        _check_id("task id", task_id)
        if not isinstance(planned, DpPlan):
            raise DpParameterError(f"planned must be a DpPlan, got {type(planned).__name__}")
        now = self._clock.now()
        reservation = Reservation(
            reservation_id=new_id("rsv"),
            dataset=dataset,
            study_id=study_id,
            task_id=task_id,
            planned=planned,
            reserved_at=now,
        )
        with self._locked() as conn:
            budget = self._budget_row(conn, dataset, lock=True)
            duplicate = conn.execute(
                sa.select(_spends.c.reservation_id).where(
                    _spends.c.dataset == dataset, _spends.c.task_id == task_id
                )
            ).first()
            if duplicate is not None:
                raise ReservationStateError(
                    f"task {task_id!r} already holds reservation {duplicate.reservation_id} on dataset "
                    f"{dataset!r}; a retried task needs a new task id"
                )
            entries = self._entries(conn, dataset)
            spent_plan = DpPlan(releases=tuple(r for _, _, p in entries for r in p.releases))
            # The one accounting call made under the lock: the lock blocks every writer of the database.
            projected = self._epsilon(spent_plan + planned, budget)
            refused = projected > budget.epsilon
            _in_reservation_window(dataset)
            if not refused:
                conn.execute(
                    _spends.insert().values(
                        reservation_id=reservation.reservation_id,
                        dataset=dataset,
                        study_id=study_id,
                        task_id=task_id,
                        status=SpendStatus.RESERVED.value,
                        planned=_plan_text(planned),
                        actual=None,
                        exceeds_plan=False,
                        reserved_at=now.isoformat(),
                        settled_at=None,
                    )
                )
        if refused:
            # Figures for the message, computed after the lock is released; nothing was written.
            raise TaskOverBudgetError(self._check(budget, spent_plan, planned, projected))
        return reservation

    def _settle(self, conn: sa.Connection, reservation: Reservation) -> Any:
        row = conn.execute(
            sa.select(_spends).where(_spends.c.reservation_id == reservation.reservation_id)
        ).one_or_none()
        if row is None or row.dataset != reservation.dataset:
            raise NotFoundError(
                f"no reservation {reservation.reservation_id} on dataset {reservation.dataset!r}"
            )
        if row.status != SpendStatus.RESERVED.value:
            raise ReservationStateError(f"reservation {reservation.reservation_id} is already {row.status}")
        return row

    def commit(self, reservation: Reservation, actual: DpPlan) -> SpendReceipt:
        """Replace the reservation by what was actually released; recorded even if it exceeds the plan."""
        if not isinstance(actual, DpPlan):
            raise DpParameterError(f"actual must be a DpPlan, got {type(actual).__name__}")
        # Accounting before taking the lock (it blocks every writer); the stored plan must match the object's.
        budget = self.budget(reservation.dataset)
        planned_eps = self._epsilon(reservation.planned, budget)
        actual_eps = self._epsilon(actual, budget)
        exceeds = actual_eps > planned_eps
        with self._locked() as conn:
            current = self._budget_row(conn, reservation.dataset, lock=True)
            if current != budget:  # the site changed the budget meanwhile (rare): account at its new delta
                budget = current
                planned_eps = self._epsilon(reservation.planned, budget)
                actual_eps = self._epsilon(actual, budget)
                exceeds = actual_eps > planned_eps
            row = self._settle(conn, reservation)
            if row.planned != _plan_text(reservation.planned):
                raise ReservationStateError(
                    f"reservation {reservation.reservation_id} was made for a different plan"
                )
            conn.execute(
                _spends.update()
                .where(_spends.c.reservation_id == reservation.reservation_id)
                .values(
                    status=SpendStatus.COMMITTED.value,
                    actual=_plan_text(actual),
                    exceeds_plan=exceeds,
                    settled_at=self._clock.now().isoformat(),
                )
            )
            entries = self._entries(conn, reservation.dataset)
        total = self._epsilon(DpPlan(releases=tuple(r for _, _, p in entries for r in p.releases)), budget)
        return SpendReceipt(
            reservation_id=reservation.reservation_id,
            dataset=reservation.dataset,
            study_id=row.study_id,
            task_id=row.task_id,
            planned_epsilon=planned_eps,
            actual_epsilon=actual_eps,
            exceeds_plan=exceeds,
            total_epsilon=total,
            over_budget=total > budget.epsilon,
        )

    def release(self, reservation: Reservation) -> None:
        """Give the reservation back. Only for a task that never read the data: nothing was released."""
        with self._locked() as conn:
            self._budget_row(conn, reservation.dataset, lock=True)
            self._settle(conn, reservation)
            conn.execute(
                _spends.update()
                .where(_spends.c.reservation_id == reservation.reservation_id)
                .values(status=SpendStatus.RELEASED.value, settled_at=self._clock.now().isoformat())
            )

    # -- reading -------------------------------------------------------------------------------------------

    def pending(self, dataset: str | None = None) -> list[Reservation]:
        """Reservations neither committed nor released (after a crash: counted as spent until settled)."""
        stmt = sa.select(_spends).where(_spends.c.status == SpendStatus.RESERVED.value)
        if dataset is not None:
            stmt = stmt.where(_spends.c.dataset == _check_dataset(dataset))
        with self._connect() as conn:
            rows = conn.execute(stmt.order_by(_spends.c.reserved_at, _spends.c.reservation_id)).all()
        return [
            Reservation(
                reservation_id=r.reservation_id,
                dataset=r.dataset,
                study_id=r.study_id,
                task_id=r.task_id,
                planned=_plan_of(r.planned),
                reserved_at=datetime.fromisoformat(r.reserved_at),
            )
            for r in rows
        ]

    def spent(self, dataset: str) -> float:
        """The composed epsilon, at the budget's delta, of everything committed or reserved on the dataset."""
        return self.statement(dataset).spent_epsilon

    def study_epsilon(self, dataset: str, study_id: str, *, delta: float) -> float:
        """One study's composed epsilon on the dataset at ``delta`` (e.g. the study spec's, which need not be
        the budget's): what a model card may state next to that delta."""
        _check_dataset(dataset)
        with self._connect() as conn:
            entries = self._entries(conn, dataset)
        plan = DpPlan(releases=tuple(r for study, _, p in entries if study == study_id for r in p.releases))
        return epsilon(plan, delta=delta, accountant=self._accountant)

    def statement(self, dataset: str) -> BudgetStatement:
        """The dataset's budget, total spend and spend per study (reservations counted as spent)."""
        _check_dataset(dataset)
        with self._connect() as conn:
            budget = self._budget_row(conn, dataset, lock=False)
            entries = self._entries(conn, dataset)
        by_study: dict[str, list[tuple[SpendStatus, DpPlan]]] = {}
        for study, status, plan in entries:
            by_study.setdefault(study, []).append((status, plan))
        studies = tuple(
            StudySpend(
                study_id=study,
                epsilon=self._epsilon(
                    DpPlan(releases=tuple(r for _, p in items for r in p.releases)), budget
                ),
                committed_tasks=sum(1 for s, _ in items if s is SpendStatus.COMMITTED),
                reserved_tasks=sum(1 for s, _ in items if s is SpendStatus.RESERVED),
            )
            for study, items in sorted(by_study.items())
        )
        total = self._epsilon(DpPlan(releases=tuple(r for _, _, p in entries for r in p.releases)), budget)
        return BudgetStatement(
            dataset=dataset,
            budget_epsilon=budget.epsilon,
            delta=budget.delta,
            accountant=self._accountant,
            spent_epsilon=total,
            studies=studies,
        )
