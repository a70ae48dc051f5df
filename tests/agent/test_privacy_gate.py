"""The site's privacy gate on its own (no services): reserve before data, refuse with the figures, release
what never touched data, charge what did, never run a charged task twice, attest the ledger's figures."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fedhealth.agent import PrivacyGate, TaskContext, TaskRefused
from fedhealth.core import DatasetError
from fedhealth.data import open_dataset
from fedhealth.privacy import BudgetLedger, DpPlan, DpSgdRelease, epsilon, sqlite_engine
from fedhealth.protocol import PrivacySpec, PrivacySpend, StudySpec, Task, TaskKind
from support import logreg_recipe

SITE = "site-a"
DATASET = "bc"
DELTA = 1e-5
SIGMA, Q, STEPS, ROUNDS = 1.5, 0.1, 5, 3
ONE_ROUND = DpPlan.of(DpSgdRelease(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS))


def spec(name: str = "s", *, privacy: bool = True, rounds: int = ROUNDS, **priv: object) -> StudySpec:
    fields: dict[str, object] = {
        "name": name,
        "dataset": DATASET,
        "recipe": logreg_recipe(30),
        "rounds": rounds,
        "train_sites": [SITE],
    }
    if privacy:
        p = {
            "delta": DELTA,
            "noise_multiplier": SIGMA,
            "max_grad_norm": 1.0,
            "sample_rate": Q,
            "steps_per_round": STEPS,
        }
        fields["privacy"] = PrivacySpec.model_validate({**p, **priv})
    return StudySpec.model_validate(fields)


def ctx(s: StudySpec, task_id: str = "t1", round: int = 1, kind: TaskKind = TaskKind.TRAIN) -> TaskContext:
    task = Task(
        task_id=task_id,
        study_id=f"study-{s.name}",
        round=round,
        kind=kind,
        dataset=DATASET,
        recipe=s.recipe,
        model_digest="0" * 64,
        seed=0,
        deadline=datetime.now(UTC),
        spec=s,
    )
    return TaskContext(task=task, site=SITE)


@pytest.fixture
def engine(tmp_path):
    return sqlite_engine(tmp_path / "site.sqlite")


@pytest.fixture
def gate(engine):
    return PrivacyGate(engine)


def ledger(engine) -> BudgetLedger:
    BudgetLedger.create_schema(engine)
    return BudgetLedger(engine)


def run(gate: PrivacyGate, c: TaskContext) -> None:
    """What the agent does for a task that completes: before data, read data, train, commit, attest."""
    gate.before_data(c)
    c.data_read = True
    gate.prepare_data(c, open_dataset("builtin://breast-cancer/0?sites=4&seed=0"))
    gate.after_training(c)
    gate.attest(c)


def test_a_round_is_reserved_before_data_committed_after_training_and_attested(gate, engine):
    ledger(engine).set_budget(DATASET, 10.0, DELTA)
    c = ctx(spec())
    gate.before_data(c)
    [pending] = ledger(engine).pending(DATASET)  # on disk before any data is read
    assert pending.planned == ONE_ROUND
    c.data_read = True
    gate.after_training(c)
    gate.attest(c)
    assert ledger(engine).pending(DATASET) == []
    one = epsilon(ONE_ROUND, delta=DELTA)
    spend = PrivacySpend.model_validate(c.attestation["privacy"])
    assert spend.study_epsilon == pytest.approx(one, rel=1e-9)
    assert spend.task_epsilon == pytest.approx(one, rel=1e-9)
    assert (spend.budget_epsilon, spend.delta, spend.dataset) == (10.0, DELTA, DATASET)
    assert spend.reproducible_noise is False


def test_a_task_over_budget_is_refused_with_the_figures_and_nothing_is_written(gate, engine):
    one = epsilon(ONE_ROUND, delta=DELTA)
    ledger(engine).set_budget(DATASET, one * 0.99, DELTA)
    c = ctx(spec(rounds=1))
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(c)
    assert refused.value.code == "budget_exceeded"
    assert f"this task needs epsilon {one:.4g} on its own" in refused.value.reason
    assert f"budget epsilon {one * 0.99:g} at delta {DELTA:g}" in refused.value.reason
    assert ledger(engine).statement(DATASET).spent_epsilon == 0.0


def test_a_study_whose_remaining_rounds_cannot_fit_is_refused_at_its_first_round(gate, engine):
    whole = epsilon(DpPlan(releases=ONE_ROUND.releases * ROUNDS), delta=DELTA)
    ledger(engine).set_budget(DATASET, whole * 0.99, DELTA)  # one round fits, the study does not
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx(spec()))
    assert refused.value.code == "budget_exceeded"
    assert f"the study's {ROUNDS} remaining training rounds need epsilon {whole:.4g}" in refused.value.reason
    # at its last round the same study needs only that round
    run(gate, ctx(spec(), task_id="t3", round=ROUNDS))


def test_studies_compose_on_the_dataset_until_the_budget_refuses_the_next(gate, engine):
    one = epsilon(ONE_ROUND, delta=DELTA)
    two = epsilon(ONE_ROUND + ONE_ROUND, delta=DELTA)
    ledger(engine).set_budget(
        DATASET, (two + epsilon(ONE_ROUND + ONE_ROUND + ONE_ROUND, delta=DELTA)) / 2, DELTA
    )
    run(gate, ctx(spec("x", rounds=1), task_id="x1"))
    c = ctx(spec("y", rounds=1), task_id="y1")
    run(gate, c)
    spend = PrivacySpend.model_validate(c.attestation["privacy"])
    assert spend.study_epsilon == pytest.approx(one, rel=1e-9)
    assert spend.total_epsilon == pytest.approx(two, rel=1e-9)
    assert one < two < 2 * one
    with pytest.raises(TaskRefused, match="total would reach"):
        gate.before_data(ctx(spec("z", rounds=1), task_id="z1"))


def test_a_dp_study_on_a_dataset_without_budget_is_refused(gate):
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx(spec()))
    assert refused.value.code == "budget_not_set"
    assert f"fedhealth site budget set {DATASET}" in refused.value.reason
    assert f"this task alone needs epsilon {epsilon(ONE_ROUND, delta=DELTA):.4g}" in refused.value.reason


def test_a_study_without_noise_runs_only_where_the_dataset_has_no_budget(gate, engine):
    for s in (spec(privacy=False), spec(noise_multiplier=0.0)):
        run(gate, ctx(s, task_id=f"free-{s.privacy is None}"))  # no budget: nothing to account
    ledger(engine).set_budget(DATASET, 100.0, DELTA)
    for s in (spec(privacy=False), spec(noise_multiplier=0.0)):
        with pytest.raises(TaskRefused, match="infinite") as refused:
            gate.before_data(ctx(s, task_id=f"budgeted-{s.privacy is None}"))
        assert refused.value.code == "budget_exceeded"


def test_evaluation_and_synthetic_tasks_are_not_charged(gate, engine):
    ledger(engine).set_budget(DATASET, 1.0, DELTA)
    run(gate, ctx(spec(), kind=TaskKind.EVALUATE))
    assert ledger(engine).statement(DATASET).spent_epsilon == 0.0


def test_a_reservation_is_released_if_the_task_stops_before_data_and_charged_if_after(gate, engine):
    ledger(engine).set_budget(DATASET, 10.0, DELTA)
    before = ctx(spec(), task_id="before")
    gate.before_data(before)
    gate.on_failed(before, DatasetError("the model could not be decoded"))
    after = ctx(spec(), task_id="after")
    gate.before_data(after)
    after.data_read = True
    gate.on_refused(after, TaskRefused("consent", "too few patients"))
    statement = ledger(engine).statement(DATASET)
    assert statement.spent_epsilon == pytest.approx(epsilon(ONE_ROUND, delta=DELTA), rel=1e-9)
    assert statement.studies[0].committed_tasks == 1


def test_a_task_handed_out_again_before_its_data_was_read_reuses_its_reservation(gate, engine):
    ledger(engine).set_budget(DATASET, 10.0, DELTA)
    gate.before_data(ctx(spec()))  # then the model download failed: nothing settled, nothing read
    run(gate, ctx(spec()))  # the orchestrator hands the same task out again
    statement = ledger(engine).statement(DATASET)
    assert statement.spent_epsilon == pytest.approx(epsilon(ONE_ROUND, delta=DELTA), rel=1e-9)
    assert (statement.studies[0].committed_tasks, statement.studies[0].reserved_tasks) == (1, 0)


def test_after_a_crash_the_pending_reservation_is_reported_counted_and_never_run_again(engine, caplog):
    ledger(engine).set_budget(DATASET, 10.0, DELTA)
    PrivacyGate(engine).before_data(ctx(spec()))  # the agent dies here
    restarted = PrivacyGate(engine)
    assert "never settled" in caplog.text
    with pytest.raises(TaskRefused) as refused:
        restarted.before_data(ctx(spec()))
    assert refused.value.code == "budget_already_charged"
    [pending] = ledger(engine).pending(DATASET)
    assert ledger(engine).statement(DATASET).spent_epsilon == pytest.approx(epsilon(ONE_ROUND, delta=DELTA))
    assert pending.task_id == "t1"


def test_an_invalid_privacy_spec_is_refused_before_anything_is_reserved(gate, engine):
    ledger(engine).set_budget(DATASET, 10.0, DELTA)
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx(spec(mode="site-distributed")))
    assert refused.value.code == "invalid_privacy"
    assert ledger(engine).pending(DATASET) == []
