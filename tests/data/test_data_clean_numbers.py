"""The fast path for clean numeric text columns gives exactly what the general path gives, and leaves every
cell it cannot vouch for to it (and to its error messages)."""

import numpy as np
import pandas as pd
import pytest

from fedhealth.data import NonNumericColumnError, SchemaError
from fedhealth.data import _table as table
from fedhealth.data._table import SourceTable, TableOptions, parse_table


def _source(cells: dict[str, list[str]]) -> SourceTable:
    frame = pd.DataFrame({c: pd.Series(v, dtype="object") for c, v in cells.items()})
    rows = len(next(iter(cells.values())))
    return SourceTable(
        name="t", where="t.csv", frame=frame, text=True, row_labels=[f"line {i + 2}" for i in range(rows)]
    )


def _parsed(cells: dict[str, list[str]], *, fast: bool, monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(table, "_clean_text_numbers", lambda series, tokens: None)
        parsed = parse_table(_source(cells), TableOptions(label="y"))
    return [parsed.labels.astype(np.float64), *(c.values for c in parsed.columns)]


COLUMNS = {
    "y": ["0", "1", " 1", "0 ", "1"],
    "plain": ["1.5", "-2.25", "3", "4e-3", "1E5"],
    "spaces": [" 1", "2 ", "\t3", "4\n", " +5 "],
    "digits": ["12345678901234567890", "0.1", "9007199254740993", "2.5e-308", "1e308"],
    "ints_with_minus_zero": ["-0", "1", "2", "3", "4"],  # to_numeric reads integers: +0
    "floats_with_minus_zero": ["-0.0", "1.5", "2", "3", "4"],
}


def test_the_fast_path_gives_the_general_paths_numbers_bit_for_bit(monkeypatch):
    fast = _parsed(COLUMNS, fast=True, monkeypatch=monkeypatch)
    general = _parsed(COLUMNS, fast=False, monkeypatch=monkeypatch)
    for a, b in zip(fast, general, strict=True):
        assert a.tobytes() == b.tobytes()


def test_the_fast_path_answers_only_for_plain_ascii_numbers():
    def clean(cells: list[str], tokens: tuple[str, ...] = ("",)) -> np.ndarray | None:
        return table._clean_text_numbers(pd.Series(cells, dtype="object"), tokens)

    assert clean(["1", " 2.5 ", "-3e2"]) is not None
    assert clean(["1", ""]) is None  # a missing cell
    assert clean(["1", "-0"]) is None
    assert clean(["1", "1_0"]) is None
    assert clean(["1", "\u0661"]) is None  # an Arabic-Indic one: float reads it, to_numeric does not
    assert clean(["1", "abc"]) is None
    assert clean(["1", "-999"], tokens=("", "-999")) is None  # a token that reads as a number
    assert clean([1.0, 2.0]) is None  # not text


@pytest.mark.parametrize(
    ("cell", "error", "match"),
    [
        ("abc", NonNumericColumnError, "line 3, column 'x' holds 'abc', not a number"),
        ("inf", SchemaError, "line 3, column 'x' holds 'inf', not a finite number"),
        (" nan ", SchemaError, "line 3, column 'x' holds 'nan', not a finite number"),
        ("1_0", SchemaError, "line 3, column 'x' holds '1_0', not a finite number"),  # as before
        ("1e400", SchemaError, "line 3, column 'x' holds '1e400', not a finite number"),
        ("", SchemaError, "line 3, column 'x' is empty"),
    ],
)
def test_a_bad_cell_is_named_by_its_line_as_before(cell, error, match):
    source = _source({"y": ["0", "1", "0"], "x": ["1", cell, "2"]})
    with pytest.raises(error, match=match):
        parse_table(source, TableOptions(label="y"))
