"""Files with real-world columns: declared schemas (categories, dates, missing values, ranges), CSV and
Parquet alike, rows ordered by patient id, the id never a feature, and the local quality report."""

import csv
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedhealth.core import ConfigError
from fedhealth.data import (
    NonNumericColumnError,
    SchemaError,
    heart_disease_records,
    inspect_dataset,
    load_heart_disease,
    open_dataset,
)

HEART_SCHEMA = """
id = "patient_id"
label = "disease"
[columns.age]
[columns.sex]
[columns.trestbps]
[columns.chol]
[columns.fbs]
[columns.thalach]
[columns.exang]
[columns.oldpeak]
[columns.cp]
type = "categorical"
categories = [1, 2, 3, 4]
drop_first = true
[columns.restecg]
type = "categorical"
categories = [0, 1, 2]
drop_first = true
"""

WARD_SCHEMA = """
id = "patient_id"
label = "readmitted"
missing_values = ["", "NA"]

[columns.age]
type = "numeric"
min = 0
max = 120
missing = "median"
indicator = true

[columns.smoker]
type = "categorical"
categories = ["never", "former", "current"]
unseen = "other"
missing = "none"

[columns.admitted]
type = "date"
unit = "days"
reference = "2024-01-01"
name = "days_since_admission"

[columns.birth_date]
type = "date"
unit = "years"
reference_column = "admitted"
name = "age_at_admission"
"""

WARD_ROWS = [
    # patient_id, age, smoker, admitted, birth_date, readmitted, note (a column the schema does not use)
    ("w07", "64", "never", "2023-12-01", "1959-12-02", "1", "free text"),
    ("w02", "NA", "current", "2023-06-15", "1980-06-15", "0", "x"),
    ("w10", "51", "vaper", "2023-01-01", "1972-01-01", "1", ""),
    ("w01", "70", "former", "2022-12-31", "1952-12-31", "0", "y"),
    ("w05", "", "never", "2023-03-03", "1990-03-04", "1", "z"),
    ("w03", "33", "current", "2023-09-09", "1990-01-01", "0", ""),
    ("w04", "45", "former", "2023-02-02", "1978-02-01", "1", ""),
    ("w06", "58", "never", "2023-04-04", "1965-04-05", "0", ""),
    ("w08", "29", "NA", "2023-05-05", "1994-05-05", "1", ""),
    ("w09", "81", "former", "2023-07-07", "1942-07-08", "0", ""),
]
WARD_HEADER = ["patient_id", "age", "smoker", "admitted", "birth_date", "readmitted", "note"]


def write_csv(path: Path, header, rows) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def ward(tmp_path) -> tuple[Path, Path]:
    schema = tmp_path / "ward.toml"
    schema.write_text(WARD_SCHEMA)
    return write_csv(tmp_path / "ward.csv", WARD_HEADER, WARD_ROWS), schema


def _open(path: Path, schema: Path, extra: str = "test_fraction=0&standardize=false"):
    return open_dataset(f"file://{path}?schema={schema}&{extra}")


def test_a_declared_schema_encodes_categories_dates_and_missing_values(ward):
    d = _open(*ward)
    assert d.feature_names == (
        "age",
        "age_missing",
        "smoker=never",
        "smoker=former",
        "smoker=current",
        "smoker=other",
        "days_since_admission",
        "age_at_admission",
    )
    # rows come in patient-id order whatever the file's order; the id and the note never become features
    assert d.patient_ids_train == tuple(f"w{i:02d}" for i in range(1, 11))
    rows = dict(zip(d.patient_ids_train, d.X_train.tolist(), strict=True))
    observed = [64, 51, 70, 33, 45, 58, 29, 81]
    assert rows["w07"] == [64, 0, 1, 0, 0, 0, 31, 63]  # born 1959-12-02: 63 on 2023-12-01, not yet 64
    assert rows["w02"] == [float(np.median(observed)), 1, 0, 0, 1, 0, 200, 43]
    assert rows["w05"][:2] == [float(np.median(observed)), 1]
    assert rows["w10"][2:6] == [0, 0, 0, 1]  # "vaper" is not declared: counted as other
    assert rows["w08"][2:6] == [0, 0, 0, 0]  # a missing category: no column set
    assert rows["w05"][7] == 32  # born 1990-03-04, admitted 2023-03-03: the day before the birthday
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 0, 1, 1, 0, 1]


