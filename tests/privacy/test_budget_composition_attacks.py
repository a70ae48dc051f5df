"""Audit: composing releases against the site's budget, and what the site actually releases (docs/privacy.md,
"How epsilon is accounted", "The budget ledger at each hospital", "What the guarantee does not cover").

Where tests/privacy/test_budget_attacks.py covers the ledger's basics, these play what it left: an
orchestrator re-running a round under a new task id after a crash, the same patients under a second dataset
name, the accountant at the edges of what a spec allows (a sample rate of 1, deltas at their bounds, many tiny
releases whose rounded epsilons could add up past the budget), the imaging DP-SGD trainer asked by its params
for more steps than it is charged, a noisy statistics session on a dataset with no training row, and a local
user deleting the ledger's rows. A test marked ``xfail(strict=True)`` shows a defect.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest
import sqlalchemy as sa
from scipy.optimize import brentq
from scipy.stats import norm

from fedhealth.agent import PrivacyGate, TaskContext, TaskRefused
from fedhealth.agent._privacy import AUDIT_LOG_STATE
from fedhealth.core import ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.data import TabularDataset
from fedhealth.governance import AuditEventType, AuditLog, create_governance_tables
from fedhealth.privacy import (
    AccountantKind,
    BudgetLedger,
    DpPlan,
    DpSgdRelease,
    GaussianRelease,
    TaskOverBudgetError,
    epsilon,
    sqlite_engine,
)
from fedhealth.protocol import PrivacySpec, RecipeSpec, StudySpec, Task, TaskKind
from support import logreg_recipe

SITE = "site-a"
DATASET = "cohort"
DELTA = 1e-5
SIGMA, Q, STEPS = 1.2, 0.1, 8
ONE_ROUND = DpPlan.of(DpSgdRelease(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS))
T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def dp_spec(name: str = "study", *, dataset: str = DATASET, rounds: int = 1) -> StudySpec:
    return StudySpec(
        name=name,
        dataset=dataset,
        recipe=logreg_recipe(2),
        rounds=rounds,
        train_sites=[SITE],
        privacy=PrivacySpec(
            delta=DELTA, noise_multiplier=SIGMA, max_grad_norm=1.0, sample_rate=Q, steps_per_round=STEPS
        ),
    )


def plain_spec(name: str, *, dataset: str) -> StudySpec:
    return StudySpec(name=name, dataset=dataset, recipe=logreg_recipe(2), rounds=1, train_sites=[SITE])


def ctx(
    spec: StudySpec, task_id: str, *, round: int = 1, kind: TaskKind = TaskKind.TRAIN, study_id: str = ""
) -> TaskContext:
    task = Task(
        task_id=task_id,
        study_id=study_id or f"st-{spec.name}",
        round=round,
        kind=kind,
        dataset=spec.dataset,
        recipe=spec.recipe,
        model_digest="0" * 64,
        seed=0,
        deadline=T,
        spec=spec,
    )
    return TaskContext(task=task, site=SITE)


def rows(n_train: int, n_test: int = 2, width: int = 2) -> TabularDataset:
    rng = np.random.default_rng(n_train + 7 * n_test)
    return TabularDataset(
        name=DATASET,
        X_train=rng.normal(size=(n_train, width)),
        y_train=np.arange(n_train) % 2,
        X_test=rng.normal(size=(n_test, width)),
        y_test=np.arange(n_test) % 2,
        feature_names=tuple(f"f{i}" for i in range(width)),
    )


def ledger(engine: sa.Engine) -> BudgetLedger:
    BudgetLedger.create_schema(engine)
    return BudgetLedger(engine)


def eps(plan: DpPlan) -> float:
    return epsilon(plan, delta=DELTA)


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The tight epsilon of a mu-GDP mechanism at ``delta`` (Balle and Wang 2018, Theorem 8): the root of
    ``Phi(-e/mu + mu/2) - e^e Phi(-e/mu - mu/2) = delta``, 0 when even e = 0 meets delta."""

    def gap(e: float) -> float:
        return float(norm.cdf(-e / mu + mu / 2) - math.exp(e + norm.logcdf(-e / mu - mu / 2)) - delta)

    return 0.0 if gap(0.0) <= 0 else float(brentq(gap, 0.0, 5000.0, xtol=1e-12))


# --- composition: re-runs, retries, and the same patients under two names ----------------------------------


