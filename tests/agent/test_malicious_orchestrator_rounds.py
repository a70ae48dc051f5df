"""A lying orchestrator against a site's round-based training path (docs/privacy.md, docs/governance.md): the
real agent with its real gates on a real site home, handed forged tasks. Each test plays one lie and checks
that the site refuses it before it reads data, or that the site-held budget still holds.

Lies played here: a round the stewards did not approve (a training round outside the spec, an evaluation
before the last round), noise parameters changed after approval, a completed task handed out again, one
round replayed under fresh task ids, and a task id reused for another study after a download the orchestrator
itself made fail (refused: the held reservation is for another dataset, study or plan)."""

from __future__ import annotations

import pytest
from site_fixtures import agent, approve, make_home, task

from fedhealth.agent import PrivacyGate, TaskContext, TaskRefused
from fedhealth.agent._client import OrchestratorRefused
from fedhealth.data import open_dataset
from fedhealth.privacy import BudgetLedger, DpPlan, DpSgdRelease, epsilon, sqlite_engine
from fedhealth.protocol import FailureCode, PrivacySpec, StudySpec, Task, TaskKind
from support import logreg_recipe

DELTA = 1e-5
PATIENTS = [f"p{i:04d}" for i in range(40)]
SIGMA, Q, STEPS = 1.0, 0.2, 3
ONE_ROUND = DpPlan.of(DpSgdRelease(noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS))


def write_csv(path):
    rows = [f"{p},{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}" for i, p in enumerate(PATIENTS)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    return f"file://{path}?label=label&id=patient_id"


def dp_spec(name: str = "dp-study", dataset: str = "cohort", **privacy: object) -> StudySpec:
    fields = {
        "delta": DELTA,
        "noise_multiplier": SIGMA,
        "max_grad_norm": 1.0,
        "sample_rate": Q,
        "steps_per_round": STEPS,
    }
    fields.update(privacy)
    return StudySpec(
        name=name,
        dataset=dataset,
        recipe=logreg_recipe(2, learning_rate=0.5),
        rounds=2,
        train_sites=["hospital-a"],
        privacy=PrivacySpec.model_validate(fields),
    )


def ledger(home) -> BudgetLedger:
    engine = sqlite_engine(home.database_path)
    BudgetLedger.create_schema(engine)
    return BudgetLedger(engine)


def of_study(t: Task, study_id: str) -> Task:
    return t.model_copy(update={"study_id": study_id})


@pytest.fixture
def home(tmp_path):
    h = make_home(tmp_path / "site")
    ledger(h).set_budget("cohort", 20.0, DELTA)
    return h


# --- a round the stewards did not approve -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "round_number"),
    [
        (TaskKind.TRAIN, 0),  # before the first round
        (TaskKind.TRAIN, 3),  # beyond the spec's 2 rounds
        (TaskKind.EVALUATE, 1),  # an (uncharged) evaluation in a training round
        (TaskKind.EVALUATE, 4),  # a second evaluation round after the spec's one (round 3)
    ],
)
def test_a_round_the_spec_does_not_have_is_refused_before_the_dataset_is_opened(
    home, tmp_path, kind, round_number
):
    spec = dp_spec()
    approve(home, spec)
    # the dataset file does not exist: a site that opened it first would report dataset_unavailable
    site, client = agent(home, {"cohort": f"file://{tmp_path}/absent.csv?label=label&id=patient_id"})
    site.handle(task(spec, kind=kind, round=round_number))
    assert [f.code for f in client.failures] == [FailureCode.SPEC_MISMATCH]
    assert client.results == []
    assert client.evaluations == []
    assert ledger(home).statement("cohort").spent_epsilon == 0.0
    assert ledger(home).pending("cohort") == []


# --- noise parameters changed after approval ----------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"noise_multiplier": 0.3},  # less noise
        {"sample_rate": 0.9},  # larger batches
        {"steps_per_round": 30},  # more steps per round
        {"delta": 1e-3},  # a weaker delta
    ],
)
def test_an_approved_studys_noise_changed_by_the_orchestrator_is_refused_before_anything_is_reserved(
    home, tmp_path, changes
):
    approved = dp_spec()
    approve(home, approved)
    lowered = dp_spec(**changes)  # same name, same everything else: only the privacy section differs
    site, client = agent(home, {"cohort": f"file://{tmp_path}/absent.csv?label=label&id=patient_id"})
    site.handle(task(lowered))
    assert [f.code for f in client.failures] == [FailureCode.STUDY_APPROVAL]
    assert client.results == []
    statement = ledger(home).statement("cohort")
    assert statement.spent_epsilon == 0.0
    assert statement.studies == ()
    # the approved study itself is still served (the refusal above was about the change, not the site)
    site.handle(task(approved, task_id="tk-2"))
    assert [f.code for f in client.failures][-1] == FailureCode.DATASET_UNAVAILABLE


# --- replays ---------------------------------------------------------------------------------------------


