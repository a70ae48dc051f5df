import numpy as np
import pytest

from fedhealth.core import ConfigError, DatasetMissingError
from fedhealth.data import CsvOptions, SchemaError, inspect_dataset, open_dataset, read_csv_dataset


def _write(tmp_path, text, name="cohort.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _cohort(n=40):
    rng = np.random.default_rng(0)
    lines = ["pid,age,bmi,label"]
    for i in range(n):
        lines.append(f"p{i:03d},{rng.integers(20, 90)},{rng.normal(25, 4):.3f},{i % 3 == 0:d}")
    return "\n".join(lines) + "\n"


def test_csv_happy_path_with_ids_split_and_standardization(tmp_path):
    path = _write(tmp_path, _cohort())
    d = open_dataset(f"file://{path}?label=label&id=pid&test_fraction=0.25&seed=3")
    assert d.name == "cohort"
    assert d.feature_names == ("age", "bmi")
    assert (d.num_train, d.num_test) == (30, 10)
    assert set(d.y_train.tolist()) == {0, 1}
    assert len(d.patient_ids_train) == 30
    assert all(pid.startswith("p") for pid in d.patient_ids_train)
    np.testing.assert_allclose(d.X_train.mean(axis=0), 0, atol=1e-9)
    again = open_dataset(f"file://{path}?label=label&id=pid&test_fraction=0.25&seed=3")
    assert again.fingerprint == d.fingerprint
    other_seed = open_dataset(f"file://{path}?label=label&id=pid&test_fraction=0.25&seed=4")
    assert other_seed.fingerprint != d.fingerprint


def test_csv_without_standardization_keeps_the_file_values_in_file_order(tmp_path):
    path = _write(tmp_path, "a,b,y\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n")
    d = open_dataset(f"file://{path}?label=y&test_fraction=0&standardize=false")
    np.testing.assert_array_equal(d.X_train, [[1, 2], [3, 4], [5, 6], [7, 8]])
    np.testing.assert_array_equal(d.y_train, [0, 1, 0, 1])
    assert d.num_test == 0
    assert d.patient_ids_train is None


def test_a_multiclass_label_is_read_with_classes_and_stratified_in_the_split(tmp_path):
    rows = ["a,triage"] + [f"{i},{i % 4}" for i in range(40)]  # four levels, ten rows each
    path = _write(tmp_path, "\n".join(rows) + "\n")
    d = open_dataset(f"file://{path}?label=triage&classes=4&test_fraction=0.5")
    assert d.classes == 4
    assert np.bincount(d.y_train).tolist() == [5, 5, 5, 5]  # stratified on the label, as for two classes
    assert np.bincount(d.y_test).tolist() == [5, 5, 5, 5]
    direct = read_csv_dataset(path, CsvOptions(label="triage", classes=4, test_fraction=0.5))
    assert direct.fingerprint == d.fingerprint  # the Python reader declares the classes alike
    report = inspect_dataset(f"file://{path}?label=triage&classes=4&test_fraction=0.5").quality
    assert report.label_counts() == [10, 10, 10, 10]  # every level counted, not only label 1
    assert report.lines()[0] == "40 rows; label 0 in 10, label 1 in 10, label 2 in 10, label 3 in 10"
    assert report.to_json()["label_counts"] == {"0": 10, "1": 10, "2": 10, "3": 10}
    small = _write(tmp_path, "a,y\n1,0\n2,1\n3,0\n4,1\n", "b.csv")
    binary = open_dataset(f"file://{small}?label=y&test_fraction=0")
    assert binary.classes == 2
    declared = open_dataset(f"file://{small}?label=y&test_fraction=0&classes=3")
    assert declared.fingerprint != binary.fingerprint  # the same rows declared as another label


def test_csv_accepts_a_percent_encoded_path_and_localhost(tmp_path):
    path = _write(tmp_path, "a,y\n1,0\n2,1\n3,0\n4,1\n", name="my cohort.csv")
    encoded = str(path).replace(" ", "%20")
    d = open_dataset(f"file://localhost{encoded}?label=y&test_fraction=0")
    assert d.num_train == 4


@pytest.mark.parametrize(
    ("text", "query", "match"),
    [
        ("a,b\n1,0\n", "label=y", r"label column 'y' is not in the header"),
        ("a,y\n1,0\n", "label=y&id=pid", r"id column 'pid' is not in the header"),
        ("a,y\n1,0\nx,1\n", "label=y", r"line 3, column 'a' holds 'x', not a number"),
        ("a,y\n1,0\n,1\n", "label=y", r"line 3, column 'a' is empty"),
        ("a,y\n1,0\nnan,1\n", "label=y", r"not a finite number"),
        ("a,y\n1,0\n2,2\n", "label=y", r"line 3, label column 'y' holds 2; labels must be 0 or 1"),
        (
            "a,y\n1,0\n2,3\n",
            "label=y&classes=3",
            r"line 3, label column 'y' holds 3; labels must be integers from 0 to 2 \(classes=3\)",
        ),
        (
            "a,y\n1,0\n2,1.5\n",
            "label=y&classes=3",
            r"line 3, label column 'y' holds 1.5; labels must be integers",
        ),
        ("a,y\n1,0\n2,yes\n", "label=y", r"line 3, column 'y' holds 'yes', not a number"),
        ("a,y\n1,0\n2\n", "label=y", r"line 3 has 1 fields, the header has 2"),
        ("a,a,y\n1,2,0\n", "label=y", "repeats a column name"),
        ("", "label=y", "the file is empty"),
        ("a,y\n", "label=y", "no data rows"),
        ("y\n1\n0\n", "label=y", "no feature columns"),
        ("pid,a,y\nx,1,0\nx,2,1\n", "label=y&id=pid", "repeats an id"),
        ("a,y\n1,0\n", "label=y&test_fraction=0.9", r"cannot split 1 rows"),
        ("a,y\n1,0\n2,1\n", "label=y&test_fraction=0.5", "needs at least two training rows"),
    ],
)
def test_bad_csv_content_is_a_schema_error_naming_the_file(tmp_path, text, query, match):
    path = _write(tmp_path, text)
    with pytest.raises(SchemaError, match=match) as info:
        open_dataset(f"file://{path}?{query}")
    assert str(path) in str(info.value)


def test_a_missing_csv_file_is_a_missing_dataset(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"absent\.csv does not exist"):
        open_dataset(f"file://{tmp_path}/absent.csv?label=y")


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("file://relative/x.csv?label=y", "must be absolute"),
        ("file:///x.csv", r"missing required parameter\(s\) \['label'\]"),
        ("file:///x.csv?label=y&colour=red", r"unknown parameter\(s\) \['colour'\]"),
        ("file:///x.csv?label=y&label=z", "repeats the parameter 'label'"),
        ("file:///x.csv?label=y&test_fraction=1", r"must lie in \[0.0, 1.0\)"),
        ("file:///x.csv?label=y&test_fraction=abc", "is not a number"),
        ("file:///x.csv?label=y&seed=-1", "must be from 0"),
        ("file:///x.csv?label=y&standardize=maybe", "is not a boolean"),
        ("file:///x.csv?label=y&classes=1", "classes=1 must be from 2 to 256"),
        ("file:///x.csv?label=y&classes=257", "classes=257 must be from 2 to 256"),
        ("file:///x.csv?label=y&classes=two", "is not an integer"),
    ],
)
def test_bad_csv_uris_are_config_errors(uri, match):
    with pytest.raises(ConfigError, match=match):
        open_dataset(uri)


def test_a_file_that_is_not_utf8_text_is_a_schema_error(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("a,y\n1,0\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(SchemaError, match="not UTF-8 text"):
        open_dataset(f"file://{path}?label=y")


def test_a_csv_with_a_nul_byte_is_a_schema_error(tmp_path):
    path = tmp_path / "nul.csv"
    path.write_bytes(b"a,y\n1\x00,0\n")
    with pytest.raises(SchemaError, match=str(path)):
        open_dataset(f"file://{path}?label=y")