def test_the_same_rows_in_another_order_or_as_parquet_give_the_same_dataset(ward, tmp_path):
    path, schema = ward
    shuffled = list(WARD_ROWS)
    random.Random(3).shuffle(shuffled)
    other = write_csv(tmp_path / "shuffled.csv", WARD_HEADER, shuffled)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame["age"] = pd.to_numeric(frame["age"].replace({"NA": None, "": None}))  # typed, NULL where missing
    frame["admitted"] = pd.to_datetime(frame["admitted"]).dt.date
    frame.loc[frame["smoker"] == "NA", "smoker"] = None
    frame["readmitted"] = frame["readmitted"].astype(int)
    parquet = tmp_path / "ward.parquet"
    frame.to_parquet(parquet)
    extra = "test_fraction=0.3&seed=5"
    base = _open(path, schema, extra)
    assert _open(other, schema, extra).fingerprint == base.fingerprint
    from_parquet = _open(parquet, schema, extra)
    assert from_parquet.fingerprint == base.fingerprint
    np.testing.assert_array_equal(from_parquet.X_train, base.X_train)


def test_a_shuffled_csv_of_the_uci_rows_reproduces_fed_heart_disease_bit_for_bit(heart_data_dir, tmp_path):
    schema = tmp_path / "heart.toml"
    schema.write_text(HEART_SCHEMA)
    for center in range(4):
        records = heart_disease_records(center, heart_data_dir)
        fields = list(records[0].__slots__)
        rows = [[getattr(r, f) for f in fields] for r in records]
        random.Random(center).shuffle(rows)
        path = write_csv(tmp_path / f"center{center}.csv", fields, rows)
        d = open_dataset(f"file://{path}?schema={schema}&test_fraction=0.34&seed=43")
        builtin = load_heart_disease(center, heart_data_dir)
        np.testing.assert_array_equal(d.X_train, builtin.X_train)
        np.testing.assert_array_equal(d.X_test, builtin.X_test)
        assert d.patient_ids_train == builtin.patient_ids_train
        assert d.patient_ids_test == builtin.patient_ids_test


def test_consent_filtering_fills_a_median_again_from_the_patients_kept(ward):
    d = _open(*ward)
    keep = np.array([pid not in ("w01", "w03", "w04") for pid in d.patient_ids_train])
    kept = d.select_train(keep)
    fill = float(np.median([64, 51, 58, 29, 81]))  # the ages of the kept patients who have one
    rows = dict(zip(kept.patient_ids_train, kept.X_train.tolist(), strict=True))
    assert rows["w02"][0] == fill
    assert rows["w05"][0] == fill
    assert rows["w07"][0] == 64


def test_standardized_features_refit_mean_fills_on_the_kept_rows(tmp_path):
    schema = tmp_path / "s.toml"
    schema.write_text('id = "pid"\nlabel = "y"\n[columns.x]\nmissing = "mean"\n')
    rows = [("a", "1", "0"), ("b", "", "1"), ("c", "3", "0"), ("d", "100", "1"), ("e", "5", "0")]
    path = write_csv(tmp_path / "m.csv", ["pid", "x", "y"], rows)
    d = open_dataset(f"file://{path}?schema={schema}&test_fraction=0")
    kept = d.select_train(np.array([True, True, True, False, True]))
    raw = kept.X_train[:, 0] * kept.scaling.std[0] + kept.scaling.mean[0]
    np.testing.assert_allclose(raw, [1, 3, 3, 5])  # b's fill is the mean of 1, 3 and 5, not 27.25


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        ({"age": "130"}, SchemaError, r"line \d+, column 'age' holds 130, above the declared max 120"),
        ({"admitted": "yesterday"}, SchemaError, r"column 'admitted' holds 'yesterday', not a date"),
        ({"age": "sixty"}, NonNumericColumnError, r"column 'age' holds 'sixty', not a number"),
        ({"readmitted": "2"}, SchemaError, "labels must be 0 or 1"),
        ({"readmitted": ""}, SchemaError, "every row needs a label"),
        ({"patient_id": "w01"}, SchemaError, "repeats an id"),
    ],
)
def test_bad_values_under_a_declared_schema_are_one_clear_error(ward, tmp_path, edit, error, match):
    _, schema = ward
    rows = [list(r) for r in WARD_ROWS]
    for column, value in edit.items():
        rows[2][WARD_HEADER.index(column)] = value
    bad = write_csv(tmp_path / "bad.csv", WARD_HEADER, rows)
    with pytest.raises(error, match=match) as info:
        _open(bad, schema)
    assert str(bad) in str(info.value)