def test_a_completed_training_task_handed_out_again_is_not_run_again(home, tmp_path):
    spec = dp_spec()
    approve(home, spec)
    site, client = agent(home, {"cohort": write_csv(tmp_path / "cohort.csv")})
    site.handle(task(spec))
    assert len(client.results) == 1
    assert client.failures == []
    spent = ledger(home).statement("cohort").spent_epsilon
    site.handle(task(spec))  # the same task id, once more
    assert [f.code for f in client.failures] == [FailureCode.BUDGET_ALREADY_CHARGED]
    assert len(client.results) == 1  # no second update of the same round
    statement = ledger(home).statement("cohort")
    assert statement.spent_epsilon == spent
    assert statement.studies[0].committed_tasks == 1


def test_a_round_replayed_under_fresh_task_ids_is_charged_each_time_until_the_budget_refuses(tmp_path):
    home = make_home(tmp_path / "site")
    two, three = (epsilon(DpPlan(releases=ONE_ROUND.releases * k), delta=DELTA) for k in (2, 3))
    budget = (two + three) / 2  # two releases fit, a third does not
    ledger(home).set_budget("cohort", budget, DELTA)
    spec = dp_spec()
    approve(home, spec)
    site, client = agent(home, {"cohort": write_csv(tmp_path / "cohort.csv")})
    for i in range(4):  # round 1 again and again, each time under a new task id
        site.handle(task(spec, task_id=f"replay-{i}"))
    assert len(client.results) == 2
    assert [f.code for f in client.failures] == [FailureCode.BUDGET_EXCEEDED] * 2
    statement = ledger(home).statement("cohort")
    assert statement.studies[0].committed_tasks == 2  # every update that left was charged
    assert statement.spent_epsilon == pytest.approx(two, rel=1e-9)
    assert statement.spent_epsilon <= budget


# --- a task id reused across studies ---------------------------------------------------------------------


def refuse_download(digest: str, *, max_elapsed_s: float | None = None, max_bytes: int = 0) -> bytes:
    """The orchestrator answers 404 to a model download (its choice: it serves the models)."""
    raise OrchestratorRefused(404, "not_found")


def test_a_task_id_reused_for_another_dataset_cannot_skip_that_datasets_budget(home, tmp_path):
    ledger(home).set_budget("ward", 0.01, DELTA)  # far below one round: every DP task on it is refused
    cheap = dp_spec()
    ward = dp_spec(name="ward-study", dataset="ward")
    approve(home, cheap)
    approve(home, ward)  # the steward approved both; the ward's budget is what protects its patients
    site, client = agent(
        home, {"cohort": write_csv(tmp_path / "cohort.csv"), "ward": write_csv(tmp_path / "ward.csv")}
    )
    site.handle(of_study(task(ward, task_id="w-1"), "st-ward"))
    assert [f.code for f in client.failures] == [FailureCode.BUDGET_EXCEEDED]  # the honest path refuses
    # the lie: hand out a cheap task on 'cohort', answer its model download with 404 (nothing is settled,
    # the reservation waits for the task to come again) ...
    site.client.get_model = refuse_download  # type: ignore[method-assign]
    stranded = of_study(task(cheap, task_id="tk-x"), "st-cohort").model_copy(update={"model_inline": None})
    site.handle(stranded)
    assert [r.task_id for r in ledger(home).pending("cohort")] == ["tk-x"]
    # ... then send the ward's study under that task id
    site.handle(of_study(task(ward, task_id="tk-x"), "st-ward"))
    assert client.results == [], "a DP update computed on the ward's rows left the site"
    assert ledger(home).statement("ward").spent_epsilon <= 0.01


def test_a_task_id_reused_for_a_hungrier_study_cannot_spend_beyond_the_budget(tmp_path):
    engine = sqlite_engine(tmp_path / "site.sqlite")
    BudgetLedger.create_schema(engine)
    ledger_ = BudgetLedger(engine)
    cheap, hungry = dp_spec(name="cheap"), dp_spec(name="hungry", noise_multiplier=0.5, steps_per_round=50)
    cheap_eps = epsilon(ONE_ROUND, delta=DELTA)
    hungry_eps = epsilon(DpPlan.of(DpSgdRelease(noise_multiplier=0.5, sample_rate=Q, steps=50)), delta=DELTA)
    budget = 2 * cheap_eps
    assert hungry_eps > budget  # the hungry round alone does not fit: reserving it is refused
    ledger_.set_budget("cohort", budget, DELTA)
    gate = PrivacyGate(engine)

    def ctx(spec: StudySpec, study_id: str) -> TaskContext:
        t = of_study(task(spec, task_id="tk-x"), study_id)
        return TaskContext(task=t, site="hospital-a")

    with pytest.raises(TaskRefused):
        PrivacyGate(engine).before_data(ctx(hungry, "st-hungry-honest"))  # the honest path refuses
    gate.before_data(ctx(cheap, "st-cheap"))  # reserved, then the model download "failed": nothing settled
    lie = ctx(hungry, "st-hungry")
    try:
        gate.before_data(lie)
    except TaskRefused:
        return  # refused: what the guarantee asks
    lie.data_read = True
    gate.prepare_data(lie, open_dataset("builtin://breast-cancer/0?sites=4&seed=0"))
    gate.after_training(lie)
    assert ledger_.statement("cohort").spent_epsilon <= budget
