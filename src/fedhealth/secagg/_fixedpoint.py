"""Fixed point in the 2^64 ring: how a collective session's ``secure_sum`` turns float64 into ring elements.

A value ``x`` becomes ``round(x * 2^40)`` (round half to even, as :func:`numpy.rint`) as an int64 in two's
complement, read as uint64; ring addition is then int64 addition as long as no sum leaves the int64 range,
and the decoded sum is ``sum(round(x_k * 2^40)) / 2^40`` exactly (the int64 sum, converted to float64 once).

No one can see a wrap-around in a ring, so the bound is enforced before anything is masked: with ``n``
contributors every value must lie strictly within ``±2^23 / n`` (then ``n`` of them sum to less than
``2^63``). ``2^23 / n`` is about 2.1 million with 4 sites; a recipe whose figures can be larger (sums of
squares, say) scales or centres them first. Resolution is ``2^-40`` (about 9.1e-13).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhealth.core import InputError

SCALE_BITS = 40
SCALE = float(2**SCALE_BITS)
INV_SCALE = float(2.0**-SCALE_BITS)
# Exclusive bound on |x * 2^40| for one of n contributors is 2^63 / n; the margin keeps the float comparison
# on the safe side of that bound whatever rounding 2^63 / n took, and leaves room for rint's half step.
_MARGIN = 1.0 - 2.0**-40


class FixedPointRangeError(InputError):
    """A value cannot go into the ring: it is not finite, or so large that the sum over the session's sites
    could leave the int64 range (and wrap, invisibly)."""


def value_bound(n_sites: int) -> float:
    """The exclusive bound on ``|x|`` for each of ``n_sites`` contributors: just under ``2^23 / n_sites``."""
    if n_sites < 1:
        raise ValueError("a sum needs at least one contributor")
    return float(2.0 ** (63 - SCALE_BITS)) / n_sites * _MARGIN


def check_range(values: NDArray[np.float64], n_sites: int, offset: int = 0) -> None:
    """Raise :class:`FixedPointRangeError` unless every value is finite and within :func:`value_bound`,
    naming the first offending position (``offset`` + its index here), never the value: it may be a
    patient's."""
    if not values.size:
        return
    bound = value_bound(n_sites)
    # max/min are NaN when a NaN is present, and a NaN compares false: one test covers both
    if float(values.max()) < bound and float(values.min()) > -bound:
        return
    bad = np.flatnonzero(~(np.abs(values) < bound))
    where = int(bad[0]) if bad.size else 0
    what = "not finite" if not np.isfinite(values[where]) else f"outside ±{bound:.6g}"
    raise FixedPointRangeError(
        f"secure_sum: the value at position {offset + where} is {what}: with {n_sites} sites each value "
        f"must lie strictly within ±2^23/{n_sites} = ±{bound:.6g} so the sum cannot overflow the 2^64 "
        "fixed-point ring (scale or centre the values first)"
    )


def encode_into(values: NDArray[np.float64], out: NDArray[np.uint64], scratch: NDArray[np.float64]) -> None:
    """``out = round(values * 2^40)`` as int64 bits, for values already checked; ``scratch`` is a float64
    buffer at least as long (so no temporary is allocated)."""
    work = scratch[: values.size]
    np.multiply(values, SCALE, out=work)
    np.rint(work, out=work)
    np.copyto(out.view(np.int64), work, casting="unsafe")  # exact: integers well inside int64


def encode_fixed(values: NDArray[Any], n_sites: int) -> NDArray[np.uint64]:
    """``round(values * 2^40)`` as a fresh, writeable 1-D uint64 vector (the int64 bits), after
    :func:`check_range`."""
    flat = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    check_range(flat, n_sites)
    out = np.empty(flat.size, dtype=np.uint64)
    encode_into(flat, out, np.empty(flat.size, dtype=np.float64))
    return out


def decode_fixed(ring: NDArray[np.uint64]) -> NDArray[np.float64]:
    """The int64 reading of ring elements, divided by 2^40 (exact division by a power of two)."""
    out = ring.view(np.int64).astype(np.float64)
    np.multiply(out, INV_SCALE, out=out)
    return out
