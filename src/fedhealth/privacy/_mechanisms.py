"""Clipping, Gaussian noise, Poisson sampling, and site-level DP for model updates.

Randomness is always a ``numpy.random.Generator`` passed in. Production code passes
:func:`secure_generator` (seeded from ``os.urandom``, never from a caller's seed); tests pass a fixed one.
Caveat shared with Opacus and TF Privacy: noise is sampled in floating point, which leaks in theory (Mironov
2012 for Laplace; Jin et al. 2022 for Gaussian); a discrete Gaussian would close that gap.

Site-level DP protects a whole site's contribution to one round. Each site clips its update to L2 norm
``C``; the sum then moves by at most ``C`` when one site is added or removed, and Gaussian noise of standard
deviation ``sigma * C`` on the sum makes each round a Gaussian release at noise multiplier ``sigma``.

- :attr:`NoiseMode.CENTRAL`: sites only clip; the orchestrator adds ``N(0, sigma^2 C^2)`` to the aggregate
  (:meth:`SiteUpdateDp.central_noise`). The orchestrator sees the un-noised sum: it is trusted to add noise.
- :attr:`NoiseMode.DISTRIBUTED`: each site adds a share, so the secure sum carries the noise and no party ever
  sees an un-noised sum. Shares are calibrated on the minimum quorum ``m`` (each site adds
  ``N(0, sigma^2 C^2 / m)``): with ``k >= m`` survivors the sum carries ``k / m >= 1`` times the required
  variance, so the accounted noise multiplier ``sigma`` holds whatever the dropouts down to ``m``. Below the
  quorum the round must not be released (the secure aggregation refuses to unmask there). Sites that collude
  with the orchestrator can subtract their own shares; tolerate ``t`` colluders by choosing ``min_quorum`` as
  ``m - t``.

Record-level reading of the same noise: one patient changes only their own site's clipped update, which can
move anywhere in the ball of radius ``C``, so by up to ``2 C``. For a site's ledger (whose budget is about
patients) a round of site-level noise therefore counts as a Gaussian release at ``sigma / 2``
(:meth:`SiteUpdateDp.record_level_release`), unless record-level DP-SGD is already accounted for that update.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from fedhealth.privacy._accounting import GaussianRelease, check_sample_rate
from fedhealth.privacy._errors import DpParameterError

Array = NDArray[np.floating]


def secure_generator() -> np.random.Generator:
    """A generator seeded with 256 bits from ``os.urandom``: the one to use for real noise."""
    return np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(int.from_bytes(os.urandom(32)))))


def _check_norm(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise DpParameterError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_std(std: float) -> float:
    if not (math.isfinite(std) and std >= 0):
        raise DpParameterError(f"noise standard deviation must be a non-negative number, got {std!r}")
    return float(std)


def clip_by_l2_norm(vector: Array, max_norm: float) -> Array:
    """``vector`` scaled down, if needed, so that its L2 norm (over all entries) is at most ``max_norm``."""
    max_norm = _check_norm("max norm", max_norm)
    norm = float(np.linalg.norm(vector.ravel()))
    if not math.isfinite(norm):
        raise DpParameterError("cannot clip a vector holding NaN or infinite values")
    return vector * min(1.0, max_norm / norm) if norm > 0 else vector.copy()


def clip_per_example(gradients: Array, max_norm: float) -> tuple[Array, NDArray[np.float64]]:
    """Each row of the ``(n, d)`` matrix clipped to L2 norm ``max_norm``; also the rows' original norms."""
    max_norm = _check_norm("max norm", max_norm)
    if gradients.ndim != 2:
        raise DpParameterError(f"per-example gradients must be a 2-D matrix, got shape {gradients.shape}")
    norms = np.linalg.norm(gradients, axis=1).astype(np.float64)
    if not np.isfinite(norms).all():
        raise DpParameterError("cannot clip gradients holding NaN or infinite values")
    scale = np.minimum(1.0, max_norm / np.maximum(norms, np.finfo(np.float64).tiny))
    return gradients * scale[:, None], norms


def gaussian_noise(shape: tuple[int, ...], std: float, rng: np.random.Generator) -> NDArray[np.float64]:
    """Independent ``N(0, std^2)`` entries (float64)."""
    return rng.normal(0.0, _check_std(std), size=shape)


