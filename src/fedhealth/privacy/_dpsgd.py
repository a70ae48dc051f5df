"""DP-SGD building blocks shared by every trainer (numpy logistic regression now, an Opacus wrapper later).

One DP-SGD step: draw a Poisson sample of the records, compute one gradient per sampled record, clip each to
L2 norm ``C``, sum, add ``N(0, sigma^2 C^2)`` to every coordinate, and divide by the *expected* batch size
``q N`` (the actual batch size depends on the data, so it must not scale the update). ``steps`` such steps are
:class:`~fedhealth.privacy.DpSgdRelease` ``(sigma, q, steps)`` for the accountant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedhealth.privacy._accounting import DpSgdRelease
from fedhealth.privacy._errors import DpParameterError
from fedhealth.privacy._mechanisms import RandomSource, clip_per_example, gaussian_noise, snap


@dataclass(frozen=True, slots=True, kw_only=True)
class DpSgdReport:
    """What a DP-SGD run spent (``release``, for the ledger) and how it went (for the site's own logs).

    ``mean_batch_size`` and ``clipped_fraction`` are computed from the data without noise: they must stay at
    the site and never be sent to the orchestrator.
    """

    release: DpSgdRelease
    max_grad_norm: float
    mean_batch_size: float
    clipped_fraction: float


def noisy_clipped_sum(
    per_example_gradients: NDArray[np.floating] | Iterable[NDArray[np.floating]],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    rng: RandomSource,
) -> tuple[NDArray[np.float64], int]:
    """The sum of the rows clipped to ``max_grad_norm``, plus Gaussian noise, snapped to a grid below the
    noise's scale (the floating-point mitigation of ``_mechanisms``); and how many rows were clipped.

    ``per_example_gradients`` has shape ``(batch, d)``, or comes as consecutive blocks of its rows (arrays of
    shape ``(rows, d)``, e.g. a generator computing them a few examples at a time, so that a large model's
    whole matrix is never in memory); an empty batch (shape ``(0, d)``) still gets noise.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise DpParameterError(f"noise multiplier must be a non-negative number, got {noise_multiplier!r}")
    blocks = (
        [per_example_gradients] if isinstance(per_example_gradients, np.ndarray) else per_example_gradients
    )
    total: NDArray[np.float64] | None = None
    n_clipped = 0
    for block in blocks:
        clipped, norms = clip_per_example(block, max_grad_norm)
        part = clipped.sum(axis=0, dtype=np.float64)
        if total is not None and part.shape != total.shape:
            raise DpParameterError(
                f"per-example gradient blocks differ in width: {part.shape} after {total.shape}"
            )
        total = part if total is None else total + part
        n_clipped += int(np.count_nonzero(norms > max_grad_norm))
    if total is None:
        raise DpParameterError("no per-example gradients given (an empty batch is one block of shape (0, d))")
    std = noise_multiplier * max_grad_norm
    noisy = snap(total + gaussian_noise(total.shape, std, rng), std)
    return noisy, n_clipped
