"""DP-SGD for the logistic-regression recipe, with exact per-example gradients in closed form.

For one record ``(x, y)`` with ``y`` in {0, 1}, the binary cross-entropy of ``p = sigmoid(x . w + b)`` has
gradient ``(p - y) * x`` with respect to ``w`` and ``p - y`` with respect to ``b``: no autograd and no
approximation, so the per-example clipping bounds each record's influence exactly. Each step draws a Poisson
sample at ``sample_rate``, clips every per-example gradient (over ``[w, b]`` jointly) to ``max_grad_norm``,
sums, adds ``N(0, (noise_multiplier * max_grad_norm)^2)``, divides by the expected batch size
``sample_rate * N``, adds the (data-independent) L2 penalty gradient ``l2 * w``, and takes a plain SGD step.
The whole run is :class:`~fedhealth.privacy.DpSgdRelease` ``(noise_multiplier, sample_rate, steps)``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from fedhealth.core import InputError, check_deadline
from fedhealth.learning._logreg import logreg_per_example_gradients
from fedhealth.privacy import (
    DpParameterError,
    DpSgdRelease,
    DpSgdReport,
    noisy_clipped_sum,
    poisson_sample,
)

Params = dict[str, NDArray[np.float32]]


def _stacked_gradients(
    weight: NDArray[np.floating], bias: NDArray[np.floating], X: NDArray[np.floating], y: NDArray[np.floating]
) -> NDArray[np.float64]:
    """Row ``i`` is the gradient of record ``i``'s cross-entropy with respect to ``[weight..., bias]``."""
    grads = logreg_per_example_gradients({"weight": weight, "bias": bias}, X, y)
    return np.hstack([grads["weight"], grads["bias"]])


def _check_inputs(params: Params, X: NDArray[np.floating], y: NDArray[np.floating]) -> int:
    if set(params) != {"weight", "bias"}:
        raise InputError(f"logistic regression parameters are 'weight' and 'bias', got {sorted(params)}")
    weight, bias = params["weight"], params["bias"]
    if weight.ndim != 1 or bias.shape != (1,):
        raise InputError(f"expected weight of shape (d,) and bias (1,), got {weight.shape} and {bias.shape}")
    if X.ndim != 2 or X.shape[1] != weight.shape[0]:
        raise InputError(f"features must have shape (n, {weight.shape[0]}), got {X.shape}")
    if y.shape != (X.shape[0],):
        raise InputError(f"labels must have shape ({X.shape[0]},), got {y.shape}")
    if X.shape[0] == 0:
        raise InputError("cannot train on an empty dataset")
    if not (np.isfinite(X).all() and np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise InputError("features and parameters must be finite")
    if not np.isin(y, (0, 1)).all():
        raise InputError("labels must be 0 or 1")
    return int(X.shape[0])


def logreg_train_dp(
    params: Params,
    X: NDArray[np.floating],
    y: NDArray[np.floating],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    learning_rate: float,
    l2: float = 0.0,
    rng: np.random.Generator,
) -> tuple[Params, DpSgdReport]:
    """Train ``{"weight": (d,), "bias": (1,)}`` with DP-SGD; return float32 parameters and the run's report.

    ``rng`` draws both the samples and the noise: pass :func:`fedhealth.privacy.secure_generator` in
    production. ``noise_multiplier`` 0 is allowed (for tests); its release then has infinite epsilon.
    """
    n = _check_inputs(params, X, y)
    release = DpSgdRelease(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise DpParameterError(f"max grad norm must be a positive number, got {max_grad_norm!r}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise DpParameterError(f"learning rate must be a positive number, got {learning_rate!r}")
    if not (math.isfinite(l2) and l2 >= 0):
        raise DpParameterError(f"l2 must be a non-negative number, got {l2!r}")

    X64 = np.asarray(X, dtype=np.float64)
    y64 = np.asarray(y, dtype=np.float64)
    d = X64.shape[1]
    theta = np.concatenate([params["weight"].astype(np.float64), params["bias"].astype(np.float64)])
    expected_batch = release.sample_rate * n
    batch_total = 0
    clipped_total = 0
    for _ in range(release.steps):
        check_deadline()  # past the round's deadline no update is taken: stop (core/_deadline.py)
        batch = poisson_sample(n, release.sample_rate, rng)
        grads = _stacked_gradients(theta[:d], theta[d:], X64[batch], y64[batch])
        noisy_sum, clipped = noisy_clipped_sum(
            grads, max_grad_norm=max_grad_norm, noise_multiplier=release.noise_multiplier, rng=rng
        )
        step = noisy_sum / expected_batch
        step[:d] += l2 * theta[:d]
        theta -= learning_rate * step
        batch_total += batch.size
        clipped_total += clipped
    new_params: Params = {
        "weight": theta[:d].astype(np.float32),
        "bias": theta[d:].astype(np.float32),
    }
    report = DpSgdReport(
        release=release,
        max_grad_norm=float(max_grad_norm),
        mean_batch_size=batch_total / release.steps,
        clipped_fraction=clipped_total / batch_total if batch_total else 0.0,
    )
    return new_params, report