def test_a_round_rerun_under_a_new_task_id_after_a_crash_is_charged_on_top_of_the_crashed_attempt(tmp_path):
    """An orchestrator restart re-issues round 1 as attempt B after attempt A's agent died while training:
    whatever A released may have left, so A stays charged, B is charged too, and averaging re-runs of a
    round to cancel its noise costs every re-run until the budget refuses one. Attempt A's id never runs
    again, even on a fresh agent."""
    engine = sqlite_engine(tmp_path / "site.sqlite")
    ledger(engine).set_budget(
        DATASET,
        (eps(DpPlan(releases=ONE_ROUND.releases * 2)) + eps(DpPlan(releases=ONE_ROUND.releases * 3))) / 2,
        DELTA,
    )
    spec = dp_spec(rounds=1)

    crashed = PrivacyGate(engine)
    attempt_a = ctx(spec, "round-1-attempt-a")
    crashed.before_data(attempt_a)
    crashed.prepare_data(attempt_a, rows(50))
    attempt_a.data_read = True  # ... and the agent is killed here: no commit, no release

    restarted = PrivacyGate(engine)
    assert [r.task_id for r in restarted.report_pending()] == ["round-1-attempt-a"]
    attempt_b = ctx(spec, "round-1-attempt-b")
    restarted.before_data(attempt_b)
    restarted.prepare_data(attempt_b, rows(50))
    attempt_b.data_read = True
    restarted.after_training(attempt_b)

    statement = ledger(engine).statement(DATASET)
    assert statement.spent_epsilon == pytest.approx(eps(DpPlan(releases=ONE_ROUND.releases * 2)), rel=1e-9)
    (study,) = statement.studies
    assert (study.committed_tasks, study.reserved_tasks) == (1, 1)
    with pytest.raises(TaskRefused) as third:  # a third copy of the round would overrun the budget
        restarted.before_data(ctx(spec, "round-1-attempt-c"))
    assert third.value.code == "budget_exceeded"
    with pytest.raises(TaskRefused) as again:
        restarted.before_data(ctx(spec, "round-1-attempt-a"))
    assert again.value.code == "budget_already_charged"


def test_the_budget_is_per_registered_dataset_name_so_a_second_name_for_the_same_rows_is_a_second_budget(
    tmp_path,
):
    """docs/privacy.md ("Per dataset name, not per patient"): the ledger keys budgets by the name a dataset is
    registered under and cannot see that two names hold the same patients. The same rows under a second
    name get a fresh budget, and with no budget on the second name a study without any DP runs on them:
    what the site must not do. This pins the documented limit, so that a change of it is seen."""
    engine = sqlite_engine(tmp_path / "site.sqlite")
    book = ledger(engine)
    book.set_budget(DATASET, eps(ONE_ROUND) * 1.01, DELTA)
    gate = PrivacyGate(engine)
    same_rows = rows(50)

    first = ctx(dp_spec("first"), "t-first")
    gate.before_data(first)
    gate.prepare_data(first, same_rows)
    first.data_read = True
    gate.after_training(first)
    with pytest.raises(TaskRefused) as spent:
        gate.before_data(ctx(dp_spec("second"), "t-second"))
    assert spent.value.code == "budget_exceeded"

    book.set_budget("cohort-copy", eps(ONE_ROUND) * 1.01, DELTA)  # the same source, registered again
    copy = ctx(dp_spec("second", dataset="cohort-copy"), "t-copy")
    gate.before_data(copy)
    gate.prepare_data(copy, same_rows)
    assert book.spent("cohort-copy") == pytest.approx(eps(ONE_ROUND), rel=1e-9)
    assert book.spent(DATASET) == pytest.approx(eps(ONE_ROUND), rel=1e-9)  # neither sees the other

    unbudgeted = ctx(plain_spec("exact", dataset="cohort-raw"), "t-raw")
    gate.before_data(unbudgeted)  # no budget on the name: a study without DP is not refused
    assert gate.prepare_data(unbudgeted, same_rows) is same_rows


def test_an_evaluation_of_a_dp_study_is_never_charged_and_never_holds_a_reservation(tmp_path):
    """docs/privacy.md: evaluation releases metrics of the held-out rows and is not charged. An orchestrator
    that sends a study's evaluation round, many times over, neither spends the training records' budget nor
    leaves a reservation that would block the next training round."""
    engine = sqlite_engine(tmp_path / "site.sqlite")
    ledger(engine).set_budget(DATASET, eps(ONE_ROUND) * 1.01, DELTA)
    gate = PrivacyGate(engine)
    spec = dp_spec(rounds=1)
    for i in range(5):
        c = ctx(spec, f"eval-{i}", round=2, kind=TaskKind.EVALUATE)
        gate.before_data(c)
        gate.prepare_data(c, rows(50))
        c.data_read = True
        gate.after_training(c)
    assert ledger(engine).statement(DATASET).studies == ()
    train = ctx(spec, "train-1")
    gate.before_data(train)  # the one round the budget pays for still fits
    assert ledger(engine).spent(DATASET) == pytest.approx(eps(ONE_ROUND), rel=1e-9)


