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


def test_fingerprint_is_stable_and_ignores_the_name():
    assert _dataset().fingerprint == _dataset().fingerprint
    assert _dataset().fingerprint == _dataset(name="other").fingerprint
    assert len(_dataset().fingerprint) == 64


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
