"""What a site tells the orchestrator when it does not do a task: a code and nothing else (issue 10, finding
16). A CSV parse error used to send the file's path and a patient id upstream and charge the task's epsilon;
now the agent sends the code, keeps the detail in its own log, and charges nothing for a task that failed
before it computed anything on patient rows."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from site_fixtures import SITE, agent, approve, make_home, task

from fedhealth.agent._agent import _failure_code
from fedhealth.core import (
    ChecksumError,
    ConfigError,
    DatasetError,
    DatasetMissingError,
    FedHealthError,
    InputError,
)
from fedhealth.data import SchemaError
from fedhealth.learning import RecipeParamsError, UnknownRecipeError
from fedhealth.orchestrator._privacy import privacy_markdown
from fedhealth.orchestrator._report import one_line, report_markdown
from fedhealth.privacy import BudgetLedger, sqlite_engine
from fedhealth.protocol import FailureCode, PrivacySpec, RecipeSpec, StudySpec, TaskFailure
from support import logreg_recipe

DELTA = 1e-5
PATIENTS = [f"p{i:04d}" for i in range(40)]


def write_csv(path: Path) -> Path:
    """40 patients with an id column, two features and a label."""
    rows = [f"{p},{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}" for i, p in enumerate(PATIENTS)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    return path


def dp_spec(n_features: int = 2) -> StudySpec:
    return StudySpec(
        name="dp-study",
        dataset="cohort",
        recipe=logreg_recipe(n_features, learning_rate=0.5),
        rounds=2,
        train_sites=[SITE],
        privacy=PrivacySpec(
            delta=DELTA, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps_per_round=3
        ),
    )


def ledger(home) -> BudgetLedger:
    engine = sqlite_engine(home.database_path)
    BudgetLedger.create_schema(engine)
    return BudgetLedger(engine)


@pytest.fixture
def site(tmp_path):
    home = make_home(tmp_path / "site")
    ledger(home).set_budget("cohort", 5.0, DELTA)
    return home


def run_one(home, uri: str, spec: StudySpec):
    approve(home, spec)
    a, client = agent(home, {"cohort": uri})
    a.handle(task(spec))
    return client


def test_a_csv_parse_error_sends_only_its_code_and_charges_nothing(site, tmp_path, caplog):
    """The issue's reproduction: the id column is not declared, so the first patient id is read as a
    number and the parse error names the file and 'p0000'."""
    (tmp_path / "secret-ward").mkdir()
    csv = write_csv(tmp_path / "secret-ward" / "cohort.csv")
    caplog.set_level(logging.INFO, logger="fedhealth.agent")
    client = run_one(site, f"file://{csv}?label=label", dp_spec(n_features=3))
    [failure] = client.failures
    assert failure.code is FailureCode.DATASET_INVALID
    sent = failure.model_dump_json()
    for secret in (str(csv), "secret-ward", "cohort.csv", "p0000"):
        assert secret not in sent
    assert failure.reason == FailureCode.DATASET_INVALID.message
    # nothing computed on the rows: the reservation was released, not charged
    statement = ledger(site).statement("cohort")
    assert statement.spent_epsilon == 0.0
    assert ledger(site).pending("cohort") == []
    # the site's own log keeps the detail for its staff
    assert str(csv) in caplog.text
    assert "'p0000'" in caplog.text


def test_a_missing_dataset_file_charges_nothing(site, tmp_path):
    client = run_one(site, f"file://{tmp_path}/absent.csv?label=label&id=patient_id", dp_spec())
    [failure] = client.failures
    assert failure.code is FailureCode.DATASET_UNAVAILABLE
    assert str(tmp_path) not in failure.model_dump_json()
    assert ledger(site).statement("cohort").spent_epsilon == 0.0


def test_a_dataset_narrower_than_the_model_charges_nothing(site, tmp_path):
    csv = write_csv(tmp_path / "cohort.csv")
    client = run_one(site, f"file://{csv}?label=label&id=patient_id", dp_spec(n_features=5))
    [failure] = client.failures
    assert failure.code is FailureCode.DATASET_INVALID
    assert ledger(site).statement("cohort").spent_epsilon == 0.0


def test_a_failure_after_training_began_is_still_charged(site, tmp_path, monkeypatch):
    """The release above is limited to failures before any computation on rows: one during training may
    reflect the rows, so it stays charged in full."""
    csv = write_csv(tmp_path / "cohort.csv")

    def diverged(*args: object, **kwargs: object) -> None:
        raise FedHealthError("the loss of patient p0003 is NaN")

    monkeypatch.setattr("fedhealth.agent._agent.train_on_site", diverged)
    client = run_one(site, f"file://{csv}?label=label&id=patient_id", dp_spec())
    [failure] = client.failures
    assert failure.code is FailureCode.TRAINING_FAILED
    assert "p0003" not in failure.model_dump_json()
    assert ledger(site).statement("cohort").spent_epsilon > 0


def test_the_same_dataset_trains_when_its_id_column_is_declared(site, tmp_path):
    """The control: the file itself is fine; only the URI's missing ``id=`` made it fail above."""
    csv = write_csv(tmp_path / "cohort.csv")
    client = run_one(site, f"file://{csv}?label=label&id=patient_id", dp_spec())
    assert client.failures == []
    [result] = client.results
    assert result.metrics is not None
    assert result.metrics.num_samples > 0
    assert ledger(site).statement("cohort").spent_epsilon > 0


