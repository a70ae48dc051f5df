"""What a recipe returns: the outcome of one round of local training, and of one evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    """Local parameters after training (float32), the training-set size (the aggregation weight), the mean
    data loss over the examples seen this round (None when it may not be reported: under DP-SGD it would be
    computed from the training records without noise), and the number of optimizer steps taken.

    ``site_state``: for a recipe declaring ``site_state``, what the site keeps for its next round of this
    study (SCAFFOLD's client control variate c_i); it never leaves the site. None: nothing to keep."""

    params: dict[str, np.ndarray]
    num_samples: int
    train_loss: float | None
    steps: int
    site_state: dict[str, np.ndarray] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalResult:
    """Metrics of a model on one labelled set. ``auc`` is None when the set holds a single class."""

    num_samples: int
    loss: float
    accuracy: float
    auc: float | None