# --- accounting arithmetic at the edges --------------------------------------------------------------------


@pytest.mark.parametrize("delta", [1e-12, 1e-5, 0.3, 0.99])
@pytest.mark.parametrize(("sigma", "steps"), [(0.5, 1), (0.5, 3), (2.0, 1), (2.0, 3)])
def test_dp_sgd_at_sample_rate_one_is_charged_no_less_than_the_exact_gaussian_mechanism(sigma, steps, delta):
    """At q = 1 a DP-SGD step is the plain Gaussian mechanism, whose epsilon is known exactly (sqrt(steps) /
    sigma GDP). Both accountants, at deltas at both ends of (0, 1), must answer a finite, non-negative
    epsilon no smaller than it (an accountant below it under-charges; a NaN or negative one would pass any
    budget check), and PLD within 1e-3 of it (a loose bound wastes the patients' budget)."""
    exact = exact_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    release = DpSgdRelease(noise_multiplier=sigma, sample_rate=1.0, steps=steps)
    pld = epsilon(release, delta=delta)
    rdp = epsilon(release, delta=delta, accountant=AccountantKind.RDP)
    for charged in (pld, rdp):
        assert math.isfinite(charged)
        assert charged >= 0
        assert charged >= exact - 1e-9
    assert pld <= exact * (1 + 1e-3) + 1e-6
    gaussian = epsilon(GaussianRelease(noise_multiplier=sigma, count=steps), delta=delta)
    assert pld == pytest.approx(gaussian, rel=1e-4, abs=1e-6)  # one mechanism, one charge


def test_many_tiny_releases_cannot_add_up_past_the_budget_through_rounding(tmp_path):
    """Forty noisy statistics sessions at multiplier 20, each charged on its own: together they are exactly
    sqrt(40) / 20 GDP. With a budget a hair below that exact epsilon, the ledger must refuse the fortieth,
    however small each charge rounds to (0.2 each; they compose, they do not add)."""
    engine = sqlite_engine(tmp_path / "site.sqlite")
    book = ledger(engine)
    exact = exact_gaussian_epsilon(math.sqrt(40) / 20.0, DELTA)
    book.set_budget(DATASET, exact * (1 - 1e-9), DELTA)
    session = DpPlan.of(GaussianRelease(noise_multiplier=20.0))
    for i in range(39):
        book.reserve(DATASET, f"st-{i}", f"session-{i}", session)
    with pytest.raises(TaskOverBudgetError):
        book.reserve(DATASET, "st-39", "session-39", session)
    assert book.spent(DATASET) <= exact * (1 - 1e-9)


# --- imaging DP-SGD: the steps it runs are the steps it is charged ----------------------------------------


def test_imaging_dp_sgd_runs_the_charged_steps_at_the_charged_rate_whatever_its_epochs_and_batch_size(
    monkeypatch,
):
    """The orchestrator sets the recipe's ``local_epochs`` (up to 1000) and ``batch_size`` (up to 100,000):
    neither may make the DP-SGD trainer take more steps, or larger samples, than the ``RecordDp`` the ledger
    charged. Here 50 epochs at a batch far larger than the consent-filtered 5 rows: exactly the charged 3
    Poisson samples, each over the 5 rows actually trained on, at the charged rate."""
    pytest.importorskip("opacus")
    from fedhealth.learning import _torch_recipe as tr
    from fedhealth.learning._config import LocalOptimizer
    from fedhealth.learning._recipe import RecordDp

    params = tr.TorchParams(
        input_size=8, norm=tr.Norm.GROUP, optimizer=LocalOptimizer.SGD, local_epochs=50, batch_size=100_000
    )
    rng = np.random.default_rng(0)
    full = TabularDataset(
        name="images",
        X_train=rng.random((8, params.n_features)),
        y_train=np.arange(8) % 2,
        X_test=rng.random((2, params.n_features)),
        y_test=np.array([0, 1]),
        feature_names=tuple(f"px{i}" for i in range(params.n_features)),
    )
    consented = full.select(np.array([1, 1, 0, 1, 0, 1, 1, 0], bool), np.ones(2, bool))
    draws: list[tuple[int, float]] = []
    real = tr.poisson_sample

    def spy(n: int, rate: float, generator: object) -> np.ndarray:
        draws.append((n, rate))
        return real(n, rate, generator)

    monkeypatch.setattr(tr, "poisson_sample", spy)
    charged = RecordDp(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=3)
    result = tr.TORCH_RECIPE.train(params, tr.TORCH_RECIPE.init(params, 0), consented, rng, record_dp=charged)
    assert draws == [(5, 0.5)] * 3
    assert (result.steps, result.num_samples) == (3, 5)