def test_an_undeclared_category_is_refused_when_the_schema_says_so(ward, tmp_path):
    path, schema = ward
    schema.write_text(WARD_SCHEMA.replace('unseen = "other"\n', ""))
    with pytest.raises(SchemaError, match=r"holds 'vaper', not one of its declared categories"):
        _open(path, schema)


def test_a_missing_value_without_a_policy_is_refused_naming_the_line(ward):
    path, schema = ward
    schema.write_text(WARD_SCHEMA.replace('missing = "median"\n', ""))
    with pytest.raises(SchemaError, match=r"line 3, column 'age' is empty \(a missing value: declare"):
        _open(path, schema)


def test_a_column_the_schema_needs_that_the_source_lacks_is_refused(ward, tmp_path):
    _, schema = ward
    rows = [r[:4] + r[5:] for r in WARD_ROWS]
    header = WARD_HEADER[:4] + WARD_HEADER[5:]
    path = write_csv(tmp_path / "no_birth.csv", header, rows)
    with pytest.raises(SchemaError, match=r"column\(s\) \['birth_date'\] of the dataset's schema are not"):
        _open(path, schema)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('label = "y"\n[columns.x]\ntype = "text"\n', r"columns: column 'x': type 'text' is not one of"),
        ('label = "y"\n[columns.x]\nmissing = "constant"\n', "needs a finite number as fill"),
        ('label = "y"\n[columns.x]\ntype = "categorical"\ncategories = ["a", "a"]\n', "repeat a value"),
        ('label = "y"\n[columns.x]\ntype = "date"\n', "exactly one of reference"),
        ('label = "y"\n[columns.x]\nmin = 3\nmax = 1\n', "min 3.0 is above max 1.0"),
        ('label = "y"\n[columns.y]\n', "label column 'y' cannot also be a feature"),
        ('label = "y"\ncolour = "red"\n[columns.x]\n', "colour: Extra inputs are not permitted"),
        ('label = "y\n', "is not valid TOML"),
    ],
)
def test_a_bad_schema_file_names_the_key(tmp_path, text, match):
    schema = tmp_path / "bad.toml"
    schema.write_text(text)
    path = write_csv(tmp_path / "d.csv", ["x", "y"], [[1, 0], [2, 1]])
    with pytest.raises(ConfigError, match=match):
        open_dataset(f"file://{path}?schema={schema}&test_fraction=0")


def test_a_uri_role_that_contradicts_the_schema_is_refused(ward):
    path, schema = ward
    with pytest.raises(
        ConfigError, match="the URI's label='age' contradicts the schema's label = 'readmitted'"
    ):
        open_dataset(f"file://{path}?schema={schema}&label=age")


def test_the_quality_report_counts_missing_values_ranges_categories_and_far_out_values(ward, tmp_path):
    path, schema = ward
    report = inspect_dataset(f"file://{path}?schema={schema}&test_fraction=0").quality
    by_name = {c.column: c for c in report.columns}
    assert (report.rows, report.positives) == (10, 5)
    age = by_name["age"]
    assert (age.missing, age.minimum, age.maximum) == (2, 29, 81)
    assert by_name["smoker"].categories == (("never", 3), ("former", 3), ("current", 2))
    assert (by_name["smoker"].unseen, by_name["smoker"].missing) == (1, 1)
    assert by_name["admitted"].kind == "date, days"
    assert report.ignored_columns == ("note",)
    # one far-out value among many ordinary ones
    rows = [
        [f"p{i:03d}", str(50 + i % 7), "never", "2023-01-01", "1970-01-01", str(i % 2), ""] for i in range(40)
    ]
    rows[5][1] = "119"
    outlier = write_csv(tmp_path / "outlier.csv", WARD_HEADER, rows)
    report = inspect_dataset(f"file://{outlier}?schema={schema}&test_fraction=0").quality
    assert next(c for c in report.columns if c.column == "age").outliers == 1


def test_an_inferred_schema_names_dates_and_text_with_a_hint(tmp_path):
    path = write_csv(
        tmp_path / "d.csv", ["pid", "when", "y"], [["a", "2020-01-01", 0], ["b", "2020-02-01", 1]]
    )
    with pytest.raises(
        NonNumericColumnError, match=r"line 2, column 'when' holds '2020-01-01', not a number"
    ):
        open_dataset(f"file://{path}?label=y&id=pid&test_fraction=0")
    ok = write_csv(tmp_path / "ok.csv", ["x", "y"], [[1, 0], [2, 1]])
    inspection = inspect_dataset(f"file://{ok}?label=y&test_fraction=0")
    assert inspection.schema_inferred
    assert inspection.schema.feature_names == ("x",)
