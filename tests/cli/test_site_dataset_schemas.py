"""``fedhealth site dataset``: schemas pinned at add, checked again later, and the local quality report."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from test_cli_errors import cli, one_error, write_csv

from fedhealth.crypto import IdentityKey


@pytest.fixture
def site_home(tmp_path) -> Path:
    """A site home as `site enroll` leaves it (no orchestrator is needed for dataset commands)."""
    home = tmp_path / "site"
    home.mkdir()
    IdentityKey.generate().save(home / "identity.key")
    (home / "site.json").write_text(json.dumps({"site": "hospital-a", "orchestrator": "https://127.0.0.1:1"}))
    return home


SCHEMA = """
id = "patient_id"
label = "outcome"
[columns.age]
missing = "median"
[columns.smoker]
type = "categorical"
categories = ["never", "current"]
"""


def _ward(tmp_path, extra_column: bool = False, drop_age: bool = False):
    header = ["patient_id", "age", "smoker", "outcome"]
    rows = [
        [f"p{i:02d}", "" if i == 3 else 40 + i, "never" if i % 3 else "current", i % 2] for i in range(12)
    ]
    if extra_column:
        header.append("creatinine")
        rows = [[*r, 1.0 + i / 10] for i, r in enumerate(rows)]
    if drop_age:
        header.pop(1)
        rows = [[r[0], *r[2:]] for r in rows]
    return write_csv(tmp_path / "ward.csv", header, rows)


def test_add_pins_the_schema_and_check_prints_the_quality_report(site_home, tmp_path):
    schema = tmp_path / "ward.toml"
    schema.write_text(SCHEMA)
    path = _ward(tmp_path)
    added = cli("site", "dataset", "add", "ward", path, "--schema", schema, "--home", site_home)
    assert added.exit_code == 0, added.output
    assert "12 rows, 3 features, label outcome, id patient_id" in added.stdout
    for private in (site_home / "datasets.json", site_home / "schemas" / "ward.json"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    checked = cli("site", "dataset", "check", "ward", "--home", site_home)
    assert checked.exit_code == 0, checked.output
    out = checked.stdout
    assert "schema (declared): features age, smoker=never, smoker=current" in out
    assert "12 rows; label 1 in 6, label 0 in 6" in out
    assert "age (numeric): missing 1 (8.3%); range [40, 51]" in out
    assert "smoker (categorical): missing 0 (0.0%); never: 8, current: 4" in out
    report = json.loads(cli("site", "dataset", "check", "ward", "--home", site_home, "--json").stdout)
    (age,) = [c for c in report[0]["quality"]["columns"] if c["column"] == "age"]
    assert (age["missing"], age["min"], age["max"]) == (1, 40, 51)


def test_a_new_column_in_the_source_stays_out_of_the_features_until_the_dataset_is_added_again(
    site_home, tmp_path
):
    path = _ward(tmp_path)
    schema = tmp_path / "ward.toml"
    schema.write_text(SCHEMA)
    assert cli("site", "dataset", "add", "ward", path, "--schema", schema, "--home", site_home).exit_code == 0
    _ward(tmp_path, extra_column=True)
    checked = cli("site", "dataset", "check", "ward", "--home", site_home)
    assert checked.exit_code == 0, checked.output
    assert "features age, smoker=never, smoker=current\n" in checked.stdout
    assert "not used as features: creatinine" in checked.stdout
    # the steward edits the declaration; until the dataset is added again, the pinned copy rules
    schema.write_text(SCHEMA + "[columns.creatinine]\n")
    assert (
        "creatinine"
        not in cli("site", "dataset", "check", "ward", "--home", site_home).stdout.split("not used")[0]
    )
    again = cli("site", "dataset", "add", "ward", path, "--schema", schema, "--home", site_home, "--replace")
    assert again.exit_code == 0, again.output
    assert "4 features" in again.stdout


def test_an_inferred_schema_is_pinned_too_and_a_dropped_column_is_one_line_with_what_to_do(
    site_home, tmp_path
):
    path = write_csv(
        tmp_path / "plain.csv", ["pid", "a", "b", "y"], [[f"p{i}", i, i * i, i % 2] for i in range(10)]
    )
    added = cli("site", "dataset", "add", "plain", path, "--label", "y", "--id", "pid", "--home", site_home)
    assert added.exit_code == 0, added.output
    assert json.loads((site_home / "schemas" / "plain.json").read_text())["columns"] == {
        "a": {"type": "numeric", "missing": "refuse", "indicator": False},
        "b": {"type": "numeric", "missing": "refuse", "indicator": False},
    }
    write_csv(path, ["pid", "a", "y"], [[f"p{i}", i, i % 2] for i in range(10)])
    line = one_error(cli("site", "dataset", "check", "plain", "--home", site_home), 1)
    assert "column(s) ['b'] of the dataset's schema are not among the source's columns" in line
    assert "add the dataset again with --replace" in line


def test_a_label_of_more_than_two_classes_is_added_with_classes_and_reported_per_level(site_home, tmp_path):
    path = write_csv(tmp_path / "triage.csv", ["x", "level"], [[i, i % 3] for i in range(12)])
    refused = cli("site", "dataset", "add", "triage", path, "--label", "level", "--home", site_home)
    assert refused.exit_code != 0
    assert "labels must be 0 or 1" in refused.output
    added = cli(
        "site", "dataset", "add", "triage", path, "--label", "level", "--classes", 3, "--home", site_home
    )
    assert added.exit_code == 0, added.output
    checked = cli("site", "dataset", "check", "triage", "--home", site_home)
    assert "12 rows; label 0 in 4, label 1 in 4, label 2 in 4" in checked.stdout
    uri = "file:///x.csv?label=level"
    both = cli("site", "dataset", "add", "t2", uri, "--classes", 3, "--home", site_home)
    assert both.exit_code != 0
    assert "go with a file path, not a URI" in both.output
