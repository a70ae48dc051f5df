import hashlib
import json

import numpy as np
import pytest

from fedhealth.core import InputError
from fedhealth.data import TabularDataset


def _dataset(**overrides):
    base = {
        "name": "toy",
        "X_train": np.array([[0.5, 1.0], [2.0, -1.0], [0.0, 3.0]]),
        "y_train": np.array([0, 1, 1]),
        "X_test": np.array([[1.0, 1.0]]),
        "y_test": np.array([0]),
        "feature_names": ("a", "b"),
        "patient_ids_train": ("x1", "x2", "x3"),
    }
    base.update(overrides)
    return TabularDataset(**base)


def _reference_fingerprint(X_train, y_train, X_test, y_test, feature_names, patient_ids):
    """The encoding ``dataset_fingerprint`` documents, written out with hashlib and json: an 8-byte
    little-endian header length, the canonical-JSON header, then each array's little-endian C-order bytes."""
    arrays = [
        ("X_train", "<f8", X_train),
        ("y_train", "<i8", y_train),
        ("X_test", "<f8", X_test),
        ("y_test", "<i8", y_test),
    ]
    header = {
        "format": "fedhealth.tabular.v1",
        "feature_names": list(feature_names),
        "patient_ids_train": None if patient_ids is None else list(patient_ids),
        "arrays": [{"name": k, "dtype": dt, "shape": list(np.shape(a))} for k, dt, a in arrays],
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    digest = hashlib.sha256(len(text).to_bytes(8, "little") + text)
    for _, dt, a in arrays:
        digest.update(np.ascontiguousarray(a, dtype=dt).tobytes())
    return digest.hexdigest()


# The toy dataset's fingerprint as recorded when the v1 format was fixed: a model's provenance names its data
# by this value, so it must not change between runs, processes or versions without a new format name.
TOY_FINGERPRINT_V1 = "fd91ed3842f24e5647bbd69140cebb1d9e60caf214dbfba961bf9ab65c01db72"


def test_fingerprint_is_the_documented_encoding_stable_and_ignores_the_name():
    expected = _reference_fingerprint(
        [[0.5, 1.0], [2.0, -1.0], [0.0, 3.0]], [0, 1, 1], [[1.0, 1.0]], [0], ("a", "b"), ("x1", "x2", "x3")
    )
    assert expected == TOY_FINGERPRINT_V1
    assert _dataset().fingerprint == expected
    assert _dataset(name="other").fingerprint == expected
    # no ids and an empty test split: the header says null and shape [0, 2]
    empty = np.zeros((0, 2))
    no_ids = _reference_fingerprint(_dataset().X_train, [0, 1, 1], empty, [], ("a", "b"), None)
    assert _dataset(patient_ids_train=None, X_test=empty, y_test=np.zeros(0, int)).fingerprint == no_ids


@pytest.mark.parametrize(
    "change",
    [
        {"X_train": np.array([[0.5, 1.0], [2.0, -1.0], [0.0, 3.0000000001]])},
        {"y_train": np.array([0, 1, 0])},
        {"X_test": np.array([[1.0, 1.5]])},
        {"y_test": np.array([1])},
        {"feature_names": ("a", "c")},
        {"patient_ids_train": ("x1", "x2", "x4")},
        {"patient_ids_train": None},
    ],
)
def test_fingerprint_changes_when_one_value_changes(change):
    assert _dataset(**change).fingerprint != _dataset().fingerprint


def test_fingerprint_does_not_confuse_a_row_moved_between_parts():
    moved = _dataset(
        X_train=np.array([[0.5, 1.0], [2.0, -1.0]]),
        y_train=np.array([0, 1]),
        X_test=np.array([[0.0, 3.0], [1.0, 1.0]]),
        y_test=np.array([1, 0]),
        patient_ids_train=("x1", "x2"),
    )
    assert moved.fingerprint != _dataset().fingerprint


def test_fingerprint_counts_values_not_dtypes_or_signed_zeros():
    same = _dataset(
        X_train=np.array([[0.5, 1.0], [2.0, -1.0], [-0.0, 3.0]], dtype=np.float32),
        y_train=np.array([0.0, 1.0, 1.0]),
    )
    assert same.fingerprint == _dataset().fingerprint


def test_arrays_are_copied_and_read_only():
    X = np.array([[0.5, 1.0], [2.0, -1.0], [0.0, 3.0]])
    d = _dataset(X_train=X)
    X[0, 0] = 99.0
    assert d.X_train[0, 0] == 0.5
    with pytest.raises(ValueError, match="read-only"):
        d.X_train[0, 0] = 1.0
    assert d.y_train.dtype == np.int64


def test_select_train_keeps_the_chosen_rows_and_their_ids():
    d = _dataset().select_train(np.array([True, False, True]))
    assert d.patient_ids_train == ("x1", "x3")
    np.testing.assert_array_equal(d.y_train, [0, 1])
    assert d.num_test == 1
    with pytest.raises(InputError):
        _dataset().select_train(np.array([1, 0, 1]))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"X_train": np.zeros((3, 3))}, r"X_train must have shape \(rows, 2\)"),
        ({"y_train": np.array([0, 1])}, r"y_train must have shape \(3,\)"),
        ({"X_test": np.array([[np.nan, 1.0]])}, "NaN"),
        ({"y_test": np.array([2])}, "labels 0 and 1"),
        ({"feature_names": ("a", "a")}, "not unique"),
        ({"patient_ids_train": ("x1", "x2")}, "2 patient ids for 3"),
        ({"patient_ids_train": ("x1", "x1", "x2")}, "patient ids are not unique"),
        ({"X_train": np.array([["a", "b"]] * 3)}, "numeric"),
    ],
)
def test_inconsistent_datasets_are_refused(change, match):
    with pytest.raises(InputError, match=match):
        _dataset(**change)
