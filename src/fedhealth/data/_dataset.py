"""The in-memory form of a tabular dataset, its fingerprint, and the split and scaling every loader shares."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from fedhealth.core import InputError, canonical_json

_FINGERPRINT_FORMAT = "fedhealth.tabular.v1"
# FLamby adds this to the std before dividing, so a constant column maps to 0 instead of NaN
STD_EPSILON = 1e-9


def _frozen(arr: np.ndarray) -> np.ndarray:
    out = np.array(arr, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class TabularDataset:
    """One site's data, split into train and test: float64 features, int64 labels in {0, 1}.

    The arrays are copied and made read-only, so a dataset cannot change under its fingerprint.
    ``patient_ids_train`` are pseudonymous ids of the training rows (for consent filtering); unique if given.
    ``fingerprint`` is the sha256 (hex) of a canonical encoding of the feature names, the patient ids and all
    four arrays (shapes, little-endian bytes); it identifies the content, not the ``name``.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    feature_names: tuple[str, ...]
    patient_ids_train: tuple[str, ...] | None = None
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(self.feature_names)
        if len(set(names)) != len(names):
            raise InputError(f"dataset {self.name!r}: feature names are not unique")
        d = len(names)
        arrays: dict[str, np.ndarray] = {}
        for part in ("train", "test"):
            X = np.asarray(getattr(self, f"X_{part}"))
            y = np.asarray(getattr(self, f"y_{part}"))
            if X.ndim != 2 or X.shape[1] != d:
                raise InputError(
                    f"dataset {self.name!r}: X_{part} must have shape (rows, {d}), got {X.shape}"
                )
            if y.shape != (X.shape[0],):
                raise InputError(
                    f"dataset {self.name!r}: y_{part} must have shape ({X.shape[0]},), got {y.shape}"
                )
            if X.dtype.kind not in "fiub" or y.dtype.kind not in "fiub":
                raise InputError(f"dataset {self.name!r}: X_{part} and y_{part} must be numeric")
            X64 = X.astype(np.float64) + 0.0  # + 0.0 turns -0.0 into 0.0: equal values, equal fingerprints
            if not np.isfinite(X64).all():
                raise InputError(f"dataset {self.name!r}: X_{part} holds NaN or infinite values")
            if not np.isin(y, (0, 1)).all():
                raise InputError(f"dataset {self.name!r}: y_{part} must hold only the labels 0 and 1")
            arrays[f"X_{part}"] = _frozen(X64)
            arrays[f"y_{part}"] = _frozen(y.astype(np.int64))
        ids = None if self.patient_ids_train is None else tuple(str(i) for i in self.patient_ids_train)
        if ids is not None:
            if len(ids) != arrays["X_train"].shape[0]:
                raise InputError(
                    f"dataset {self.name!r}: {len(ids)} patient ids for {len(arrays['y_train'])} train rows"
                )
            if len(set(ids)) != len(ids):
                raise InputError(f"dataset {self.name!r}: patient ids are not unique")
        for key, value in arrays.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "feature_names", names)
        object.__setattr__(self, "patient_ids_train", ids)
        object.__setattr__(self, "fingerprint", dataset_fingerprint(arrays, names, ids))

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def num_train(self) -> int:
        return int(self.X_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.X_test.shape[0])

    def select_train(self, keep: np.ndarray) -> TabularDataset:
        """A copy holding only the training rows where the boolean mask ``keep`` is true (test set unchanged);
        e.g. the patients whose consent covers a study."""
        mask = np.asarray(keep)
        if mask.dtype != np.bool_ or mask.shape != (self.num_train,):
            raise InputError(f"keep must be a boolean mask of shape ({self.num_train},)")
        ids = None
        if self.patient_ids_train is not None:
            ids = tuple(i for i, k in zip(self.patient_ids_train, mask.tolist(), strict=True) if k)
        return TabularDataset(
            name=self.name,
            X_train=self.X_train[mask],
            y_train=self.y_train[mask],
            X_test=self.X_test,
            y_test=self.y_test,
            feature_names=self.feature_names,
            patient_ids_train=ids,
        )


def dataset_fingerprint(
    arrays: dict[str, np.ndarray], feature_names: tuple[str, ...], patient_ids: tuple[str, ...] | None
) -> str:
    """sha256 over: an 8-byte length, a canonical-JSON header (format, names, ids, each array's dtype and
    shape), then each array's little-endian C-order bytes in a fixed order (float64 X, int64 y)."""
    order = ("X_train", "y_train", "X_test", "y_test")
    encoded = []
    for key in order:
        arr = arrays[key]
        dtype = "<f8" if key.startswith("X") else "<i8"
        encoded.append((key, dtype, np.ascontiguousarray(arr, dtype=dtype)))
    header = canonical_json(
        {
            "format": _FINGERPRINT_FORMAT,
            "feature_names": list(feature_names),
            "patient_ids_train": list(patient_ids) if patient_ids is not None else None,
            "arrays": [{"name": k, "dtype": dt, "shape": list(a.shape)} for k, dt, a in encoded],
        }
    )
    h = hashlib.sha256()
    h.update(len(header).to_bytes(8, "little"))
    h.update(header)
    for _, _, arr in encoded:
        h.update(arr.tobytes())
    return h.hexdigest()


def split_indices(
    labels: np.ndarray, *, test_size: float, random_state: int, train_size: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's split: sklearn ``train_test_split`` of the row indices, stratified on the label when both
    classes have more than two rows, else a plain shuffled split. ``test_size`` (and ``train_size``, which
    FLamby also passes) are fractions; ``test_size == 0`` keeps every row for training.

    Returns sorted index arrays (train, test), so each part keeps the file's row order.
    """
    n = labels.shape[0]
    if test_size == 0:
        return np.arange(n), np.arange(0)
    levels, counts = np.unique(labels, return_counts=True)
    stratify = labels if levels.size > 1 and bool((counts > 2).all()) else None
    try:
        from sklearn.model_selection import train_test_split  # scikit-learn loads slowly: on first use

        train_idx, test_idx = train_test_split(
            np.arange(n),
            test_size=test_size,
            train_size=train_size,
            random_state=random_state,
            shuffle=True,
            stratify=stratify,
        )
    except ValueError as exc:  # sklearn's complaint about sizes, translated at this boundary
        raise InputError(f"cannot split {n} rows with test fraction {test_size}: {exc}") from exc
    return np.sort(train_idx), np.sort(test_idx)


def standardize(X_train: np.ndarray, X_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both parts by the training part's mean and std (ddof=1) plus ``STD_EPSILON``, as FLamby does."""
    if X_train.shape[0] < 2:
        raise InputError("standardization needs at least two training rows")
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0, ddof=1) + STD_EPSILON
    return (X_train - mean) / std, (X_test - mean) / std