def test_a_batchnorm_network_is_refused_by_the_dp_sgd_trainer_itself_not_only_by_the_spec_check():
    """BatchNorm's running statistics are computed from the batch without noise and exported with the model:
    trained under DP-SGD they would release the records un-noised. The spec check refuses ``norm = batch``;
    a direct call of the trainer with it (a task whose recipe differs from its checked spec) must refuse as
    well, before any statistic leaves."""
    pytest.importorskip("opacus")
    from fedhealth.learning import _torch_recipe as tr
    from fedhealth.learning._config import LocalOptimizer
    from fedhealth.learning._recipe import RecordDp

    params = tr.TorchParams(input_size=8, norm=tr.Norm.BATCH, optimizer=LocalOptimizer.SGD)
    rng = np.random.default_rng(0)
    images = TabularDataset(
        name="images",
        X_train=rng.random((6, params.n_features)),
        y_train=np.arange(6) % 2,
        X_test=rng.random((2, params.n_features)),
        y_test=np.array([0, 1]),
        feature_names=tuple(f"px{i}" for i in range(params.n_features)),
    )
    charged = RecordDp(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=1)
    with pytest.raises(Exception, match="BatchNorm"):
        tr.TORCH_RECIPE.train(params, tr.TORCH_RECIPE.init(params, 0), images, rng, record_dp=charged)


# --- delta against the rows a release covers ---------------------------------------------------------------


def test_a_noisy_statistics_session_on_a_dataset_with_no_training_row_still_checks_delta_against_its_rows(
    tmp_path,
):
    """A statistics session describes every row a site holds, held-out ones included (``site_columns``). When
    consent or the split leaves no training row, the held-out rows are still described: a session delta at
    or above 1/n for those rows must be refused before anything is computed, as for any other session."""
    engine = sqlite_engine(tmp_path / "site.sqlite")
    ledger(engine).set_budget(DATASET, 50.0, DELTA)
    spec = StudySpec.model_validate(
        {
            "name": "describe",
            "dataset": DATASET,
            "recipe": RecipeSpec(
                name="stats", params={"features": ["f0"], "target_epsilon": 2.0, "delta": 0.4}
            ),
            "rounds": 1,
            "train_sites": [SITE, "site-b", "site-c"],
        }
    )
    gate = PrivacyGate(engine)
    c = ctx(spec, "session-1", kind=TaskKind.COLLECTIVE)
    gate.before_data(c)
    with pytest.raises(TaskRefused) as refused:
        gate.prepare_data(c, rows(0, n_test=3))  # 1/n = 0.33 for the 3 rows it would describe
    assert refused.value.code == "invalid_privacy"
    gate.on_refused(c, refused.value)
    assert ledger(engine).spent(DATASET) == 0.0  # refused before computing: released


# --- a local user with the site's account ------------------------------------------------------------------


def test_a_charge_deleted_from_the_ledger_still_stands_in_the_sites_signed_audit_log(tmp_path):
    """docs/privacy.md ("Who can change the ledger"): the ledger's rows are not signed, and whoever runs as
    the site's account can delete them (as it can raise the budget). What it cannot do unseen is remove
    the charge from the signed, hash-chained audit log, whose head the orchestrator anchors with every
    task: after the rows are deleted the log still verifies and still holds the charge and the total."""
    engine = sqlite_engine(tmp_path / "site.sqlite")
    create_governance_tables(engine)
    book = ledger(engine)
    book.set_budget(DATASET, 50.0, DELTA)
    audit = AuditLog(engine, IdentityKey.generate(), f"site:{SITE}", ManualClock(T))
    gate = PrivacyGate(engine)
    c = ctx(dp_spec(), "t1")
    c.state[AUDIT_LOG_STATE] = audit
    gate.before_data(c)
    gate.prepare_data(c, rows(50))
    c.data_read = True
    gate.after_training(c)
    charged = book.spent(DATASET)
    head = audit.head()

    with engine.begin() as conn:  # the local user resets the budget behind the agent's back
        conn.execute(sa.text("DELETE FROM privacy_spend"))
    assert book.spent(DATASET) == 0.0  # the ledger alone cannot tell

    assert audit.verify(anchored_heads=[head]).ok
    (entry,) = [e for e in audit.entries() if e.type is AuditEventType.BUDGET_SPENT]
    assert entry.payload["task_id"] == "t1"
    assert entry.payload["total_epsilon"] == pytest.approx(charged, rel=1e-12)
