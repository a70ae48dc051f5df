"""The in-memory form of a tabular dataset, its fingerprint, and the split and scaling every loader shares."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum

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
class Scaling:
    """The training part's per-feature mean and std (plus ``STD_EPSILON``) that both parts were
    standardized with: kept so that the same rows can be re-standardized on a subset of the patients."""

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _frozen(np.asarray(self.mean, dtype=np.float64)))
        object.__setattr__(self, "std", _frozen(np.asarray(self.std, dtype=np.float64)))
        if self.mean.ndim != 1 or self.std.shape != self.mean.shape:
            raise InputError("a scaling is one mean and one std per feature")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all() and (self.std > 0).all()):
            raise InputError("a scaling's means must be finite and its stds positive")

    def apply(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.std


class FillRule(StrEnum):
    """How a feature's missing cells were filled from the training part (a statistic to compute again when
    rows are dropped; a constant fill needs no such record)."""

    MEAN = "mean"
    MEDIAN = "median"


@dataclass(frozen=True, slots=True, kw_only=True)
class Imputation:
    """The features whose missing cells were filled with a statistic of the training part: their indices,
    rules, and where the cells were missing (boolean, rows by ``features``), so that
    :meth:`TabularDataset.select` can fill them again from the patients kept."""

    features: tuple[int, ...]
    rules: tuple[FillRule, ...]
    missing_train: np.ndarray
    missing_test: np.ndarray

    def __post_init__(self) -> None:
        k = len(self.features)
        if len(self.rules) != k:
            raise InputError("an imputation needs one rule per feature it fills")
        for name in ("missing_train", "missing_test"):
            mask = np.asarray(getattr(self, name))
            if mask.dtype != np.bool_ or mask.ndim != 2 or mask.shape[1] != k:
                raise InputError(f"an imputation's {name} must be boolean of shape (rows, {k})")
            object.__setattr__(self, name, _frozen(mask))

    def refill(self, X_train: np.ndarray, X_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both parts (unscaled) with the missing cells filled again from the training rows given."""
        X_train, X_test = X_train.copy(), X_test.copy()
        for j, (feature, rule) in enumerate(zip(self.features, self.rules, strict=True)):
            observed = X_train[~self.missing_train[:, j], feature]
            if observed.size == 0:
                raise InputError(f"feature {feature}: no training row left has a value to fill from")
            fill = float(np.mean(observed)) if rule is FillRule.MEAN else float(np.median(observed))
            X_train[self.missing_train[:, j], feature] = fill
            X_test[self.missing_test[:, j], feature] = fill
        return X_train, X_test

    def select(self, keep_train: np.ndarray, keep_test: np.ndarray) -> Imputation:
        return Imputation(
            features=self.features,
            rules=self.rules,
            missing_train=self.missing_train[keep_train],
            missing_test=self.missing_test[keep_test],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TabularDataset:
    """One site's data, split into train and test: float64 features, int64 labels in {0, 1} (or, with
    ``classes = K``, in {0, ..., K - 1}: a multi-class label, as a triage level).

    The arrays are copied and made read-only, so a dataset cannot change under its fingerprint.
    ``patient_ids_train`` and ``patient_ids_test`` are pseudonymous ids of the rows of each part (for consent
    filtering: a patient's consent governs training and evaluation alike); unique if given. ``scaling`` is
    the training part's statistics the features were standardized with, if they were (see :meth:`select`);
    ``imputation`` records the features whose missing cells hold a statistic of the training part.
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
    patient_ids_test: tuple[str, ...] | None = None
    scaling: Scaling | None = None
    imputation: Imputation | None = None
    time_train: np.ndarray | None = None
    time_test: np.ndarray | None = None
    classes: int = 2
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(self.feature_names)
        if len(set(names)) != len(names):
            raise InputError(f"dataset {self.name!r}: feature names are not unique")
        d = len(names)
        k = self.classes
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 256:
            raise InputError(f"dataset {self.name!r}: classes must be an integer from 2 to 256")
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
            if not np.isin(y, np.arange(k)).all():
                labels = "0 and 1" if k == 2 else f"0 to {k - 1} (classes={k})"
                raise InputError(f"dataset {self.name!r}: y_{part} must hold only the labels {labels}")
            arrays[f"X_{part}"] = _frozen(X64)
            arrays[f"y_{part}"] = _frozen(y.astype(np.int64))
        if (self.time_train is None) != (self.time_test is None):
            raise InputError(f"dataset {self.name!r}: survival times are given for one part only")
        if self.time_train is not None:
            for part in ("train", "test"):
                t = np.asarray(getattr(self, f"time_{part}"), dtype=np.float64)
                if t.shape != arrays[f"y_{part}"].shape:
                    raise InputError(
                        f"dataset {self.name!r}: time_{part} must have one value per row, got {t.shape}"
                    )
                if not (np.isfinite(t).all() and (t > 0).all()):
                    raise InputError(
                        f"dataset {self.name!r}: time_{part} must hold finite positive survival times"
                    )
                arrays[f"time_{part}"] = _frozen(t + 0.0)
        ids = self._ids("train", self.patient_ids_train, arrays["X_train"].shape[0])
        test_ids = self._ids("test", self.patient_ids_test, arrays["X_test"].shape[0])
        if self.scaling is not None and self.scaling.mean.shape != (d,):
            raise InputError(f"dataset {self.name!r}: its scaling is not over its {d} features")
        if self.imputation is not None and (
            self.imputation.missing_train.shape[0] != arrays["X_train"].shape[0]
            or self.imputation.missing_test.shape[0] != arrays["X_test"].shape[0]
            or not all(0 <= f < d for f in self.imputation.features)
        ):
            raise InputError(f"dataset {self.name!r}: its imputation does not fit its rows and features")
        for key, value in arrays.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "feature_names", names)
        object.__setattr__(self, "patient_ids_train", ids)
        object.__setattr__(self, "patient_ids_test", test_ids)
        object.__setattr__(
            self, "fingerprint", dataset_fingerprint(arrays, names, ids, test_ids, classes=self.classes)
        )

    def _ids(self, part: str, given: tuple[str, ...] | None, rows: int) -> tuple[str, ...] | None:
        if given is None:
            return None
        ids = tuple(str(i) for i in given)
        if len(ids) != rows:
            raise InputError(f"dataset {self.name!r}: {len(ids)} patient ids for {rows} {part} rows")
        if len(set(ids)) != len(ids):
            raise InputError(f"dataset {self.name!r}: {part} patient ids are not unique")
        return ids

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
        """A copy holding only the training rows where the boolean mask ``keep`` is true (test rows kept);
        see :meth:`select`."""
        return self.select(keep, np.ones(self.num_test, dtype=np.bool_))

    def select(self, train: np.ndarray, test: np.ndarray) -> TabularDataset:
        """A copy holding only the rows where the boolean masks are true, e.g. the patients whose consent
        covers a study. If the features were standardized (``scaling``) and training rows are dropped, both
        parts are standardized again with the kept training rows' statistics: a statistic computed on the
        patients left out would otherwise still shape what the study computes. Missing cells filled with a
        mean or median of the training part are filled again from the kept training rows, for the same
        reason."""
        keep_train = _mask(train, self.num_train, "train")
        keep_test = _mask(test, self.num_test, "test")
        X_train, X_test = self.X_train[keep_train], self.X_test[keep_test]
        scaling = self.scaling
        imputation = self.imputation.select(keep_train, keep_test) if self.imputation is not None else None
        times = (
            {"time_train": self.time_train[keep_train], "time_test": self.time_test[keep_test]}
            if self.time_train is not None and self.time_test is not None
            else {}
        )
        if not keep_train.all() and (scaling is not None or imputation is not None):
            raw_train, raw_test = X_train, X_test
            if scaling is not None:
                raw_train = X_train * scaling.std + scaling.mean
                raw_test = X_test * scaling.std + scaling.mean
            if imputation is not None:
                raw_train, raw_test = imputation.refill(raw_train, raw_test)
            X_train, X_test = raw_train, raw_test
            if scaling is not None:
                scaling = fit_scaling(raw_train)
                X_train, X_test = scaling.apply(raw_train), scaling.apply(raw_test)
        return TabularDataset(
            name=self.name,
            X_train=X_train,
            y_train=self.y_train[keep_train],
            X_test=X_test,
            y_test=self.y_test[keep_test],
            feature_names=self.feature_names,
            patient_ids_train=_kept(self.patient_ids_train, keep_train),
            patient_ids_test=_kept(self.patient_ids_test, keep_test),
            scaling=scaling,
            imputation=imputation,
            classes=self.classes,
            **times,
        )

    @property
    def survival(self) -> bool:
        """Whether the rows carry survival times (``time_train``/``time_test``; ``y`` is then the event
        indicator: 1 the event was observed at that time, 0 the row was censored then)."""
        return self.time_train is not None


def _mask(keep: np.ndarray, rows: int, part: str) -> np.ndarray:
    mask = np.asarray(keep)
    if mask.dtype != np.bool_ or mask.shape != (rows,):
        raise InputError(f"the {part} mask must be boolean of shape ({rows},)")
    return mask


def _kept(ids: tuple[str, ...] | None, mask: np.ndarray) -> tuple[str, ...] | None:
    return None if ids is None else tuple(i for i, k in zip(ids, mask.tolist(), strict=True) if k)


def dataset_fingerprint(
    arrays: dict[str, np.ndarray],
    feature_names: tuple[str, ...],
    patient_ids: tuple[str, ...] | None,
    test_patient_ids: tuple[str, ...] | None = None,
    *,
    classes: int = 2,
) -> str:
    """sha256 over: an 8-byte length, a canonical-JSON header (format, names, ids, each array's dtype and
    shape), then each array's little-endian C-order bytes in a fixed order (float64 X, int64 y, float64
    survival times). The test part's ids, the survival times and a number of label classes other than 2
    enter only when given (earlier fingerprints stay valid)."""
    order = ("X_train", "y_train", "X_test", "y_test", "time_train", "time_test")
    encoded = []
    for key in order:
        if key not in arrays:
            continue
        arr = arrays[key]
        dtype = "<i8" if key.startswith("y") else "<f8"
        encoded.append((key, dtype, np.ascontiguousarray(arr, dtype=dtype)))
    fields: dict[str, object] = {
        "format": _FINGERPRINT_FORMAT,
        "feature_names": list(feature_names),
        "patient_ids_train": list(patient_ids) if patient_ids is not None else None,
        "arrays": [{"name": k, "dtype": dt, "shape": list(a.shape)} for k, dt, a in encoded],
    }
    if test_patient_ids is not None:
        fields["patient_ids_test"] = list(test_patient_ids)
    if classes != 2:
        fields["classes"] = classes
    header = canonical_json(fields)
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


def fit_scaling(X_train: np.ndarray) -> Scaling:
    """The training part's mean and std (ddof=1) plus ``STD_EPSILON``, as FLamby computes them."""
    if X_train.shape[0] < 2:
        raise InputError("standardization needs at least two training rows")
    return Scaling(mean=X_train.mean(axis=0), std=X_train.std(axis=0, ddof=1) + STD_EPSILON)


def standardize(X_train: np.ndarray, X_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both parts by the training part's mean and std (ddof=1) plus ``STD_EPSILON``, as FLamby does."""
    scaling = fit_scaling(X_train)
    return scaling.apply(X_train), scaling.apply(X_test)
