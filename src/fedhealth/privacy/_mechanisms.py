"""Clipping, Gaussian noise, Poisson sampling, and site-level DP for model updates.

Randomness is a :data:`RandomSource` passed in. Production code passes :func:`secure_generator`: a
:class:`SecureRandom`, whose every bit comes from an AES-256-CTR keystream under a key drawn from
``os.urandom`` (a CSPRNG: nobody can predict the noise from outputs they saw, which a statistical generator
such as PCG64DXSM does not promise); tests pass a seeded ``numpy.random.Generator`` so that results can be
reproduced.

Floating-point noise leaks in theory (Mironov 2012 for Laplace; Jin et al. 2022 for Gaussian): the set of
floats an output ``x + noise`` can take depends on ``x`` in its low-order bits. Every noisy value that is
released as it is (a DP-SGD step's noisy sum, the orchestrator's central noise) is therefore *snapped*
(:func:`snap`): rounded to a power-of-two grid ``Lambda`` in (1/16, 1/8] of the noise's standard
deviation, Mironov's remedy, which discards exactly the low-order bits the attack reads. In exact
arithmetic rounding is post-processing, so the accounted epsilon is unchanged; the rounding adds variance
at most ``Lambda^2 / 12``, under 0.1 % of the noise's. Mironov proves his bound for the Laplace mechanism with
``Lambda`` at least the noise scale; no such theorem covers the Gaussian, so this is a mitigation, not a
bound, and docs/privacy.md says so. A discrete Gaussian in the integer domain would be the bound; it is not
implemented.

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
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from statistics import NormalDist

import numpy as np
from numpy.typing import NDArray

from fedhealth.crypto import KeystreamReader
from fedhealth.privacy._accounting import GaussianRelease, check_sample_rate
from fedhealth.privacy._errors import DpParameterError

Array = NDArray[np.floating]


class SecureRandom:
    """Uniform and Gaussian draws from a CSPRNG (an AES-256-CTR keystream under a key from ``os.urandom``),
    with the two methods the mechanisms use from ``numpy.random.Generator``. It takes no seed: real noise
    must not be reproducible by anyone."""

    __slots__ = ("_stream",)

    def __init__(self) -> None:
        self._stream = KeystreamReader()

    def _uint64(self, count: int) -> NDArray[np.uint64]:
        return np.frombuffer(self._stream.read(8 * count), dtype="<u8").astype(np.uint64, copy=False)

    def random(self, size: int | tuple[int, ...] | None = None) -> NDArray[np.float64]:
        """Uniform on [0, 1) with 53 random bits each (every double of the form k / 2**53)."""
        shape = _shape(size)
        count = math.prod(shape)
        return ((self._uint64(count) >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(shape)

    def normal(
        self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None
    ) -> NDArray[np.float64]:
        """Independent ``N(loc, scale^2)`` draws (Box-Muller over the keystream's uniforms)."""
        shape = _shape(size)
        count = math.prod(shape)
        pairs = (count + 1) // 2
        u1 = 1.0 - self.random(pairs)  # in (0, 1]: the logarithm stays finite
        u2 = self.random(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * math.pi * u2
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]
        return (loc + scale * z).reshape(shape)


RandomSource = np.random.Generator | SecureRandom


def _shape(size: int | tuple[int, ...] | None) -> tuple[int, ...]:
    if size is None:
        return ()
    return (size,) if isinstance(size, int) else tuple(size)


def secure_generator() -> SecureRandom:
    """The source for real noise and real sampling: a fresh :class:`SecureRandom` (a CSPRNG)."""
    return SecureRandom()


def snap_grid(std: float) -> float:
    """The snapping grid for noise of standard deviation ``std``: the power of two in ``(std/16, std/8]``."""
    return 2.0 ** (math.floor(math.log2(_check_std(std))) - 3)


def snap(values: NDArray[np.floating], std: float) -> NDArray[np.float64]:
    """``values`` (already noised, with noise of standard deviation ``std``) rounded to :func:`snap_grid`:
    Mironov's remedy for the floating-point attack (module docstring). ``std`` 0 leaves them unchanged."""
    out = np.asarray(values, dtype=np.float64)
    if std == 0:
        return out
    grid = snap_grid(std)
    return np.round(out / grid) * grid


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


def gaussian_noise(shape: tuple[int, ...], std: float, rng: RandomSource) -> NDArray[np.float64]:
    """Independent ``N(0, std^2)`` entries (float64)."""
    return np.asarray(rng.normal(0.0, _check_std(std), size=shape), dtype=np.float64)


def poisson_sample(n: int, sample_rate: float, rng: RandomSource) -> NDArray[np.int64]:
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

    def privatize(self, update: Mapping[str, Array], rng: RandomSource) -> dict[str, Array]:
        """What a site sends: its clipped update, plus its noise share in distributed mode (dtypes kept)."""
        clipped, _ = self.clip(update)
        std = self.site_noise_std
        if std == 0:
            return clipped
        return {k: (v + gaussian_noise(v.shape, std, rng)).astype(v.dtype) for k, v in clipped.items()}

    def central_noise(self, aggregate: Mapping[str, Array], rng: RandomSource) -> dict[str, Array]:
        """Central mode, at the orchestrator: the sum of clipped updates plus ``N(0, sigma^2 C^2)``, snapped
        (module docstring)."""
        if self.mode is not NoiseMode.CENTRAL:
            raise DpParameterError(
                "central noise is only added in central mode; in distributed mode sites add it"
            )
        std = self.sum_noise_std
        return {
            k: snap(v + gaussian_noise(v.shape, std, rng), std).astype(v.dtype) for k, v in aggregate.items()
        }

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


# --- the secure-aggregation codec's per-coordinate clip, under distributed noise ---------------------------


def clip_tail_mass(stds: float, coordinates: int) -> float:
    """Probability that any of ``coordinates`` independent Gaussian noise values exceeds ``stds`` standard
    deviations in absolute value (the union bound ``coordinates * 2 * Phi(-stds)``)."""
    if coordinates < 1:
        raise DpParameterError(f"coordinates must be at least 1, got {coordinates}")
    return min(1.0, coordinates * math.erfc(stds / math.sqrt(2.0)))


def clip_headroom_stds(coordinates: int, tail: float) -> float:
    """The fewest standard deviations of headroom above a clipped value so that ``coordinates`` noisy
    values are all inside it except with probability at most ``tail`` (:func:`clip_tail_mass`)."""
    if coordinates < 1:
        raise DpParameterError(f"coordinates must be at least 1, got {coordinates}")
    if not 0 < tail < 1:
        raise DpParameterError(f"the tail probability must lie in (0, 1), got {tail!r}")
    # Phi^-1 of the one-sided tail share; NormalDist handles tails far below double-precision 1 - p
    z = -NormalDist().inv_cdf(tail / (2.0 * coordinates))
    while clip_tail_mass(z, coordinates) > tail:  # inv_cdf is accurate to ~1e-15; never round down
        z = math.nextafter(z, math.inf)
    return z
