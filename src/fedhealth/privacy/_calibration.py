"""Noise calibration: the smallest noise multiplier whose accounted epsilon does not exceed a target.

Epsilon decreases as the noise multiplier grows, so a bisection finds the boundary. The search is geometric
(on log sigma) and stops when the bracket ``[lo, hi]`` is within a relative tolerance ``rel_tol``; it returns
``hi``, a value whose epsilon was *computed* and found within the target. So the answer never overshoots the
target, whatever the accountant's rounding, and ``hi / (1 + rel_tol)`` already exceeds it (up to the
accountant's own monotonicity). The search uses the very accountant and settings the ledger uses, so a study
calibrated to a site's whole budget passes that site's check.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fedhealth.privacy._accounting import (
    AccountantKind,
    DpSgdRelease,
    check_delta,
    check_sample_rate,
    epsilon,
)
from fedhealth.privacy._errors import CalibrationError, DpParameterError

MIN_NOISE_MULTIPLIER = 0.05
MAX_NOISE_MULTIPLIER = 1e4
DEFAULT_REL_TOL = 1e-3


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantKind = AccountantKind.PLD,
    *,
    rel_tol: float = DEFAULT_REL_TOL,
) -> float:
    """The smallest noise multiplier (within ``rel_tol``, relative) for DP-SGD at ``target_epsilon``.

    ``sample_rate`` 1 calibrates the plain Gaussian mechanism composed ``steps`` times (site-level noise).
    A target loose enough that :data:`MIN_NOISE_MULTIPLIER` meets it returns that floor; a target that even
    :data:`MAX_NOISE_MULTIPLIER` cannot meet raises :class:`CalibrationError`.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, int | float):
        raise DpParameterError(f"target epsilon must be a number, got {target_epsilon!r}")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise DpParameterError(f"target epsilon must be a positive number, got {target_epsilon!r}")
    if not (math.isfinite(rel_tol) and 0 < rel_tol < 1):
        raise DpParameterError(f"relative tolerance must lie in (0, 1), got {rel_tol!r}")
    delta = check_delta(delta)
    sample_rate = check_sample_rate(sample_rate)
    # Validates steps the same way a release does.
    DpSgdRelease(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps)
    kind = AccountantKind(accountant)

    log_target = math.log(target_epsilon)
    lower, upper = math.log(MIN_NOISE_MULTIPLIER), math.log(MAX_NOISE_MULTIPLIER)

    def sigma_at(log_sigma: float) -> float:
        # The bounds exactly: exp(log(0.05)) is not 0.05.
        if log_sigma <= lower:
            return MIN_NOISE_MULTIPLIER
        return MAX_NOISE_MULTIPLIER if log_sigma >= upper else math.exp(log_sigma)

    def excess(log_sigma: float) -> float:
        """log(epsilon / target): positive when sigma is too small; decreasing in sigma."""
        release = DpSgdRelease(noise_multiplier=sigma_at(log_sigma), sample_rate=sample_rate, steps=steps)
        eps = epsilon(release, delta=delta, accountant=kind)
        return (math.log(eps) if eps > 0 else -math.inf) - log_target

    return sigma_at(
        _smallest_root(
            excess,
            lower=lower,
            upper=upper,
            tol=math.log1p(rel_tol),
            unreachable=lambda: CalibrationError(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon {target_epsilon:g} "
                f"at delta {delta:g} with sample rate {sample_rate:g} over {steps} steps"
            ),
        )
    )


def _smallest_root(
    g: Callable[[float], float],
    *,
    lower: float,
    upper: float,
    tol: float,
    unreachable: Callable[[], Exception],
) -> float:
    """The smallest ``x`` in ``[lower, upper]`` with ``g(x) <= 0``, to within ``tol``, for decreasing ``g``.

    Returns a point where ``g`` was evaluated and found ``<= 0``; ``x - tol`` was found ``> 0`` (or is below
    ``lower``). Each accountant call costs 0.1-0.5 s, so the search is frugal: it brackets the root with
    steps sized by assuming epsilon ~ 1/sigma (so ``g`` has slope about -1 in log-log), then refines it by
    secant steps through the two latest points (bisection when a step leaves the bracket); once a step is
    shorter than ``tol`` it probes just either side of the estimate, which closes the bracket.
    """
    x = 0.0  # sigma = 1
    gx = g(x)
    bad: tuple[float, float] | None = None  # (x, g(x)) with g > 0: too little noise
    good: tuple[float, float] | None = None  # (x, g(x)) with g <= 0: within the target
    while True:
        if gx > 0:
            bad = (x, gx)
        else:
            good = (x, gx)
        if bad is not None and good is not None:
            break
        step = min(max(1.25 * abs(gx), 0.05), math.log(4)) if math.isfinite(gx) else math.log(4)
        if gx > 0:
            if x >= upper:
                raise unreachable()
            x = min(x + step, upper)
        else:
            if x <= lower:
                return lower
            x = max(x - step, lower)
        gx = g(x)
    a, b = bad[0], good[0]
    recent = [bad, good] if bad[0] < good[0] else [good, bad]  # the two latest points, oldest first
    while b - a > tol:
        (x1, g1), (x2, g2) = recent
        c = x2 - g2 * (x2 - x1) / (g2 - g1) if math.isfinite(g1 - g2) and g1 != g2 else math.nan
        if not a < c < b:
            c = (a + b) / 2
        # A secant step shorter than tol means the estimate is sharp: close the bracket around it.
        probes = [c + 0.45 * tol, c - 0.45 * tol] if abs(c - x2) < tol else [c]
        for p in probes:
            if not a < p < b or b - a <= tol:
                continue
            gp = g(p)
            if gp > 0:
                a = p
            else:
                b = p
            recent = [recent[1], (p, gp)]
    return b
