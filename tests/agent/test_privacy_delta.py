"""A site refuses a DP study whose delta is at or above 1/n for its n training records (issue 10, finding
18), before it computes anything on them: the reservation is released."""

from __future__ import annotations

from pathlib import Path

from site_fixtures import SITE, agent, approve, make_home, task

from fedhealth.privacy import BudgetLedger, sqlite_engine
from fedhealth.protocol import FailureCode, PrivacySpec, StudySpec
from support import logreg_recipe


def cohort(path: Path, n: int) -> Path:
    rows = [f"q{i:04d},{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}" for i in range(n)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    return path


def spec(delta: float) -> StudySpec:
    return StudySpec(
        name=f"d{delta:g}".replace("-", "m").replace(".", "p"),
        dataset="cohort",
        recipe=logreg_recipe(2),
        rounds=1,
        train_sites=[SITE],
        privacy=PrivacySpec(
            delta=delta, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps_per_round=2
        ),
    )


def run(tmp_path: Path, delta: float, budget_delta: float):
    home = make_home(tmp_path / "site")
    engine = sqlite_engine(home.database_path)
    BudgetLedger.create_schema(engine)
    BudgetLedger(engine).set_budget("cohort", 10.0, budget_delta)
    csv = cohort(tmp_path / "cohort.csv", 60)  # 42 training rows at the default 0.3 held out
    s = spec(delta)
    approve(home, s)
    a, client = agent(home, {"cohort": f"file://{csv}?label=label&id=patient_id"})
    a.handle(task(s))
    return client, BudgetLedger(engine).statement("cohort")


def test_a_study_delta_at_or_above_one_over_n_is_refused_before_computing(tmp_path):
    client, statement = run(tmp_path, delta=0.05, budget_delta=1e-5)
    [failure] = client.failures
    assert failure.code is FailureCode.INVALID_PRIVACY
    assert statement.spent_epsilon == 0.0


def test_a_budget_delta_at_or_above_one_over_n_is_refused_too(tmp_path):
    client, statement = run(tmp_path, delta=1e-5, budget_delta=0.05)
    [failure] = client.failures
    assert failure.code is FailureCode.INVALID_PRIVACY
    assert statement.spent_epsilon == 0.0


def test_a_delta_below_one_over_n_trains(tmp_path):
    client, statement = run(tmp_path, delta=1e-3, budget_delta=1e-3)
    assert client.failures == []
    assert statement.spent_epsilon > 0
