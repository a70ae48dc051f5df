"""The site's privacy gate for a ``stats`` collective session: a session with noise reserves its declared
Gaussian release before any data is read and commits it after; a dataset whose budget is spent refuses it
with the figures; an exact session (no noise) is refused by a dataset that has a budget."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fedhealth.agent import PrivacyGate, TaskContext, TaskRefused
from fedhealth.privacy import BudgetLedger, DpPlan, GaussianRelease, epsilon, sqlite_engine
from fedhealth.protocol import PrivacySpend, RecipeSpec, StudySpec, Task, TaskKind

SITE = "site-a"
DATASET = "hd"
DELTA = 1e-5
SIGMA = 3.0
ONE_SESSION = DpPlan.of(GaussianRelease(noise_multiplier=SIGMA))


def stats_spec(**params: object) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "stats",
            "dataset": DATASET,
            "recipe": RecipeSpec(name="stats", params={"features": ["age"], **params}),
            "rounds": 1,
            "train_sites": [SITE, "site-b", "site-c"],
        }
    )


def ctx(spec: StudySpec, task_id: str = "t1") -> TaskContext:
    task = Task(
        task_id=task_id,
        study_id="study-stats",
        round=1,
        kind=TaskKind.COLLECTIVE,
        dataset=DATASET,
        recipe=spec.recipe,
        model_digest="0" * 64,
        seed=0,
        deadline=datetime.now(UTC),
        spec=spec,
    )
    return TaskContext(task=task, site=SITE)


@pytest.fixture
def engine(tmp_path):
    return sqlite_engine(tmp_path / "site.sqlite")


def ledger(engine) -> BudgetLedger:
    BudgetLedger.create_schema(engine)
    return BudgetLedger(engine)


def test_a_noisy_stats_session_is_reserved_before_data_and_charged_after(engine):
    gate = PrivacyGate(engine)
    ledger(engine).set_budget(DATASET, 10.0, DELTA)
    c = ctx(stats_spec(noise_multiplier=SIGMA))
    gate.before_data(c)
    [pending] = ledger(engine).pending(DATASET)  # on disk before any data is read
    assert pending.planned == ONE_SESSION
    c.data_read = True
    gate.after_training(c)
    gate.attest(c)
    one = epsilon(ONE_SESSION, delta=DELTA)
    assert ledger(engine).pending(DATASET) == []
    assert ledger(engine).statement(DATASET).spent_epsilon == pytest.approx(one, rel=1e-9)
    spend = PrivacySpend.model_validate(c.attestation["privacy"])
    assert spend.task_epsilon == pytest.approx(one, rel=1e-9)


def test_a_session_the_budget_cannot_pay_is_refused_with_the_figures_before_any_data(engine):
    gate = PrivacyGate(engine)
    one = epsilon(ONE_SESSION, delta=DELTA)
    two = epsilon(DpPlan.of(GaussianRelease(noise_multiplier=SIGMA, count=2)), delta=DELTA)
    ledger(engine).set_budget(DATASET, (one + two) / 2, DELTA)  # one session fits, two do not
    first = ctx(stats_spec(noise_multiplier=SIGMA), "t1")
    gate.before_data(first)
    first.data_read = True
    gate.after_training(first)
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx(stats_spec(noise_multiplier=SIGMA), "t2"))
    assert refused.value.code == "budget_exceeded"
    assert f"this task needs epsilon {one:.4g} on its own" in refused.value.reason
    assert ledger(engine).statement(DATASET).spent_epsilon == pytest.approx(one, rel=1e-9)


def test_an_exact_stats_session_is_refused_by_a_dataset_with_a_budget_and_runs_without_one(engine):
    gate = PrivacyGate(engine)
    gate.before_data(ctx(stats_spec(), "t0"))  # no budget set: exact statistics run as before budgets
    ledger(engine).set_budget(DATASET, 10.0, DELTA)
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx(stats_spec(), "t1"))
    assert refused.value.code == "budget_exceeded"
    assert "no differential privacy (epsilon infinite)" in refused.value.reason


def test_a_noisy_session_on_a_dataset_without_a_budget_is_refused(engine):
    gate = PrivacyGate(engine)
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx(stats_spec(noise_multiplier=SIGMA)))
    assert refused.value.code == "budget_not_set"
    assert "adds noise" in refused.value.reason


def test_a_failed_session_before_data_releases_the_reservation(engine):
    gate = PrivacyGate(engine)
    ledger(engine).set_budget(DATASET, 10.0, DELTA)
    c = ctx(stats_spec(noise_multiplier=SIGMA))
    gate.before_data(c)
    gate.on_failed(c, RuntimeError("no connection"))
    assert ledger(engine).pending(DATASET) == []
    assert ledger(engine).statement(DATASET).spent_epsilon == 0.0
