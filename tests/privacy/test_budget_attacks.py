"""Audit: attacks on the site-enforced privacy budget (docs/privacy.md, "The budget ledger at each hospital",
"How epsilon is accounted"; docs/statistics.md, "Noise and its accounting").

Each test plays one adversary against the site's real ``PrivacyGate`` and ``BudgetLedger`` on a real SQLite
file (and, where the guarantee is about the whole agent, the real agent with its real gates): a malicious
orchestrator or researcher trying to make the site charge less epsilon than it releases, splitting or
repeating releases, racing the ledger from threads, killing the agent mid-task, reusing task ids, or a study
with extreme values; a local user looking at the ledger's file. A test marked ``xfail(strict=True)`` shows a
defect: it passes while the defect is there and fails once it is fixed.
"""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from fedhealth.agent import PrivacyGate, SiteHome, TaskContext, TaskRefused
from fedhealth.core import FedHealthError
from fedhealth.data import TabularDataset
from fedhealth.privacy import (
    AccountantKind,
    BudgetLedger,
    DpParameterError,
    DpPlan,
    DpSgdRelease,
    GaussianRelease,
    epsilon,
    sqlite_engine,
)
from fedhealth.protocol import PrivacySpec, RecipeSpec, StudySpec, Task, TaskKind
from fedhealth.runtime._privacy import planned_epsilon, task_plan
from support import logreg_recipe

SITE = "site-a"
DATASET = "cohort"
DELTA = 1e-5
SIGMA, Q, STEPS = 1.2, 0.1, 8
ONE_ROUND = DpPlan.of(DpSgdRelease(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS))


# What a child process (an agent to kill, a computation to time) runs: the same task as ``ctx(dp_spec())``,
# built from fedhealth alone so that the child does not import the test suite.
CHILD_PRELUDE = f"""
from datetime import UTC, datetime
from pathlib import Path
from fedhealth.agent import PrivacyGate, TaskContext
from fedhealth.learning import LOGREG_RECIPE, LogRegParams
from fedhealth.privacy import sqlite_engine
from fedhealth.protocol import PrivacySpec, StudySpec, Task, TaskKind
from fedhealth.runtime import recipe_spec

def child_ctx(task_id="t1", rounds=1, steps={STEPS}, sigma={SIGMA}, rate={Q}):
    spec = StudySpec(
        name="study", dataset={DATASET!r}, recipe=recipe_spec(LOGREG_RECIPE, LogRegParams(n_features=2)),
        rounds=rounds, train_sites=[{SITE!r}],
        privacy=PrivacySpec(delta={DELTA!r}, noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=rate,
                            steps_per_round=steps),
    )
    task = Task(task_id=task_id, study_id="st-study", round=1, kind=TaskKind.TRAIN, dataset={DATASET!r},
                recipe=spec.recipe, model_digest="0" * 64, seed=0, deadline=datetime.now(UTC), spec=spec)
    return TaskContext(task=task, site={SITE!r})
"""


def dp_spec(name: str = "study", *, rounds: int = 1, **privacy: object) -> StudySpec:
    fields: dict[str, object] = {
        "delta": DELTA,
        "noise_multiplier": SIGMA,
        "max_grad_norm": 1.0,
        "sample_rate": Q,
        "steps_per_round": STEPS,
    }
    fields.update(privacy)
    return StudySpec(
        name=name,
        dataset=DATASET,
        recipe=logreg_recipe(2),
        rounds=rounds,
        train_sites=[SITE],
        privacy=PrivacySpec.model_validate(fields),
    )


def stats_spec(**params: object) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "describe",
            "dataset": DATASET,
            "recipe": RecipeSpec(name="stats", params={"features": ["f0"], **params}),
            "rounds": 1,
            "train_sites": [SITE, "site-b", "site-c"],
        }
    )