@pytest.mark.parametrize(
    "recipe",
    [
        RecipeSpec(name="catboost", params={"trees": 10}),
        RecipeSpec(name="logreg", version="2", params={"n_features": 2}),
        RecipeSpec(name="logreg", params={"n_features": 2, "learning_rate": -1.0}),
    ],
    ids=["unknown-recipe", "unknown-version", "bad-params"],
)
def test_a_recipe_the_site_cannot_run_is_refused_before_any_data_and_charges_nothing(site, tmp_path, recipe):
    """The dataset URI names no file: had the agent opened the data first, the code would be
    dataset_unavailable; the recipe is checked before, and nothing is reserved or charged."""
    spec = dp_spec().model_copy(update={"recipe": recipe})
    approve(site, spec)
    a, client = agent(site, {"cohort": f"file://{tmp_path}/absent.csv?label=label&id=patient_id"})
    # the orchestrator had the recipe (it built the model); this site does not
    a.handle(task(dp_spec()).model_copy(update={"recipe": recipe, "spec": spec}))
    [failure] = client.failures
    assert failure.code is FailureCode.INVALID_RECIPE
    assert failure.reason == FailureCode.INVALID_RECIPE.message
    assert client.results == []
    assert ledger(site).statement("cohort").spent_epsilon == 0.0
    assert ledger(site).pending("cohort") == []


def test_a_refusal_sends_its_rule_code_with_the_rules_fixed_sentence(site, tmp_path):
    csv = write_csv(tmp_path / "cohort.csv")
    spec = dp_spec()
    a, client = agent(site, {"cohort": f"file://{csv}?label=label&id=patient_id"})
    a.handle(task(spec))  # never approved by the steward
    [failure] = client.failures
    assert failure.code is FailureCode.STUDY_APPROVAL
    assert set(failure.model_dump(exclude_none=True)) <= {"code", "attestation"}
    assert failure.reason == FailureCode.STUDY_APPROVAL.message


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SchemaError("/data/x.csv: line 2 holds 'p0000'"), FailureCode.DATASET_INVALID),
        (DatasetMissingError("CSV file /data/x.csv does not exist"), FailureCode.DATASET_UNAVAILABLE),
        (ChecksumError("/data/x does not match"), FailureCode.DATASET_UNAVAILABLE),
        (DatasetError("no dataset named 'x'"), FailureCode.DATASET_UNAVAILABLE),
        (UnknownRecipeError("recipe.name: no recipe 'xgboost' is installed"), FailureCode.INVALID_RECIPE),
        (RecipeParamsError(["recipe.params.n_features: Field required"]), FailureCode.INVALID_RECIPE),
        (InputError("the model does not match its digest"), FailureCode.INVALID_TASK),
        (ConfigError("bad setting"), FailureCode.TRAINING_FAILED),
        (RuntimeError("bug"), FailureCode.INTERNAL_ERROR),
    ],
)
def test_each_exception_maps_to_one_code(error, code):
    assert _failure_code(error) is code


def test_the_wire_message_refuses_free_text_and_unknown_codes():
    """The orchestrator validates what sites send: no reason field, no code outside the enum."""
    with pytest.raises(ValueError, match="Extra inputs"):
        TaskFailure.model_validate({"code": "dataset_invalid", "reason": "/data/ward-7.csv: 'p0000'"})
    with pytest.raises(ValueError, match="Input should be"):
        TaskFailure.model_validate({"code": "p0000_not_a_number"})
    for code in FailureCode:
        assert "\n" not in code.message
        assert len(code.message) < 120


def test_a_newline_in_a_reason_cannot_write_a_heading_into_the_report():
    reason = "cancelled\n\n# Final model: approved for clinical use\n| fake | row |"
    report = {
        "name": "s",
        "study_id": "st-1",
        "status": "cancelled",
        "reason": reason,
        "spec": {"dataset": "d", "recipe": {"name": "logreg"}, "strategy": {"name": "fedavg"}, "rounds": 1},
        "completed_rounds": 0,
        "wall_time_s": None,
        "final_model_digest": None,
        "evaluation": None,
        "rounds": [],
        "privacy": None,
    }
    markdown = report_markdown(report)
    assert not any(line.startswith("# Final model") for line in markdown.splitlines())
    [status] = [line for line in markdown.splitlines() if line.startswith("- Status:")]
    assert "# Final model: approved for clinical use" in status
    assert "\\| fake \\| row \\|" in status
    assert one_line("a\r\nb\u2028c\x00d") == "a b c d"


def test_a_refusal_cell_of_the_privacy_table_stays_one_cell():
    section = {
        "mode": "record",
        "delta": 1e-5,
        "accountant": "pld",
        "max_grad_norm": 1.0,
        "target_epsilon": None,
        "sites": [
            {
                "site": "a",
                "noise_multiplier": 1.0,
                "refusal": "budget_exceeded: x\n## Injected | cell",
                "spent": None,
            }
        ],
    }
    lines = privacy_markdown(section)
    assert not any(line.startswith("## Injected") for line in lines)
    [row] = [line for line in lines if line.startswith("| a |")]
    assert row.endswith("budget_exceeded: x ## Injected \\| cell |")
