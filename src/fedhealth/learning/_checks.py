"""Input checks shared by recipes and strategies: names, shapes and finiteness of parameter dicts."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedhealth.core import InputError, TensorError


def check_tensors(
    what: str, tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Raise :class:`TensorError` unless ``tensors`` has exactly the names and shapes of ``shapes``,
    all finite."""
    missing = sorted(shapes.keys() - tensors.keys())
    extra = sorted(tensors.keys() - shapes.keys())
    if missing or extra:
        raise TensorError(f"{what}: tensor names do not match: missing {missing}, unexpected {extra}")
    for name, shape in shapes.items():
        arr = tensors[name]
        if not isinstance(arr, np.ndarray):
            raise TensorError(f"{what}: tensor {name!r} is a {type(arr).__name__}, not a numpy array")
        if arr.shape != shape:
            raise TensorError(f"{what}: tensor {name!r} has shape {arr.shape}, expected {shape}")
        if arr.dtype.kind != "f":
            raise TensorError(f"{what}: tensor {name!r} has dtype {arr.dtype}, expected a float dtype")
        if not np.isfinite(arr).all():
            raise TensorError(f"{what}: tensor {name!r} holds NaN or infinite values")


def check_features_labels(X: np.ndarray, y: np.ndarray, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a design matrix and binary labels; return them as float64 arrays."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[1] != n_features:
        raise InputError(f"X must have shape (rows, {n_features}), got {X.shape}")
    if y.shape != (X.shape[0],):
        raise InputError(f"y must have shape ({X.shape[0]},) to match X, got {y.shape}")
    if X.dtype.kind not in "fiub" or y.dtype.kind not in "fiub":
        raise InputError(f"X and y must be numeric, got dtypes {X.dtype} and {y.dtype}")
    X64 = X.astype(np.float64, copy=False)
    y64 = y.astype(np.float64, copy=False)
    if not np.isfinite(X64).all():
        raise InputError("X holds NaN or infinite values")
    if not np.isin(y64, (0.0, 1.0)).all():
        raise InputError("y must hold only the labels 0 and 1")
    return X64, y64
