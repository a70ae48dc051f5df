"""What a site contributes to a secure sum, as a vector over the ring Z/2**32.

A :class:`VectorCodec` lays named segments end to end: typically the model delta already multiplied by the
site's sample count, then scalars such as the sample count, the sum of losses, the number of evaluation
samples and of correct predictions. Each segment has its own range, so every figure a site reports travels
inside the secure sum and none leaves in clear.

Quantization, for at most ``N = max_contributors`` sites:

- ``REAL`` segments are clipped to ``[low, high]`` and stochastically rounded onto
  ``L = floor((2**32 - 1) / N)`` levels of step ``delta = (high - low) / L``:
  ``q = floor((x - low) / delta + u)`` with ``u`` uniform in ``[0, 1)``, then clamped to ``[0, L]`` (which
  is the same as clipping ``x`` first), so ``E[low + q * delta] = x`` inside the range.
  Every ``q`` lies in ``[0, L]``, so the sum of up to N contributions is at most ``N * L <= 2**32 - 1``: it
  cannot wrap.
- Error bound: each site's value is off by less than one step, so the decoded sum of ``m`` contributions
  differs from the sum of the clipped inputs by less than ``m * delta ~ m * N * (high - low) / 2**32`` per
  coordinate, and is unbiased; float64 rounding adds at most about ``2**-52 * max(|low|, |high|) / delta``
  steps per value (negligible unless the range is tiny next to its distance from zero). Clipping is the
  caller's choice of range: pick ``[low, high]`` per segment (a weighted delta ``n_k * Δ_k`` needs a range
  that grows with the largest sample count).
- ``INTEGER`` segments carry exact integers in ``[low, high]`` (counts); values outside are refused, not
  clipped, and the codec refuses a range with ``N * (high - low) > 2**32 - 1``. Their sums decode exactly.

The rounding noise ``u`` comes from the caller's ``numpy.random.Generator`` if given (for reproducible tests),
otherwise from an AES-CTR keystream under a fresh OS-random key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedhealth.core import ConfigError, InputError, is_valid_name
from fedhealth.crypto import random_bytes
from fedhealth.secagg._crypto_extra import uniform_noise

RING_MAX = (1 << 32) - 1
CHUNK = 1 << 16  # entries per step of the quantizer: large enough to amortize the per-call overhead


class SegmentKind(Enum):
    """How a segment's values map onto the ring."""

    REAL = "real"
    """Clipped to [low, high] and stochastically rounded."""
    INTEGER = "integer"
    """Exact integers in [low, high]; refused outside."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """A named run of ``length`` values in the summed vector, with its range."""

    name: str
    low: float
    high: float
    length: int = 1
    kind: SegmentKind = SegmentKind.REAL

    def __post_init__(self) -> None:
        if not is_valid_name(self.name):
            raise ConfigError(f"segment name {self.name!r} is not a valid name")
        if self.length < 1:
            raise ConfigError(f"segment {self.name!r}: length must be at least 1")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ConfigError(f"segment {self.name!r}: need finite low < high")
        if self.kind is SegmentKind.INTEGER and not (
            float(self.low).is_integer() and float(self.high).is_integer()
        ):
            raise ConfigError(f"segment {self.name!r}: an integer segment needs integer bounds")


@dataclass(frozen=True, slots=True, kw_only=True)
class VectorCodec:
    """Encodes named segments into one uint32 vector whose sum over ``max_contributors`` sites never wraps."""

    segments: tuple[Segment, ...]
    max_contributors: int

    def __post_init__(self) -> None:
        if not self.segments:
            raise ConfigError("a codec needs at least one segment")
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names):
            raise ConfigError(f"segment names repeat: {names}")
        if not 1 <= self.max_contributors <= RING_MAX:
            raise ConfigError("max_contributors must be at least 1")
        for seg in self.segments:
            if seg.kind is SegmentKind.INTEGER and (seg.high - seg.low) * self.max_contributors > RING_MAX:
                raise ConfigError(
                    f"segment {seg.name!r}: {self.max_contributors} sums of integers up to "
                    f"{seg.high - seg.low:g} above {seg.low:g} would wrap the 32-bit ring"
                )

    @property
    def length(self) -> int:
        """The vector length to configure the round with."""
        return sum(s.length for s in self.segments)

    def _segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise ConfigError(f"no segment named {name!r}")

    def levels(self, name: str) -> int:
        """The largest value one site's quantized entry can take in this segment."""
        seg = self._segment(name)
        if seg.kind is SegmentKind.INTEGER:
            return int(seg.high - seg.low)
        return RING_MAX // self.max_contributors

    def step(self, name: str) -> float:
        """The quantization step of a segment (1 for integers)."""
        seg = self._segment(name)
        return 1.0 if seg.kind is SegmentKind.INTEGER else (seg.high - seg.low) / self.levels(name)

    def error_bound(self, name: str, contributors: int) -> float:
        """A strict bound on |decoded sum - sum of clipped inputs| per coordinate (0 for integers)."""
        seg = self._segment(name)
        return 0.0 if seg.kind is SegmentKind.INTEGER else contributors * self.step(name)

    def encode(
        self, values: Mapping[str, ArrayLike], *, rng: np.random.Generator | None = None
    ) -> NDArray[np.uint32]:
        """One site's contribution: every segment, in order, quantized into ``[0, levels]``."""
        expected = {s.name for s in self.segments}
        if set(values) != expected:
            raise InputError(
                f"segments do not match: missing {sorted(expected - set(values))}, "
                f"unexpected {sorted(set(values) - expected)}"
            )
        out = np.empty(self.length, dtype=np.uint32)
        pos = 0
        for seg in self.segments:
            x = np.asarray(values[seg.name])
            if x.size != seg.length or x.dtype.kind not in "fiub":
                raise InputError(
                    f"segment {seg.name!r}: expected {seg.length} numbers, got {x.size} of {x.dtype}"
                )
            target = out[pos : pos + seg.length]
            if seg.kind is SegmentKind.INTEGER:
                self._encode_integer(seg, x.reshape(-1), target)
            else:
                self._encode_real(seg, x.reshape(-1), rng, target)
            pos += seg.length
        return out

    @staticmethod
    def _encode_integer(seg: Segment, x: NDArray[np.generic], target: NDArray[np.uint32]) -> None:
        xf = x.astype(np.float64)
        if not np.isfinite(xf).all() or not (np.floor(xf) == xf).all():
            raise InputError(f"segment {seg.name!r} holds integers; got a non-integer value")
        if xf.min() < seg.low or xf.max() > seg.high:
            raise InputError(f"segment {seg.name!r}: a value lies outside [{seg.low:g}, {seg.high:g}]")
        target[:] = (xf - seg.low).astype(np.uint32)

    def _encode_real(
        self,
        seg: Segment,
        x: NDArray[np.generic],
        rng: np.random.Generator | None,
        target: NDArray[np.uint32],
    ) -> None:
        # chunk by chunk, so the float64 temporaries stay in cache and nothing vector-sized is allocated
        levels = float(RING_MAX // self.max_contributors)
        scale = levels / (seg.high - seg.low)
        width = min(CHUNK, seg.length)
        buf = np.empty(width, dtype=np.float64)
        # With the keystream's noise, work in units of 2**-32 steps: the uint32 noise word k then adds as it
        # is (u = k * 2**-32 needs no pass of its own). Scaling by a power of two is exact, so
        # fl(2**32 * y + k) = 2**32 * fl(y + u) and every q is bit for bit what y + u gives.
        unit = 2.0**32 if rng is None and math.isfinite(scale * 2.0**32) else 1.0
        noise = np.empty(width, dtype=np.float64) if unit == 1.0 else None
        stream = None if rng is not None else uniform_noise(random_bytes(32), seg.length, CHUNK)
        # every q lies in [0, levels]: below 2**31 (two contributors or more) the cast can go through int32,
        # numpy's fast one, and the bits are the same
        out: NDArray[np.generic] = target.view(np.int32) if levels < 2.0**31 else target
        # far outside the range a value overflows to +-inf (a chunk holding both sums to NaN): the check below
        # tells that from non-finite input, and the clip maps it to the end level it belongs to
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, seg.length, CHUNK):
                stop = min(seg.length, start + CHUNK)
                n = stop - start
                b, xc = buf[:n], x[start:stop]
                np.subtract(xc, seg.low, out=b)  # subtract first: x*scale - low*scale would cancel badly
                np.multiply(b, scale * unit, out=b)
                if not math.isfinite(float(b.sum())) and not np.isfinite(xc).all():
                    raise InputError(f"segment {seg.name!r} holds NaN or infinite values")
                if noise is None:
                    assert stream is not None
                    np.add(b, next(stream), out=b)  # y * 2**32 + k
                else:
                    u = noise[:n]
                    if stream is None:
                        assert rng is not None
                        rng.random(n, out=u)
                    else:
                        np.multiply(next(stream), 2.0**-32, out=u)
                    np.add(b, u, out=b)
                # clipping after the noise: below the range every value floors to 0, above it lands on the top
                # level, and the clamp also catches L + u rounding up to L + 1 in float64
                np.clip(b, 0.0, levels * unit, out=b)
                if unit != 1.0:
                    np.multiply(b, 1.0 / unit, out=b)  # exact, as above
                np.copyto(out[start:stop], b, casting="unsafe")  # truncation is floor: b is non-negative

    def decode(self, total: NDArray[np.uint32], contributors: int) -> dict[str, NDArray[np.float64]]:
        """The per-segment sums of ``contributors`` sites' contributions, from the unmasked ring sum."""
        if not 1 <= contributors <= self.max_contributors:
            raise InputError(f"contributors must be within 1..{self.max_contributors}")
        if total.dtype != np.uint32 or total.shape != (self.length,):
            raise InputError(f"a sum is a uint32 vector of length {self.length}")
        result: dict[str, NDArray[np.float64]] = {}
        pos = 0
        for seg in self.segments:
            part = total[pos : pos + seg.length]
            pos += seg.length
            if int(part.max()) > contributors * self.levels(seg.name):
                raise InputError(
                    f"segment {seg.name!r}: the sum exceeds what {contributors} sites can contribute"
                )
            if seg.kind is SegmentKind.INTEGER:
                result[seg.name] = part.astype(np.float64) + contributors * seg.low
            else:
                values = part.astype(np.float64)
                np.multiply(values, self.step(seg.name), out=values)
                np.add(values, contributors * seg.low, out=values)
                result[seg.name] = values
        return result