def ctx(
    spec: StudySpec,
    task_id: str = "t1",
    *,
    round: int = 1,
    kind: TaskKind = TaskKind.TRAIN,
    study_id: str | None = None,
) -> TaskContext:
    task = Task(
        task_id=task_id,
        study_id=study_id or f"st-{spec.name}",
        round=round,
        kind=kind,
        dataset=DATASET,
        recipe=spec.recipe,
        model_digest="0" * 64,
        seed=0,
        deadline=datetime.now(UTC),
        spec=spec,
    )
    return TaskContext(task=task, site=SITE)


def rows(n: int, width: int = 2) -> TabularDataset:
    rng = np.random.default_rng(n)
    return TabularDataset(
        name=DATASET,
        X_train=rng.normal(size=(n, width)),
        y_train=np.arange(n) % 2,
        X_test=rng.normal(size=(2, width)),
        y_test=np.array([0, 1]),
        feature_names=tuple(f"f{i}" for i in range(width)),
    )


def run(gate: PrivacyGate, c: TaskContext, dataset: TabularDataset | None = None) -> None:
    """What the agent does with a task that completes: reserve, read, train, commit, attest."""
    gate.before_data(c)
    gate.prepare_data(c, dataset if dataset is not None else rows(200))
    c.data_read = True
    gate.after_training(c)
    gate.attest(c)


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "site.sqlite"


def ledger_at(path: Path) -> BudgetLedger:
    engine = sqlite_engine(path)
    BudgetLedger.create_schema(engine)
    return BudgetLedger(engine)


def eps(plan: DpPlan, delta: float = DELTA) -> float:
    return epsilon(plan, delta=delta)


def rounds_of(plan: DpPlan, k: int) -> DpPlan:
    return DpPlan(releases=plan.releases * k)


# --- splitting and repeating ------------------------------------------------------------------------------


