"""``fedhealth privacy epsilon|calibrate`` and ``fedhealth site budget set|show``, through Typer's runner."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from fedhealth.cli._privacy import budget_app, privacy_app
from fedhealth.privacy import (
    AccountantKind,
    BudgetLedger,
    DpPlan,
    DpSgdRelease,
    GaussianRelease,
    epsilon,
    sqlite_engine,
)

runner = CliRunner()
NUMBER = r"([0-9.e+-]+)"


def first_number_after(label: str, text: str) -> float:
    match = re.search(rf"{label} {NUMBER}", text)
    assert match, text
    return float(match.group(1))


def test_epsilon_prints_the_pld_value_of_the_reference_case():
    result = runner.invoke(
        privacy_app,
        ["epsilon", "--sigma", "1", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"],
    )
    assert result.exit_code == 0, result.output
    assert round(first_number_after("epsilon", result.stdout), 3) == 1.828  # dp-accounting PLD: 1.8282
    assert "pld" in result.stdout


def test_epsilon_with_rdp_prints_the_opacus_reference_value():
    args = ["epsilon", "--sigma", "1.5", "--sample-rate", "0.04", "--steps", "2250", "--delta", "1e-5"]
    result = runner.invoke(privacy_app, [*args, "--accountant", "RDP"])
    assert result.exit_code == 0, result.output
    assert round(first_number_after("epsilon", result.stdout), 3) == 7.329  # Opacus: 7.32911


def test_calibrate_prints_a_noise_multiplier_that_meets_the_target():
    args = ["calibrate", "--epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1000"]
    result = runner.invoke(privacy_app, [*args, "--accountant", "rdp"])
    assert result.exit_code == 0, result.output
    sigma = first_number_after("noise multiplier", result.stdout)
    # The printed value is rounded to 6 digits; it still meets the target within that rounding.
    release = DpSgdRelease(noise_multiplier=sigma * (1 + 1e-5), sample_rate=0.01, steps=1000)
    assert epsilon(release, delta=1e-5, accountant=AccountantKind.RDP) <= 3.0


EPSILON_ARGS = {"--sigma": "1", "--sample-rate": "0.01", "--steps": "100", "--delta": "1e-5"}
CALIBRATE_ARGS = {"--epsilon": "1", "--sample-rate": "0.01", "--steps": "100", "--delta": "1e-5"}


def invoke(command: str, base: dict[str, str], **overrides: str):
    options = {**base, **{f"--{k.replace('_', '-')}": v for k, v in overrides.items()}}
    return runner.invoke(privacy_app, [command, *[x for kv in options.items() for x in kv]])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sample_rate": "0"}, "sample rate"),
        ({"sample_rate": "1.5"}, "sample rate"),
        ({"sample_rate": "-0.1"}, "sample rate"),
        ({"sigma": "0"}, "sigma"),
        ({"sigma": "-1"}, "sigma"),
        ({"sigma": "nan"}, "sigma"),
        ({"steps": "0"}, "steps"),
        ({"steps": "-5"}, "steps"),
        ({"delta": "0"}, "delta"),
        ({"delta": "1"}, "delta"),
        ({"delta": "1.5"}, "delta"),
        ({"accountant": "prv"}, "accountant"),
    ],
)
def test_epsilon_refuses_invalid_input_with_one_line_and_exit_code_2(overrides, message):
    result = invoke("epsilon", EPSILON_ARGS, **overrides)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epsilon": "0"}, "target epsilon"),
        ({"epsilon": "-2"}, "target epsilon"),
        ({"sample_rate": "0"}, "sample rate"),
        ({"sample_rate": "2"}, "sample rate"),
        ({"steps": "0"}, "steps"),
        ({"delta": "0"}, "delta"),
        ({"delta": "1"}, "delta"),
        ({"epsilon": "1e-9"}, "no noise multiplier"),
        ({"accountant": "gdp"}, "accountant"),
    ],
)
def test_calibrate_refuses_invalid_input_with_one_line_and_exit_code_2(overrides, message):
    result = invoke("calibrate", CALIBRATE_ARGS, **overrides)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_budget_set_then_show_lists_spend_per_study(tmp_path):
    db = tmp_path / "site.sqlite"
    result = runner.invoke(
        budget_app, ["set", "heart", "--epsilon", "3", "--delta", "1e-5", "--site-db", str(db)]
    )
    assert result.exit_code == 0, result.output
    assert "epsilon 3 at delta 1e-05" in result.stdout
    ledger = BudgetLedger(sqlite_engine(db), accountant=AccountantKind.PLD)
    plan_a = DpPlan.of(GaussianRelease(noise_multiplier=4.0, count=2))
    plan_b = DpPlan.of(GaussianRelease(noise_multiplier=6.0, count=1))
    ledger.commit(ledger.reserve("heart", "study-a", "t1", plan_a), plan_a)
    ledger.reserve("heart", "study-b", "t2", plan_b)
    result = runner.invoke(budget_app, ["show", "--site-db", str(db)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("heart: budget epsilon 3 at delta 1e-05")
    statement = ledger.statement("heart")
    assert f"spent {statement.spent_epsilon:.4g}" in lines[0]
    assert (
        lines[1].strip() == f"study-a: epsilon {statement.studies[0].epsilon:.4g} (1 committed, 0 reserved)"
    )
    assert (
        lines[2].strip() == f"study-b: epsilon {statement.studies[1].epsilon:.4g} (0 committed, 1 reserved)"
    )


def test_budget_set_changes_an_existing_budget(tmp_path):
    db = str(tmp_path / "site.sqlite")
    runner.invoke(budget_app, ["set", "heart", "--epsilon", "3", "--delta", "1e-5", "--site-db", db])
    runner.invoke(budget_app, ["set", "heart", "--epsilon", "1.5", "--delta", "1e-6", "--site-db", db])
    result = runner.invoke(budget_app, ["show", "heart", "--site-db", db])
    assert result.exit_code == 0, result.output
    assert "budget epsilon 1.5 at delta 1e-06" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["set", "Heart Disease", "--epsilon", "3", "--delta", "1e-5"], "not valid"),
        (["set", "heart", "--epsilon", "0", "--delta", "1e-5"], "positive"),
        (["set", "heart", "--epsilon", "3", "--delta", "0"], "delta"),
    ],
)
def test_budget_commands_refuse_invalid_input_with_exit_code_2(tmp_path, args, message):
    db = str(tmp_path / "site.sqlite")
    runner.invoke(budget_app, ["set", "heart", "--epsilon", "3", "--delta", "1e-5", "--site-db", db])
    result = runner.invoke(budget_app, [*args, "--site-db", db])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert message in lines[0]


def test_budget_show_of_a_dataset_without_a_budget_is_a_runtime_error(tmp_path):
    db = str(tmp_path / "site.sqlite")
    runner.invoke(budget_app, ["set", "heart", "--epsilon", "3", "--delta", "1e-5", "--site-db", db])
    result = runner.invoke(budget_app, ["show", "lungs", "--site-db", db])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "no privacy budget" in result.stderr


def test_budget_show_prints_json(tmp_path):
    db = str(tmp_path / "site.sqlite")
    runner.invoke(budget_app, ["set", "heart", "--epsilon", "3", "--delta", "1e-5", "--site-db", db])
    result = runner.invoke(budget_app, ["show", "--site-db", db, "--json"])
    assert result.exit_code == 0, result.output
    (statement,) = json.loads(result.stdout)
    assert statement["dataset"] == "heart"
    assert statement["budget_epsilon"] == 3
    assert statement["studies"] == []


def test_budget_show_refuses_a_missing_site_database(tmp_path):
    result = runner.invoke(budget_app, ["show", "--site-db", str(tmp_path / "absent.sqlite")])
    assert result.exit_code == 1
    assert "does not exist" in result.stderr
    assert not (tmp_path / "absent.sqlite").exists()