def poisson_sample(n: int, sample_rate: float, rng: np.random.Generator) -> NDArray[np.int64]:
    """Indices of a Poisson sample of ``range(n)``: each index independently with probability ``sample_rate``.

    The batch size is random (and may be 0); that is what the accountant's ``PoissonSampledDpEvent`` assumes.
    """
    if n < 0:
        raise DpParameterError(f"population size must not be negative, got {n}")
    sample_rate = check_sample_rate(sample_rate)
    return np.flatnonzero(rng.random(n) < sample_rate).astype(np.int64)


def global_l2_norm(tensors: Mapping[str, Array]) -> float:
    """The L2 norm of all tensors taken as one vector."""
    return math.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in tensors.values()))


class NoiseMode(StrEnum):
    """Who adds the site-level noise."""

    CENTRAL = "central"
    DISTRIBUTED = "distributed"


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteUpdateDp:
    """Site-level DP for model updates: clip each site's update, add Gaussian noise to the sum.

    ``noise_multiplier`` is the guaranteed ratio of the noise on the sum to the clip norm; ``num_sites`` is
    how many sites are asked to contribute and ``min_quorum`` the fewest whose sum may be released.
    """

    clip_norm: float
    noise_multiplier: float
    mode: NoiseMode
    num_sites: int = 1
    min_quorum: int = 1

    def __post_init__(self) -> None:
        _check_norm("clip norm", self.clip_norm)
        _check_norm("noise multiplier", self.noise_multiplier)
        object.__setattr__(self, "mode", NoiseMode(self.mode))
        if not 1 <= self.min_quorum <= self.num_sites:
            raise DpParameterError(
                f"need 1 <= min_quorum <= num_sites, "
                f"got min_quorum {self.min_quorum}, num_sites {self.num_sites}"
            )

    @property
    def sum_noise_std(self) -> float:
        """The standard deviation the released sum must carry: ``noise_multiplier * clip_norm``."""
        return self.noise_multiplier * self.clip_norm

    @property
    def site_noise_std(self) -> float:
        """What each site adds: 0 in central mode, the quorum-calibrated share in distributed mode."""
        if self.mode is NoiseMode.CENTRAL:
            return 0.0
        return self.sum_noise_std / math.sqrt(self.min_quorum)

    def clip(self, update: Mapping[str, Array]) -> tuple[dict[str, Array], float]:
        """The update scaled so that its global L2 norm is at most ``clip_norm``; also its original norm."""
        norm = global_l2_norm(update)
        if not math.isfinite(norm):
            raise DpParameterError("cannot clip an update holding NaN or infinite values")
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        return {k: (v * scale).astype(v.dtype, copy=False) for k, v in update.items()}, norm

    def privatize(self, update: Mapping[str, Array], rng: np.random.Generator) -> dict[str, Array]:
        """What a site sends: its clipped update, plus its noise share in distributed mode (dtypes kept)."""
        clipped, _ = self.clip(update)
        std = self.site_noise_std
        if std == 0:
            return clipped
        return {k: (v + gaussian_noise(v.shape, std, rng)).astype(v.dtype) for k, v in clipped.items()}

    def central_noise(self, aggregate: Mapping[str, Array], rng: np.random.Generator) -> dict[str, Array]:
        """Central mode, at the orchestrator: the sum of clipped updates plus ``N(0, sigma^2 C^2)``."""
        if self.mode is not NoiseMode.CENTRAL:
            raise DpParameterError(
                "central noise is only added in central mode; in distributed mode sites add it"
            )
        std = self.sum_noise_std
        return {k: (v + gaussian_noise(v.shape, std, rng)).astype(v.dtype) for k, v in aggregate.items()}

    def site_level_release(self, rounds: int = 1) -> GaussianRelease:
        """The study's guarantee for a whole site (add or remove one site's update): sensitivity ``C``."""
        return GaussianRelease(noise_multiplier=self.noise_multiplier, count=rounds)

    def record_level_release(self, rounds: int = 1) -> GaussianRelease:
        """What a site's ledger charges for its patients.

        One patient moves the site's clipped update by up to ``2 C``, so the noise multiplier halves. When
        the same update is also trained with DP-SGD, that release already covers the patients (the
        site-level noise is post-processing) and this one need not be charged as well.
        """
        return GaussianRelease(noise_multiplier=self.noise_multiplier / 2, count=rounds)