def test_splitting_one_study_into_many_one_round_studies_buys_no_extra_round(db):
    """The budget is per dataset, across studies (privacy.md, "How epsilon is accounted"): three rounds fit,
    a fourth does not, whether they come as one study or as five one-round studies under new names."""
    budget = (eps(rounds_of(ONE_ROUND, 3)) + eps(rounds_of(ONE_ROUND, 4))) / 2
    ledger_at(db).set_budget(DATASET, budget, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    outcomes = []
    for i in range(5):
        try:
            run(gate, ctx(dp_spec(f"slice-{i}"), task_id=f"slice-{i}"))
            outcomes.append("ran")
        except TaskRefused as refused:
            outcomes.append(refused.code)
    assert outcomes == ["ran"] * 3 + ["budget_exceeded"] * 2
    statement = ledger_at(db).statement(DATASET)
    assert statement.spent_epsilon == pytest.approx(eps(rounds_of(ONE_ROUND, 3)), rel=1e-9)
    assert statement.spent_epsilon <= budget


def test_splitting_a_round_into_tasks_of_fewer_steps_costs_what_the_whole_round_costs(db):
    """Two tasks of 4 steps compose to exactly one of 8 steps (identical mechanisms merge)."""
    ledger_at(db).set_budget(DATASET, 50.0, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    run(gate, ctx(dp_spec("half-1", steps_per_round=STEPS // 2), task_id="h1"))
    run(gate, ctx(dp_spec("half-2", steps_per_round=STEPS // 2), task_id="h2"))
    assert ledger_at(db).spent(DATASET) == pytest.approx(eps(ONE_ROUND), rel=1e-9)


def test_repeated_identical_noisy_statistics_are_each_charged_until_the_budget_refuses(db):
    """docs/statistics.md: each noisy session is one Gaussian release charged to the ledger; averaging k
    identical sessions costs k releases, so the number of sessions a budget allows is bounded."""
    z = 4.0
    one = GaussianRelease(noise_multiplier=z)
    k = 5
    budget = (eps(DpPlan.of(one.repeated(k))) + eps(DpPlan.of(one.repeated(k + 1)))) / 2
    ledger_at(db).set_budget(DATASET, budget, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    outcomes = []
    for i in range(k + 2):
        c = ctx(stats_spec(noise_multiplier=z), task_id=f"session-{i}", kind=TaskKind.COLLECTIVE)
        try:
            run(gate, c)
            outcomes.append("ran")
        except TaskRefused as refused:
            outcomes.append(refused.code)
    assert outcomes == ["ran"] * k + ["budget_exceeded"] * 2
    assert ledger_at(db).spent(DATASET) == pytest.approx(eps(DpPlan.of(one.repeated(k))), rel=1e-9)


def test_a_dp_training_study_relabelled_as_a_collective_session_is_charged_as_exact_and_refused(db):
    """A lying orchestrator sends a training study's task as a collective session (no DP-SGD plan): the
    gate charges what the recipe's session declares (nothing: exact), i.e. infinite epsilon, and refuses."""
    ledger_at(db).set_budget(DATASET, 100.0, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx(dp_spec(), kind=TaskKind.COLLECTIVE))
    assert refused.value.code == "budget_exceeded"
    assert ledger_at(db).pending(DATASET) == []


# --- the delta the ledger charges at, and 1/n -------------------------------------------------------------


def test_a_study_with_a_weaker_delta_is_charged_at_the_budgets_stricter_delta(db):
    """privacy.md, "At which delta": the ledger accounts every release at its budget's delta, so a study
    cannot make its rounds cheaper by stating a larger delta."""
    ledger_at(db).set_budget(DATASET, 50.0, 1e-7)
    gate = PrivacyGate(sqlite_engine(db))
    run(gate, ctx(dp_spec(delta=1e-3)))
    charged = ledger_at(db).spent(DATASET)
    assert charged == pytest.approx(eps(ONE_ROUND, 1e-7), rel=1e-9)
    assert charged > eps(ONE_ROUND, 1e-3)


def test_a_training_study_on_a_dataset_whose_budget_delta_is_at_least_one_over_n_is_refused(db):
    """The control for the statistics test below: 10 training rows, budget delta 0.2 >= 1/10."""
    ledger_at(db).set_budget(DATASET, 50.0, 0.2)
    gate = PrivacyGate(sqlite_engine(db))
    c = ctx(dp_spec(delta=1e-3))
    gate.before_data(c)
    with pytest.raises(TaskRefused) as refused:
        gate.prepare_data(c, rows(10))
    assert refused.value.code == "invalid_privacy"


@pytest.mark.parametrize(
    ("budget_delta", "params"),
    [
        (0.2, {"noise_multiplier": 4.0}),  # the site's budget: delta 0.2 >= 1/10
        (1e-5, {"target_epsilon": 1.0, "delta": 0.2}),  # the session's own delta 0.2 >= 1/10
    ],
    ids=["budget-delta", "session-delta"],
)
def test_a_noisy_statistics_session_with_a_delta_at_least_one_over_n_is_refused_before_computing(
    db, budget_delta, params
):
    """privacy.md: "A delta at or above 1/n for a site's n training records is refused, by the site for a
    study or a budget" (invalid_privacy, "checked once the rows are counted, before anything is computed on
    them"); statistics.md: noisy sessions are charged "like every other DP release"."""
    ledger_at(db).set_budget(DATASET, 50.0, budget_delta)
    gate = PrivacyGate(sqlite_engine(db))
    c = ctx(stats_spec(**params), kind=TaskKind.COLLECTIVE)
    gate.before_data(c)  # reserved: the budget pays for one Gaussian release
    with pytest.raises(TaskRefused) as refused:
        gate.prepare_data(c, rows(10))
    assert refused.value.code == "invalid_privacy"


# --- calibration: the charge is the target ---------------------------------------------------------------


@pytest.mark.parametrize(
    "privacy",
    [
        {"target_epsilon": 1.0, "noise_multiplier": None},
        {"mode": "site-central", "target_epsilon": 1.0, "noise_multiplier": None},
    ],
    ids=["record", "site-central"],
)
def test_a_budget_equal_to_the_target_pays_for_every_round_of_the_study_and_nothing_more(db, privacy):
    """privacy.md, "Calibration": target_epsilon is the record-level epsilon each hospital is charged for
    the whole study; so a budget of exactly the target at the spec's delta runs all rounds, and a replayed
    round under a fresh task id is refused."""
    rounds = 3
    fields = dict(privacy)
    if fields.get("mode") == "site-central":
        fields |= {"sample_rate": None, "steps_per_round": None}
    spec = dp_spec("calibrated", rounds=rounds, **fields)
    assert planned_epsilon(spec, SITE) <= 1.0
    ledger_at(db).set_budget(DATASET, 1.0, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    for r in range(1, rounds + 1):
        run(gate, ctx(spec, task_id=f"r{r}", round=r))
    assert ledger_at(db).spent(DATASET) <= 1.0
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx(spec, task_id="replay", round=rounds))
    assert refused.value.code == "budget_exceeded"


def test_a_noisy_statistics_session_calibrated_to_the_budget_fits_it_exactly_once(db):
    ledger_at(db).set_budget(DATASET, 0.8, 1e-6)
    gate = PrivacyGate(sqlite_engine(db))
    spec = stats_spec(target_epsilon=0.8, delta=1e-6)
    run(gate, ctx(spec, task_id="s1", kind=TaskKind.COLLECTIVE))
    assert ledger_at(db).spent(DATASET) <= 0.8
    with pytest.raises(TaskRefused):
        gate.before_data(ctx(spec, task_id="s2", kind=TaskKind.COLLECTIVE))


def test_the_ledgers_pld_never_reports_less_than_a_finer_pld_of_the_same_events():
    """privacy.md: "PLD uses a pessimistic discretisation, so rounding only ever raises epsilon"."""
    import dp_accounting
    from dp_accounting import pld

    release = DpSgdRelease(noise_multiplier=1.1, sample_rate=0.05, steps=300)
    finer = pld.PLDAccountant(value_discretization_interval=1e-4)
    finer.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 300
        )
    )
    assert epsilon(release, delta=DELTA) >= finer.get_epsilon(DELTA) - 1e-12
    assert epsilon(release, delta=DELTA) <= epsilon(release, delta=DELTA, accountant=AccountantKind.RDP)


# --- lying about parameters: bad values ----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"noise_multiplier": float("nan")},
        {"noise_multiplier": float("inf")},
        {"noise_multiplier": -1.0},
        {"sample_rate": 0.0},
        {"sample_rate": 1.5},
        {"sample_rate": float("nan")},
        {"steps_per_round": 0},
        {"steps_per_round": 2.5},
        {"steps_per_round": -3},
        {"max_grad_norm": 0.0},
        {"max_grad_norm": float("inf")},
        {"delta": 0.0},
        {"delta": 1.0},
        {"delta": float("nan")},
    ],
)
def test_a_privacy_section_with_a_nan_infinite_negative_or_out_of_range_value_is_refused(bad):
    with pytest.raises(ValueError):
        dp_spec(**bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"noise_multiplier": float("nan"), "sample_rate": 0.1, "steps": 1},
        {"noise_multiplier": -0.5, "sample_rate": 0.1, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": float("inf"), "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1.0},
        {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": True},
        {"noise_multiplier": True, "sample_rate": 0.1, "steps": 1},
    ],
)
def test_a_release_cannot_be_recorded_with_a_value_the_accountant_and_trainer_could_read_differently(bad):
    with pytest.raises(DpParameterError):
        DpSgdRelease(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.0, True])
def test_a_budget_cannot_be_set_to_a_nan_infinite_or_non_positive_epsilon(db, value):
    with pytest.raises(DpParameterError):
        ledger_at(db).set_budget(DATASET, value, DELTA)


def test_a_noise_multiplier_so_small_it_breaks_the_accountant_is_never_trained_on(db):
    """1e-300 passes the spec's ``ge=0``; dp-accounting then fails (a division by zero). The gate must not
    treat that as a pass: nothing reserved, nothing committed, the task does not reach the data."""
    ledger_at(db).set_budget(DATASET, 1000.0, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    c = ctx(dp_spec(noise_multiplier=1e-300, rounds=2))
    with pytest.raises(FedHealthError):  # a refusal or the accountant's PrivacyError: it stops here
        gate.before_data(c)
    assert ledger_at(db).pending(DATASET) == []
    assert ledger_at(db).statement(DATASET).studies == ()


def test_the_largest_study_a_spec_allows_is_accounted_quickly_by_the_site(db):
    """_accounting.py: "a study spec could stall or kill a site agent. The PLD path therefore first computes
    a cheap RDP upper bound". A study at the spec's limits (1e6 steps per round, 1e5 rounds: 1e11 steps) at
    a tiny sample rate, whose epsilon is small, must still not stall the agent in the gate's whole-study
    check (privacy.md, step 2). Run in a child process with a deadline far above the ~5 s that accounting
    one round of it takes."""
    ledger_at(db).set_budget(DATASET, 5.0, DELTA)
    code = (
        CHILD_PRELUDE
        + f"""
from fedhealth.agent import TaskRefused
gate = PrivacyGate(sqlite_engine(Path({str(db)!r})))
try:
    gate.before_data(child_ctx(rounds=100_000, steps=1_000_000, sigma=1.0, rate=1e-6))
    print("accepted")
except TaskRefused as refused:
    print(refused.code)
"""
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=40, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the site's privacy gate was still accounting the study after 40 s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in {"accepted", "budget_exceeded"}


# --- concurrency --------------------------------------------------------------------------------------------


def test_reservations_racing_from_threads_cannot_together_exceed_the_budget(db, monkeypatch):
    """Four agents (or threads) on the same site database reserve at once, each with its own engine and
    gate; the window between reading the spend and writing the reservation is held open. The budget fits
    one round: exactly one reservation may land."""
    budget = (eps(ONE_ROUND) + eps(rounds_of(ONE_ROUND, 2))) / 2
    ledger_at(db).set_budget(DATASET, budget, DELTA)
    eps(ONE_ROUND)
    eps(rounds_of(ONE_ROUND, 2))  # warm the accountant's cache: the race is about the lock, not speed
    monkeypatch.setattr("fedhealth.privacy._ledger._in_reservation_window", lambda _d: time.sleep(0.3))
    gates = [PrivacyGate(sqlite_engine(db)) for _ in range(4)]
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(gates))

    def attempt(i: int) -> None:
        c = ctx(dp_spec(f"racer-{i}"), task_id=f"race-{i}")
        start.wait()
        try:
            gates[i].before_data(c)
            result = "reserved"
        except TaskRefused as refused:
            result = refused.code
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(gates))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["budget_exceeded"] * 3 + ["reserved"]
    assert len(ledger_at(db).pending(DATASET)) == 1
    assert ledger_at(db).spent(DATASET) <= budget


def test_one_task_id_handed_to_two_agents_at_once_is_reserved_once(db, monkeypatch):
    ledger_at(db).set_budget(DATASET, 100.0, DELTA)
    eps(ONE_ROUND)
    monkeypatch.setattr("fedhealth.privacy._ledger._in_reservation_window", lambda _d: time.sleep(0.3))
    gates = [PrivacyGate(sqlite_engine(db)) for _ in range(2)]
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def attempt(gate: PrivacyGate) -> None:
        c = ctx(dp_spec(), task_id="same-task")
        start.wait()
        try:
            gate.before_data(c)
            outcomes.append("reserved")
        except TaskRefused as refused:
            outcomes.append(refused.code)

    threads = [threading.Thread(target=attempt, args=(g,)) for g in gates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["budget_already_charged", "reserved"]


# --- crashes and task ids ---------------------------------------------------------------------------------


def test_a_reservation_survives_the_agent_being_killed_before_it_reads_data(db):
    """privacy.md: "The reservation is on disk before any data is read"; "If the agent is killed between
    reserving and committing, the reservation stays on the ledger and counts in full". A child process
    reserves through the gate and is SIGKILLed at once (no cleanup, no commit)."""
    budget = (eps(ONE_ROUND) + eps(rounds_of(ONE_ROUND, 2))) / 2
    ledger_at(db).set_budget(DATASET, budget, DELTA)
    code = (
        CHILD_PRELUDE
        + f"""
import os, signal
PrivacyGate(sqlite_engine(Path({str(db)!r}))).before_data(child_ctx(task_id="doomed"))
os.kill(os.getpid(), signal.SIGKILL)
"""
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    restarted = PrivacyGate(sqlite_engine(db))
    assert [r.task_id for r in restarted.report_pending()] == ["doomed"]
    assert ledger_at(db).spent(DATASET) == pytest.approx(eps(ONE_ROUND), rel=1e-9)
    with pytest.raises(TaskRefused) as again:  # the same task is not run on a charge that may have left
        restarted.before_data(ctx(dp_spec(), task_id="doomed"))
    assert again.value.code == "budget_already_charged"
    with pytest.raises(TaskRefused) as other:  # and the charge counts against every later task
        restarted.before_data(ctx(dp_spec("next"), task_id="next"))
    assert other.value.code == "budget_exceeded"


def test_a_held_reservation_is_not_taken_by_another_study_with_an_identical_plan(db):
    """privacy.md: a reservation for a task whose data was never read "is taken again only by the same
    task: the same dataset, study and plan". The plan alone matching is not enough."""
    ledger_at(db).set_budget(DATASET, 100.0, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    gate.before_data(ctx(dp_spec("first"), task_id="tk", study_id="st-first"))  # then the download failed
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx(dp_spec("second"), task_id="tk", study_id="st-second"))
    assert refused.value.code == "budget_already_charged"


def test_a_task_that_fails_after_reading_rows_is_charged_and_its_id_never_runs_again(db):
    ledger_at(db).set_budget(DATASET, 100.0, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    c = ctx(dp_spec(), task_id="crashy")
    gate.before_data(c)
    gate.prepare_data(c, rows(50))
    c.data_read = True
    gate.on_failed(c, RuntimeError("training blew up"))
    assert ledger_at(db).spent(DATASET) == pytest.approx(eps(ONE_ROUND), rel=1e-9)
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx(dp_spec(), task_id="crashy"))
    assert refused.value.code == "budget_already_charged"


def test_lowering_the_budget_mid_study_refuses_the_next_round(db):
    ledger_at(db).set_budget(DATASET, 100.0, DELTA)
    gate = PrivacyGate(sqlite_engine(db))
    spec = dp_spec(rounds=3)
    run(gate, ctx(spec, task_id="r1", round=1))
    ledger_at(db).set_budget(DATASET, eps(ONE_ROUND) * 1.01, DELTA)
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx(spec, task_id="r2", round=2))
    assert refused.value.code == "budget_exceeded"


def test_site_modes_charge_the_record_level_release_at_half_the_noise_multiplier():
    """privacy.md, "Site level": one patient moves the clipped update by up to 2C."""
    spec = dp_spec(mode="site-central", sample_rate=None, steps_per_round=None, noise_multiplier=3.0)
    assert task_plan(spec, TaskKind.TRAIN, SITE) == DpPlan.of(GaussianRelease(noise_multiplier=1.5))
    assert task_plan(spec, TaskKind.EVALUATE, SITE) == DpPlan()


# --- a local user and the ledger's file ----------------------------------------------------------------


def test_the_ledger_file_is_private_to_the_site_account_under_a_permissive_umask(tmp_path):
    """privacy.md, site-side threat rows: another local user cannot read or edit ``site.sqlite`` (the
    budget lives there): the file is created 0600 whatever the umask, and so are its journal files."""
    home_dir = tmp_path / "home"
    home_dir.mkdir(mode=0o700)
    old = os.umask(0)
    try:
        home = SiteHome(home_dir)
        gate = PrivacyGate.from_home(home)
        gate.ledger.set_budget(DATASET, 5.0, DELTA)
        gate.before_data(ctx(dp_spec(), task_id="perm"))
    finally:
        os.umask(old)
    files = [p for p in home_dir.iterdir() if p.name.startswith("site.sqlite")]
    assert files
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.name} is {oct(mode)}"


def test_a_budget_is_not_weakened_by_merging_releases_that_differ_only_in_float_representation():
    """Merging identical mechanisms must not lump together releases that only look alike: a sample rate
    of 0.1 and one a hair above it stay apart (their epsilons differ), and ``-0.0`` noise is still no
    noise (infinite epsilon)."""
    a = DpSgdRelease(noise_multiplier=1.0, sample_rate=0.1, steps=10)
    b = DpSgdRelease(noise_multiplier=1.0, sample_rate=math.nextafter(0.1, 1.0), steps=10)
    merged = DpPlan.of(a, b).merged()
    assert len(merged.releases) == 2
    assert epsilon(DpPlan.of(GaussianRelease(noise_multiplier=-0.0)), delta=DELTA) == math.inf


# --- uncharged paths and predictable noise --------------------------------------------------------------


def test_an_evaluation_task_for_a_noisy_statistics_study_reads_no_data_and_charges_nothing(tmp_path):
    """Evaluations are not charged (privacy.md); a lying orchestrator hands out a noisy statistics study as
    an evaluation task (in its evaluation round and in its session's round) to get figures uncharged. The
    real agent with its real gates refuses before opening the dataset."""
    import base64
    from datetime import timedelta

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
    from site_fixtures import agent, approve, make_home

    from fedhealth.protocol import SecureAggregationSpec

    home = make_home(tmp_path / "site")
    sites = ["hospital-a", "site-b", "site-c"]
    keys = {s: f"{i:064x}" for i, s in enumerate(sites)}
    keys["hospital-a"] = home.identity().public().fingerprint
    spec = StudySpec.model_validate(
        {
            "name": "describe",
            "dataset": DATASET,
            "recipe": RecipeSpec(name="stats", params={"features": ["age"], "noise_multiplier": 2.0}),
            "rounds": 1,
            "train_sites": sites,
            "secure_aggregation": SecureAggregationSpec(site_keys=keys),
        }
    )
    ledger_at(home.database_path).set_budget(DATASET, 10.0, DELTA)
    approve(home, spec)
    # the dataset file does not exist: a site that opened it would report dataset_unavailable
    site, client = agent(home, {DATASET: f"file://{tmp_path}/absent.csv?label=label&id=patient_id"})
    for r in (1, 2):
        site.handle(
            Task(
                task_id=f"eval-{r}",
                study_id="st-describe",
                round=r,
                kind=TaskKind.EVALUATE,
                dataset=DATASET,
                recipe=spec.recipe,
                model_digest="0" * 64,
                model_inline=base64.b64encode(b"x").decode(),
                seed=spec.seed,
                deadline=datetime.now(UTC) + timedelta(minutes=5),
                spec=spec,
            )
        )
    codes = [f.code.value for f in client.failures]
    assert len(codes) == 2
    assert "dataset_unavailable" not in codes
    assert client.evaluations == []
    assert ledger_at(home.database_path).statement(DATASET).studies == ()


def test_a_sites_statistics_and_training_noise_come_from_the_csprng_unless_reproducible_noise_is_set(
    monkeypatch,
):
    """privacy.md / statistics.md: noise is drawn from the CSPRNG; the study seed (known to the
    orchestrator) must not determine it unless the site itself sets FEDHEALTH_REPRODUCIBLE_NOISE=1."""
    from fedhealth.privacy import SecureRandom
    from fedhealth.runtime._collective import session_context
    from fedhealth.runtime._privacy import REPRODUCIBLE_NOISE_ENV, noise_generator

    monkeypatch.delenv(REPRODUCIBLE_NOISE_ENV, raising=False)
    spec = stats_spec(noise_multiplier=2.0)
    assert isinstance(session_context(spec, SITE).noise, SecureRandom)
    assert isinstance(noise_generator(np.random.default_rng(spec.seed), None), SecureRandom)
    monkeypatch.setenv(REPRODUCIBLE_NOISE_ENV, "true")  # only exactly "1" switches it on
    assert isinstance(noise_generator(np.random.default_rng(spec.seed), None), SecureRandom)
