"""The budget ledger, run as one contract against SQLite (file) and PostgreSQL (throwaway schema).

Most tests use the RDP accountant because it is fast; the decisions they check do not depend on which
accountant composes. The PLD default is exercised where the figures matter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import sqlalchemy as sa

from fedhealth.core import InputError, NotFoundError
from fedhealth.privacy import (
    AccountantKind,
    BudgetLedger,
    BudgetNotSetError,
    DpParameterError,
    DpPlan,
    DpSgdRelease,
    GaussianRelease,
    ReservationStateError,
    TaskOverBudgetError,
    calibrate_noise,
    compose,
    epsilon,
    sqlite_engine,
)

RDP = AccountantKind.RDP
DELTA = 1e-5


def gaussian(sigma: float, count: int = 1) -> DpPlan:
    return DpPlan.of(GaussianRelease(noise_multiplier=sigma, count=count))


def eps_of(plan: DpPlan, accountant: AccountantKind = RDP) -> float:
    return epsilon(plan, delta=DELTA, accountant=accountant)


def test_reserve_within_budget_is_written_and_counts_as_spent(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 3.0, DELTA)
    plan = gaussian(4.0, 2)
    reservation = ledger.reserve("heart", "study-a", "task-1", plan)
    assert reservation.planned == plan
    assert ledger.spent("heart") == pytest.approx(eps_of(plan))
    assert [r.reservation_id for r in ledger.pending("heart")] == [reservation.reservation_id]


def test_task_over_budget_is_refused_with_the_figures_and_nothing_is_written(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 1.0, DELTA)
    plan = gaussian(2.0, 1)  # about 2.4 at delta 1e-5: over a budget of 1 on its own
    with pytest.raises(TaskOverBudgetError) as caught:
        ledger.reserve("heart", "study-a", "task-1", plan)
    check = caught.value.check
    assert not check.allowed
    assert check.task_epsilon == pytest.approx(eps_of(plan))
    assert check.projected_epsilon > check.budget_epsilon == 1.0
    message = str(caught.value)
    assert "refused" in message
    assert "'heart'" in message
    assert "budget epsilon 1 at delta 1e-05" in message
    assert f"{check.task_epsilon:.4g}" in message
    assert ledger.pending("heart") == []
    assert ledger.spent("heart") == 0.0
    assert json.loads(json.dumps(check.to_json()))["allowed"] is False


def test_two_studies_on_one_dataset_compose_and_the_second_is_refused(ledger_db):
    ledger = ledger_db.ledger()
    plan = gaussian(3.0, 2)
    alone = eps_of(plan)
    together = eps_of(plan + plan)
    # A budget each study fits in alone, but not both together.
    budget = (alone + together) / 2
    ledger.set_budget("heart", budget, DELTA)
    first = ledger.reserve("heart", "study-a", "task-a1", plan)
    ledger.commit(first, plan)
    with pytest.raises(TaskOverBudgetError) as caught:
        ledger.reserve("heart", "study-b", "task-b1", plan)
    assert caught.value.check.spent_epsilon == pytest.approx(alone)
    assert caught.value.check.projected_epsilon == pytest.approx(together)
    # Composition is not addition: two studies together cost less than twice one.
    assert alone < together < 2 * alone


def test_statement_lists_spend_per_study_and_the_composed_total(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 50.0, DELTA)
    plan_a = DpPlan.of(DpSgdRelease(noise_multiplier=1.0, sample_rate=0.01, steps=200))
    plan_b = gaussian(5.0, 3)
    r1 = ledger.reserve("heart", "study-a", "task-a1", plan_a)
    ledger.commit(r1, plan_a)
    ledger.reserve("heart", "study-a", "task-a2", plan_a)  # still pending: counts as spent
    r3 = ledger.reserve("heart", "study-b", "task-b1", plan_b)
    ledger.commit(r3, plan_b)
    statement = ledger.statement("heart")
    assert [s.study_id for s in statement.studies] == ["study-a", "study-b"]
    study_a, study_b = statement.studies
    assert (study_a.committed_tasks, study_a.reserved_tasks) == (1, 1)
    assert (study_b.committed_tasks, study_b.reserved_tasks) == (1, 0)
    assert study_a.epsilon == pytest.approx(eps_of(plan_a + plan_a))
    assert study_b.epsilon == pytest.approx(eps_of(plan_b))
    assert statement.spent_epsilon == pytest.approx(eps_of(compose(plan_a, plan_a, plan_b)))
    assert statement.remaining_epsilon == pytest.approx(50.0 - statement.spent_epsilon)
    assert json.loads(json.dumps(statement.to_json()))["studies"][1]["study_id"] == "study-b"


def test_commit_replaces_the_reservation_by_what_was_actually_spent(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 5.0, DELTA)
    planned = DpPlan.of(DpSgdRelease(noise_multiplier=1.0, sample_rate=0.02, steps=500))
    actual = DpPlan.of(DpSgdRelease(noise_multiplier=1.0, sample_rate=0.02, steps=120))  # stopped early
    reservation = ledger.reserve("heart", "study-a", "task-1", planned)
    receipt = ledger.commit(reservation, actual)
    assert not receipt.exceeds_plan
    assert not receipt.over_budget
    assert receipt.actual_epsilon == pytest.approx(eps_of(actual))
    assert receipt.planned_epsilon == pytest.approx(eps_of(planned))
    assert ledger.spent("heart") == pytest.approx(eps_of(actual))
    assert ledger.pending("heart") == []


def test_actual_spend_above_plan_is_recorded_and_flagged(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 2.0, DELTA)
    planned = gaussian(4.0, 1)
    actual = gaussian(1.0, 3)  # far more than planned, and over the budget
    reservation = ledger.reserve("heart", "study-a", "task-1", planned)
    receipt = ledger.commit(reservation, actual)
    assert receipt.exceeds_plan
    assert receipt.over_budget
    assert ledger.spent("heart") == pytest.approx(eps_of(actual))
    with pytest.raises(TaskOverBudgetError):
        ledger.reserve("heart", "study-a", "task-2", gaussian(100.0, 1))


def test_release_returns_the_reservation_when_no_data_was_touched(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 1.0, DELTA)
    plan = gaussian(6.0, 1)
    reservation = ledger.reserve("heart", "study-a", "task-1", plan)
    ledger.release(reservation)
    assert ledger.spent("heart") == 0.0
    assert ledger.statement("heart").studies == ()


def test_a_reservation_settles_once(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 3.0, DELTA)
    plan = gaussian(6.0, 1)
    committed = ledger.reserve("heart", "study-a", "task-1", plan)
    ledger.commit(committed, plan)
    with pytest.raises(ReservationStateError, match="already committed"):
        ledger.commit(committed, plan)
    with pytest.raises(ReservationStateError, match="already committed"):
        ledger.release(committed)
    released = ledger.reserve("heart", "study-a", "task-2", plan)
    ledger.release(released)
    with pytest.raises(ReservationStateError, match="already released"):
        ledger.commit(released, plan)


def test_a_task_id_reserves_once_per_dataset(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 3.0, DELTA)
    ledger.set_budget("lungs", 3.0, DELTA)
    ledger.reserve("heart", "study-a", "task-1", gaussian(6.0))
    with pytest.raises(ReservationStateError, match="new task id"):
        ledger.reserve("heart", "study-a", "task-1", gaussian(6.0))
    ledger.reserve("lungs", "study-a", "task-1", gaussian(6.0))  # another dataset: its own ledger line


def test_commit_refuses_a_reservation_object_whose_plan_was_altered(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 3.0, DELTA)
    reservation = ledger.reserve("heart", "study-a", "task-1", gaussian(3.0, 2))
    altered = dataclasses.replace(reservation, planned=gaussian(30.0, 1))
    with pytest.raises(ReservationStateError, match="different plan"):
        ledger.commit(altered, gaussian(30.0, 1))
    assert ledger.spent("heart") == pytest.approx(eps_of(gaussian(3.0, 2)))


def test_unknown_reservation_is_not_found(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 3.0, DELTA)
    reservation = ledger.reserve("heart", "study-a", "task-1", gaussian(6.0))
    ghost = type(reservation)(
        reservation_id="rsv_ghost",
        dataset="heart",
        study_id="study-a",
        task_id="task-9",
        planned=reservation.planned,
        reserved_at=reservation.reserved_at,
    )
    with pytest.raises(NotFoundError):
        ledger.commit(ghost, reservation.planned)


def test_no_budget_means_no_spending(ledger_db):
    ledger = ledger_db.ledger()
    with pytest.raises(BudgetNotSetError, match="fedhealth site budget set heart"):
        ledger.reserve("heart", "study-a", "task-1", gaussian(6.0))
    with pytest.raises(BudgetNotSetError):
        ledger.statement("heart")


def test_lowering_the_budget_below_the_spend_refuses_later_tasks(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 3.0, DELTA)
    plan = gaussian(3.0, 1)
    ledger.commit(ledger.reserve("heart", "study-a", "task-1", plan), plan)
    ledger.set_budget("heart", 0.5, DELTA)
    assert ledger.budget("heart").epsilon == 0.5
    with pytest.raises(TaskOverBudgetError):
        ledger.reserve("heart", "study-a", "task-2", gaussian(500.0, 1))
    assert ledger.statement("heart").remaining_epsilon == 0.0


def test_noiseless_release_is_always_refused(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 1000.0, DELTA)
    noiseless = DpPlan.of(DpSgdRelease(noise_multiplier=0.0, sample_rate=1.0, steps=1))
    with pytest.raises(TaskOverBudgetError, match="infinite"):
        ledger.reserve("heart", "study-a", "task-1", noiseless)


def test_check_is_read_only(ledger_db):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 3.0, DELTA)
    check = ledger.check("heart", gaussian(3.0))
    assert check.allowed
    assert "accepted" in check.reason
    assert ledger.pending() == []


def test_study_calibrated_to_the_whole_budget_fits_exactly_under_pld(tmp_path):
    # The default accountant and calibration use the same settings, so a plan calibrated to the budget passes.
    engine = sqlite_engine(tmp_path / "site.sqlite")
    BudgetLedger.create_schema(engine)
    ledger = BudgetLedger(engine)
    assert ledger.accountant is AccountantKind.PLD
    ledger.set_budget("heart", 2.0, DELTA)
    sigma = calibrate_noise(2.0, DELTA, 0.05, 100)
    plan = DpPlan.of(DpSgdRelease(noise_multiplier=sigma, sample_rate=0.05, steps=100))
    ledger.reserve("heart", "study-a", "task-1", plan)
    assert ledger.spent("heart") <= 2.0
    with pytest.raises(TaskOverBudgetError):
        ledger.reserve("heart", "study-b", "task-2", gaussian(50.0, 1))


@pytest.mark.parametrize(
    ("dataset", "epsilon_", "delta", "error"),
    [
        ("Heart Disease", 1.0, DELTA, InputError),
        ("", 1.0, DELTA, InputError),
        ("heart", 0.0, DELTA, DpParameterError),
        ("heart", -1.0, DELTA, DpParameterError),
        ("heart", math.inf, DELTA, DpParameterError),
        ("heart", math.nan, DELTA, DpParameterError),
        ("heart", 1.0, 0.0, DpParameterError),
        ("heart", 1.0, 1.0, DpParameterError),
    ],
)
def test_invalid_budgets_are_refused(ledger_db, dataset, epsilon_, delta, error):
    ledger = ledger_db.ledger()
    with pytest.raises(error):
        ledger.set_budget(dataset, epsilon_, delta)
    assert ledger.budgets() == []


@pytest.mark.parametrize(("study_id", "task_id"), [("", "task-1"), ("study-a", ""), ("s" * 129, "task-1")])
def test_invalid_study_or_task_ids_are_refused(ledger_db, study_id, task_id):
    ledger = ledger_db.ledger()
    ledger.set_budget("heart", 1.0, DELTA)
    with pytest.raises(InputError):
        ledger.reserve("heart", study_id, task_id, gaussian(6.0))


# How long a reservation holds its window open for a second one to arrive; with the lock it never does.
WINDOW_HOLD_S = 2.0


def test_two_concurrent_reservations_that_only_fit_alone_do_not_both_pass(ledger_db, monkeypatch):
    # The interleaving is forced, not left to the scheduler: the first reservation waits inside its
    # check-then-write window until the second has called reserve() and then for the second to enter the
    # window too. Without the lock both would read an empty ledger there and both be written; with it the
    # second waits on the lock until the first has written, and is then refused.
    plan = gaussian(3.0, 2)
    budget = (eps_of(plan) + eps_of(plan + plan)) / 2  # room for one such task, not two
    ledger_db.ledger().set_budget("heart", budget, DELTA)
    first_inside = threading.Event()
    second_called = threading.Event()
    both_inside = threading.Barrier(2, timeout=WINDOW_HOLD_S)
    overlapped: list[bool] = []

    def window(dataset: str) -> None:
        if not first_inside.is_set():
            first_inside.set()
            assert second_called.wait(30), "the second reservation never started"
        try:
            both_inside.wait()
            overlapped.append(True)
        except threading.BrokenBarrierError:
            overlapped.append(False)

    monkeypatch.setattr("fedhealth.privacy._ledger._in_reservation_window", window)
    outcomes: dict[str, str] = {}

    def attempt(task: str, after: threading.Event | None) -> None:
        ledger = ledger_db.ledger()  # each thread its own ledger object and connections
        if after is not None:
            assert after.wait(30)
            second_called.set()
        try:
            ledger.reserve("heart", "study-a", task, plan)
            outcomes[task] = "reserved"
        except TaskOverBudgetError:
            outcomes[task] = "refused"
        except Exception as exc:  # recorded, so that the assertion below names it
            outcomes[task] = type(exc).__name__

    threads = [
        threading.Thread(target=attempt, args=("task-1", None)),
        threading.Thread(target=attempt, args=("task-2", first_inside)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert overlapped == [False, False], "two reservations were inside the check-then-write window at once"
    assert outcomes == {"task-1": "reserved", "task-2": "refused"}
    assert [r.task_id for r in ledger_db.ledger().pending("heart")] == ["task-1"]
    assert ledger_db.ledger().spent("heart") <= budget


_RESERVE_THEN_HANG = textwrap.dedent(
    """
    import sys, time
    import sqlalchemy as sa
    from fedhealth.core import ManualClock
    from fedhealth.privacy import AccountantKind, BudgetLedger, DpPlan, sqlite_engine
    url, search_path, plan_json = sys.argv[1:4]
    if search_path:
        engine = sa.create_engine(url, connect_args={"options": f"-csearch_path={search_path}"})
    else:
        engine = sqlite_engine(url)
    ledger = BudgetLedger(engine, ManualClock(), accountant=AccountantKind.RDP)
    ledger.reserve("heart", "study-a", "task-killed", DpPlan.from_json(__import__("json").loads(plan_json)))
    print("reserved", flush=True)
    time.sleep(120)  # "reading data and training": killed here, before any commit
    """
)


def test_sigkill_between_reserve_and_commit_never_under_counts(ledger_db):
    plan = gaussian(3.0, 2)
    budget = (eps_of(plan) + eps_of(plan + plan)) / 2  # room for one such task, not two
    ledger_db.ledger().set_budget("heart", budget, DELTA)
    args = [ledger_db.url, ledger_db.search_path or "", json.dumps(plan.to_json())]
    with subprocess.Popen(
        [sys.executable, "-c", _RESERVE_THEN_HANG, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None
        assert child.stderr is not None
        try:
            line = child.stdout.readline()
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        assert line.strip() == "reserved", child.stderr.read()
    assert child.returncode == -signal.SIGKILL
    # A new ledger (as after a restart) on the same database.
    engine = ledger_db.engine
    engine.dispose()
    after = BudgetLedger(engine, accountant=RDP)
    [orphan] = after.pending("heart")
    assert orphan.task_id == "task-killed"
    assert after.spent("heart") == pytest.approx(eps_of(plan))
    # This task would fit if the orphaned reservation were ignored; it is refused.
    assert eps_of(plan) <= budget
    with pytest.raises(TaskOverBudgetError):
        after.reserve("heart", "study-b", "task-next", plan)


def test_schema_creation_is_idempotent_and_uses_its_own_tables(ledger_db):
    BudgetLedger.create_schema(ledger_db.engine)
    tables = set(sa.inspect(ledger_db.engine).get_table_names())
    assert {"privacy_budget", "privacy_spend"} <= tables
    assert set(BudgetLedger.metadata.tables) == {"privacy_budget", "privacy_spend"}
