"""Attacks on the file sources by their content: a sloppy export or a hostile feed (docs/connectors.md).

The guarantees tried: bad input gets one clear error (a :class:`SchemaError`, which the agent turns into the
failure code ``dataset_invalid``) and never a crash, a warning or a silently different dataset; an id is read
as the text a consent feed would name (or refused), because consent is matched on it; a source that changes
after its schema was pinned is refused; the site-side error names the row or column, and no sentence built
here carries a patient's value beyond the site's own messages.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedhealth.agent._datasets import with_schema
from fedhealth.data import SchemaError, inspect_dataset, open_dataset

N = 30


def csv_text(ids: list[str], xs: list[str] | None = None, header: str = "pid,x,label") -> str:
    xs = xs if xs is not None else [str(i % 7) for i in range(len(ids))]
    rows = [f"{p},{x},{i % 2}" for i, (p, x) in enumerate(zip(ids, xs, strict=True))]
    return header + "\n" + "\n".join(rows) + "\n"


def plain_ids() -> list[str]:
    return [f"p{i:04d}" for i in range(N)]


def uri_of(path: Path) -> str:
    return f"file://{path}?label=label&id=pid"


def ids_of(uri: str) -> list[str]:
    dataset = open_dataset(uri)
    assert dataset.patient_ids_train is not None
    assert dataset.patient_ids_test is not None
    return [*dataset.patient_ids_train, *dataset.patient_ids_test]


# --- ids a comparison cannot see ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell",
    ['"p0003\x00"', '"p00\n03"', "p0003\u200b", "\u2060p0003", "p00\u202803"],
    ids=["nul", "line-break", "zero-width-space", "word-joiner", "line-separator"],
)
def test_an_id_holding_an_invisible_or_control_character_is_refused_naming_the_line_not_the_id(
    tmp_path, cell
):
    """``p0003<ZWSP>`` reads as p0003 to the steward and is another patient to the consent filter."""
    ids = plain_ids()
    path = tmp_path / "ids.csv"
    path.write_text(csv_text(["SENTINEL" if p == "p0003" else p for p in ids]).replace("SENTINEL", cell))
    with pytest.raises(
        SchemaError, match=r"line [56], id column 'pid' holds a control or invisible"
    ) as caught:
        open_dataset(uri_of(path))
    assert "p00" not in str(caught.value)
    # control: the same file with the plain id reads
    path.write_text(csv_text(ids))
    assert "p0003" in ids_of(uri_of(path))


def test_a_csv_with_a_byte_order_mark_reads_its_first_column_as_the_id(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + csv_text(plain_ids()).encode())
    assert sorted(ids_of(uri_of(path))) == plain_ids()


@pytest.mark.parametrize(
    "values",
    [[[i] for i in range(N)], [{"mrn": f"p{i:04d}"} for i in range(N)]],
    ids=["list", "struct"],
)
def test_a_parquet_id_column_of_nested_values_is_refused(tmp_path, values):
    """``str([3])`` would be an id no consent record names: refused, not matched to nobody."""
    table = pa.table(
        {"pid": values, "x": [float(i % 7) for i in range(N)], "label": [i % 2 for i in range(N)]}
    )
    pq.write_table(table, tmp_path / "nested.parquet")
    with pytest.raises(SchemaError, match=r"row 1, id column 'pid' holds a .*, not a text or integer id"):
        open_dataset(uri_of(tmp_path / "nested.parquet"))


def test_a_parquet_binary_id_that_is_not_utf8_is_refused(tmp_path):
    ids = [f"p{i:04d}".encode() for i in range(N)]
    ids[4] = b"p\xff\xfe"
    table = pa.table({"pid": ids, "x": [float(i % 7) for i in range(N)], "label": [i % 2 for i in range(N)]})
    pq.write_table(table, tmp_path / "bin.parquet")
    with pytest.raises(SchemaError, match=r"row 5, id column 'pid' holds bytes, not UTF-8 text"):
        open_dataset(uri_of(tmp_path / "bin.parquet"))


# --- hostile cells ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [("1e308", "-1e308"), ("1e200", "1"), ("1.7976931348623157e308", "0")])
def test_finite_values_too_large_to_standardize_are_one_error_naming_the_column(tmp_path, values):
    """They pass the finite check, then overflow the mean or the variance: one SchemaError naming the
    column (pytest runs with warnings as errors, so an overflow warning fails this test too)."""
    xs = [values[i % 2] for i in range(N)]
    path = tmp_path / "big.csv"
    path.write_text(csv_text(plain_ids(), xs, header="pid,troponin,label"))
    with pytest.raises(SchemaError, match=r"feature 'troponin' holds values too large to standardize"):
        open_dataset(uri_of(path))


@pytest.mark.parametrize("values", [("5e-324", "0"), ("-0.0", "0.0"), ("2.2250738585072014e-308", "-1e-310")])
def test_subnormal_and_signed_zero_values_give_finite_standardized_features(tmp_path, values):
    xs = [values[i % 2] for i in range(N)]
    path = tmp_path / "tiny.csv"
    path.write_text(csv_text(plain_ids(), xs))
    dataset = open_dataset(uri_of(path))
    assert np.isfinite(dataset.X_train).all()
    assert np.isfinite(dataset.X_test).all()


def test_a_field_longer_than_the_csv_limit_is_one_error_that_does_not_quote_it(tmp_path):
    xs = [str(i) for i in range(N)]
    xs[3] = "7" * 200_000
    path = tmp_path / "long.csv"
    path.write_text(csv_text(plain_ids(), xs))
    with pytest.raises(SchemaError) as caught:
        open_dataset(uri_of(path))
    assert len(str(caught.value)) < 400


def test_a_file_with_a_latin1_byte_is_one_error_naming_the_offset_not_the_text(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_bytes(csv_text(plain_ids()).encode() + "Jos\xe9,1,0\n".encode("latin-1"))
    with pytest.raises(SchemaError, match=r"not UTF-8 text \(byte \d+\)") as caught:
        open_dataset(uri_of(path))
    assert "Jos" not in str(caught.value)


def test_a_formula_like_feature_cell_is_refused_and_quoted_at_most_in_part(tmp_path):
    xs = [str(i % 7) for i in range(N)]
    xs[2] = "=cmd|' /C calc'!A0" + "x" * 100
    path = tmp_path / "formula.csv"
    path.write_text(csv_text(plain_ids(), xs))
    with pytest.raises(SchemaError, match=r"line 4, column 'x'") as caught:
        open_dataset(uri_of(path))
    assert "x" * 50 not in str(caught.value)  # a cell is quoted to 40 characters at most


# --- a source changed under its pinned schema ---------------------------------------------------------------


def pin(uri: str, tmp_path: Path) -> str:
    schema = inspect_dataset(uri).schema
    assert schema is not None
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps(schema.to_json()))
    return with_schema(uri, pinned)


def cohort_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "pid": plain_ids(),
            "age": [float(30 + i) for i in range(N)],
            "marker": [float(i % 5) for i in range(N)],
            "label": [i % 2 for i in range(N)],
        }
    )


CHANGES = {
    "renamed": lambda f: f.rename(columns={"marker": "troponin"}),
    "retyped-to-text": lambda f: f.assign(marker=[f"{v} mg" for v in f["marker"]]),
    "label-yes-no": lambda f: f.assign(label=["yes" if v else "no" for v in f["label"]]),
    "label-as-two-four": lambda f: f.assign(label=f["label"] * 2 + 2),
    "id-dropped": lambda f: f.drop(columns=["pid"]),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_parquet_source_changed_after_its_schema_was_pinned_is_refused(tmp_path, change):
    path = tmp_path / "cohort.parquet"
    cohort_frame().to_parquet(path, index=False)
    uri = pin(uri_of(path), tmp_path)
    before = open_dataset(uri)  # control: the pinned source reads
    assert before.num_train + before.num_test == N
    change(cohort_frame()).to_parquet(path, index=False)
    with pytest.raises(SchemaError):
        open_dataset(uri)


def test_a_parquet_source_with_its_columns_reordered_and_ints_for_floats_is_the_same_dataset(tmp_path):
    """Storage order and an integer encoding of the same numbers never change what is trained on."""
    path = tmp_path / "cohort.parquet"
    cohort_frame().to_parquet(path, index=False)
    uri = pin(uri_of(path), tmp_path)
    fingerprint = open_dataset(uri).fingerprint
    frame = cohort_frame()
    frame = frame.assign(age=frame["age"].astype("int64"))[["label", "marker", "age", "pid"]]
    frame.iloc[::-1].to_parquet(path, index=False)
    assert open_dataset(uri).fingerprint == fingerprint
