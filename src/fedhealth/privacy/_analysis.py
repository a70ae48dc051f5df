"""Closed forms, kept apart from the accountants so they can be checked against published values.

The Gaussian mechanism with L2 sensitivity 1 and noise standard deviation ``sigma``, composed ``count`` times
without sampling, is exactly ``mu``-Gaussian-DP with ``mu = sqrt(count) / sigma`` (Dong, Roth and Su 2019,
Corollary 3.3). Its privacy profile is (Balle and Wang 2018, Theorem 8)::

    delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) * Phi(-eps/mu - mu/2)

which is decreasing in ``eps``; :func:`gaussian_dp_epsilon` inverts it by bisection to adjacent floats.
"""

from __future__ import annotations

import math

from fedhealth.privacy._errors import DpParameterError


def gaussian_mu(noise_multiplier: float, count: int = 1) -> float:
    """The Gaussian-DP parameter of ``count`` Gaussian releases at ``noise_multiplier``."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise DpParameterError(f"noise multiplier must be a positive number, got {noise_multiplier}")
    if count < 1:
        raise DpParameterError(f"count must be at least 1, got {count}")
    return math.sqrt(count) / noise_multiplier


def gaussian_dp_delta(mu: float, epsilon: float) -> float:
    """The smallest delta for which a ``mu``-GDP mechanism is (epsilon, delta)-DP."""
    if not (math.isfinite(mu) and mu > 0):
        raise DpParameterError(f"mu must be a positive number, got {mu}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise DpParameterError(f"epsilon must be a non-negative number, got {epsilon}")
    from scipy import special  # imported on first use: it is slow to load

    # In log space: the second term overflows exp() on its own for large epsilon.
    log_a = float(special.log_ndtr(-epsilon / mu + mu / 2))
    log_b = epsilon + float(special.log_ndtr(-epsilon / mu - mu / 2))
    if log_b >= log_a:
        return 0.0
    return math.exp(log_a) * -math.expm1(log_b - log_a)


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon for which a ``mu``-GDP mechanism is (epsilon, delta)-DP."""
    if not 0 < delta < 1:
        raise DpParameterError(f"delta must lie in (0, 1), got {delta}")
    if gaussian_dp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_dp_delta(mu, hi) > delta:
        lo, hi = hi, hi * 2
    # delta(eps) decreases: bisect down to adjacent floats.
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            return hi
        if gaussian_dp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
