"""A data-free model of any size, for transport and secure-aggregation benchmarks.

"Training" adds a small random change, so the delta has the size and the statistics of a real update while
costing almost nothing to compute.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedhealth.core import InputError
from fedhealth.learning._checks import check_tensors
from fedhealth.learning._results import TrainResult

# the scale of a synthetic update: about the size of one SGD round's change of a small model
SYNTHETIC_STEP_SCALE = 1e-3


def synthetic_init(n_params: int, seed: int) -> dict[str, np.ndarray]:
    """``{"weight": (n_params,)}`` float32, standard normal times 0.01, determined by ``seed``."""
    if n_params < 1:
        raise InputError(f"n_params must be positive, got {n_params}")
    rng = np.random.default_rng(seed)
    return {"weight": (rng.standard_normal(n_params, dtype=np.float32) * np.float32(0.01))}


def synthetic_train(
    params: Mapping[str, np.ndarray], rng: np.random.Generator, *, num_samples: int = 1
) -> TrainResult:
    """Local "training": ``weight + N(0, SYNTHETIC_STEP_SCALE^2)``, in float32 (the point is speed)."""
    weight = params.get("weight")
    if weight is None or not isinstance(weight, np.ndarray) or weight.ndim != 1:
        raise InputError("synthetic params must be {'weight': 1-D array}")
    check_tensors("synthetic params", params, {"weight": weight.shape})
    local: np.ndarray = np.asarray(rng.standard_normal(weight.shape[0], dtype=np.float32))
    local *= np.float32(SYNTHETIC_STEP_SCALE)
    local += weight.astype(np.float32, copy=False)
    return TrainResult(params={"weight": local}, num_samples=num_samples, train_loss=0.0, steps=1)
