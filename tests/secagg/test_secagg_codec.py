"""Quantization into the 32-bit ring: error bound, unbiasedness, exact counts, and no wrap at max n."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedhealth.core import ConfigError, InputError
from fedhealth.secagg import Segment, SegmentKind, VectorCodec

RING = 2**32


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 2000),
    st.floats(-1e3, 1e3),
    st.floats(1e-3, 1e3),
    st.integers(1, 12),
    st.integers(0, 2**32),
    st.data(),
)
def test_decoded_sum_is_within_m_steps_of_the_clipped_sum(
    n: int, low: float, width: float, length: int, seed: int, data: st.DataObject
) -> None:
    codec = VectorCodec(
        segments=(Segment(name="x", length=length, low=low, high=low + width),), max_contributors=n
    )
    m = data.draw(st.integers(1, min(n, 6)))
    values = [
        np.array(
            data.draw(st.lists(st.floats(low - width, low + 2 * width), min_size=length, max_size=length))
        )
        for _ in range(m)
    ]
    rng = np.random.default_rng(seed)
    encoded = [codec.encode({"x": v}, rng=rng) for v in values]
    total = np.sum(np.stack(encoded).astype(np.uint64), axis=0)
    assert int(total.max()) < RING
    decoded = codec.decode(total.astype(np.uint32), m)["x"]
    clipped = sum(np.clip(v, low, low + width) for v in values)
    bound = codec.error_bound("x", m)
    assert bound == pytest.approx(m * width / ((RING - 1) // n))
    slack = 1e-12 * (abs(low) + width) * m  # float64 rounding of the affine map
    assert np.all(np.abs(decoded - clipped) < bound + slack)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 1_000_000), st.integers(-1000, 1000), st.integers(-10, 10))
def test_sum_of_max_contributors_at_the_top_of_the_range_cannot_wrap(n: int, low: int, exponent: int) -> None:
    width = 2.0**exponent  # exact in float64, so the top of the range maps exactly onto the top level
    codec = VectorCodec(segments=(Segment(name="x", low=low, high=low + width),), max_contributors=n)
    top = codec.encode({"x": low + width})
    bottom = codec.encode({"x": low})
    assert int(top[0]) == codec.levels("x")
    assert int(bottom[0]) == 0
    assert n * int(top[0]) <= RING - 1  # n sites at the very top still fit
    assert n * (int(top[0]) + 1) > RING - 1  # and the grid is as fine as the ring allows


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 1_000_000), st.floats(-1e6, 1e6), st.floats(1e-6, 1e6), st.floats(-1e9, 1e9))
def test_no_value_encodes_above_the_top_level(n: int, low: float, width: float, x: float) -> None:
    codec = VectorCodec(segments=(Segment(name="x", low=low, high=low + width),), max_contributors=n)
    assert int(codec.encode({"x": x})[0]) <= codec.levels("x")


def test_many_sites_at_the_top_sum_and_decode_without_wrapping() -> None:
    n = 50
    codec = VectorCodec(segments=(Segment(name="x", length=3, low=-1.0, high=1.0),), max_contributors=n)
    one = codec.encode({"x": [1.0, 1.0, 5.0]})
    total = np.zeros(3, dtype=np.uint32)
    for _ in range(n):
        np.add(total, one, out=total)
    decoded = codec.decode(total, n)["x"]
    assert np.allclose(decoded, [n, n, n], rtol=0, atol=codec.error_bound("x", n))


def test_stochastic_rounding_is_unbiased() -> None:
    # with two levels (n near 2**31) the grid is {low, high}: x at 30% of the range rounds up 30% of the time
    codec = VectorCodec(
        segments=(Segment(name="x", length=20_000, low=0.0, high=1.0),), max_contributors=2**31
    )
    assert codec.levels("x") == 1
    q = codec.encode({"x": np.full(20_000, 0.3)}, rng=np.random.default_rng(1))
    share = q.mean()
    sigma = (0.3 * 0.7 / 20_000) ** 0.5
    assert abs(share - 0.3) < 5 * sigma


def test_default_rounding_noise_is_unbiased_too() -> None:
    codec = VectorCodec(
        segments=(Segment(name="x", length=20_000, low=0.0, high=1.0),), max_contributors=2**31
    )
    q = codec.encode({"x": np.full(20_000, 0.7)})
    assert abs(q.mean() - 0.7) < 5 * (0.21 / 20_000) ** 0.5


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([1, 2, 3, 10, 1000]),
    st.sampled_from([-1.0, 0.0, -3.7, -1e6, 1e-300, -1e300]),
    st.sampled_from([1e-9, 1.0, 2.0, 1e6, 1e300]),
    st.integers(1, 70_000),
    st.integers(0, 2**32 - 1),
)
def test_keystream_rounding_is_the_documented_formula_bit_for_bit(
    n: int, low: float, width: float, size: int, seed: int
) -> None:
    # the quantizer works in units of 2**-32 steps for speed; each q must still be floor(clip(y + u)) with
    # y = (x - low) * L / (high - low) and u = k * 2**-32 for the keystream's word k, across chunks
    from fedhealth.secagg import _codec
    from fedhealth.secagg._crypto_extra import mask_of

    high = low + width
    assume(math.isfinite(high) and high > low)
    rng = np.random.default_rng(seed)
    key = rng.bytes(32)
    pick = rng.integers(0, 5, size)
    near = low + width * rng.normal(0.0, 3.0, size)
    huge = rng.choice([-1e308, 1e308], size)
    x = np.select(
        [pick == 0, pick == 1, pick == 2, pick == 3],
        [rng.uniform(low, high, size), near, np.full(size, low), huge],
        np.full(size, high),
    )
    codec = VectorCodec(segments=(Segment(name="x", length=size, low=low, high=high),), max_contributors=n)
    levels = float(codec.levels("x"))
    with np.errstate(over="ignore", invalid="ignore"):
        y = (x - low) * (levels / (high - low)) + mask_of(key, size) * 2.0**-32
    expected = np.clip(y, 0.0, levels).astype(np.uint32)
    with mock.patch.object(_codec, "random_bytes", return_value=key):
        assert np.array_equal(codec.encode({"x": x}), expected)


@given(st.integers(1, 100), st.lists(st.integers(0, 40_000), min_size=1, max_size=20))
def test_integer_segments_sum_exactly(n: int, counts: list[int]) -> None:
    codec = VectorCodec(
        segments=(Segment(name="samples", low=0, high=40_000, kind=SegmentKind.INTEGER),), max_contributors=n
    )
    used = counts[:n]
    total = np.zeros(1, dtype=np.uint32)
    for c in used:
        np.add(total, codec.encode({"samples": c}), out=total)
    assert codec.decode(total, len(used))["samples"][0] == sum(used)
    assert codec.error_bound("samples", len(used)) == 0


def test_integer_segment_with_negative_low_sums_exactly() -> None:
    codec = VectorCodec(
        segments=(Segment(name="d", length=2, low=-5, high=5, kind=SegmentKind.INTEGER),), max_contributors=3
    )
    total = codec.encode({"d": [-5, 5]}) + codec.encode({"d": [2, -3]}) + codec.encode({"d": [0, 0]})
    assert codec.decode(total, 3)["d"].tolist() == [-3.0, 2.0]


def test_segments_are_laid_out_in_order_and_decoded_by_name() -> None:
    codec = VectorCodec(
        segments=(
            Segment(name="delta", length=3, low=-1.0, high=1.0),
            Segment(name="samples", low=0, high=100, kind=SegmentKind.INTEGER),
            Segment(name="loss", low=0.0, high=10.0),
        ),
        max_contributors=4,
    )
    assert codec.length == 5
    v = codec.encode({"delta": np.array([[-1.0, 0.0, 1.0]]), "samples": 7, "loss": 10.0})
    assert v[3] == 7
    assert v[0] == 0
    assert v[2] == v[4] == codec.levels("delta")
    out = codec.decode(v, 1)
    assert out["samples"][0] == 7
    assert out["loss"][0] == pytest.approx(10.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    codec = VectorCodec(segments=(Segment(name="x", length=3, low=-1.0, high=1.0),), max_contributors=2)
    with pytest.raises(InputError):
        codec.encode({"x": [0.0, bad, 0.0]})


@pytest.mark.parametrize("value", [2.5, -1, 101])
def test_integer_values_that_are_fractional_or_out_of_range_are_refused_not_clipped(value: float) -> None:
    codec = VectorCodec(
        segments=(Segment(name="n", low=0, high=100, kind=SegmentKind.INTEGER),), max_contributors=2
    )
    with pytest.raises(InputError):
        codec.encode({"n": value})


def test_missing_extra_or_misshapen_segments_are_refused() -> None:
    codec = VectorCodec(segments=(Segment(name="x", length=2, low=0.0, high=1.0),), max_contributors=2)
    with pytest.raises(InputError):
        codec.encode({})
    with pytest.raises(InputError):
        codec.encode({"x": [0.1, 0.2], "y": 1})
    with pytest.raises(InputError):
        codec.encode({"x": [0.1, 0.2, 0.3]})
    with pytest.raises(InputError):
        codec.encode({"x": ["a", "b"]})


def test_decode_refuses_sums_no_honest_round_can_produce() -> None:
    codec = VectorCodec(
        segments=(Segment(name="n", low=0, high=100, kind=SegmentKind.INTEGER),), max_contributors=4
    )
    with pytest.raises(InputError):
        codec.decode(np.array([201], dtype=np.uint32), 2)
    with pytest.raises(InputError):
        codec.decode(np.array([1], dtype=np.uint32), 5)
    with pytest.raises(InputError):
        codec.decode(np.array([1, 2], dtype=np.uint32), 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: VectorCodec(segments=(), max_contributors=2),
        lambda: VectorCodec(segments=(Segment(name="x", low=0, high=1),) * 2, max_contributors=2),
        lambda: VectorCodec(segments=(Segment(name="x", low=0, high=1),), max_contributors=0),
        lambda: VectorCodec(
            segments=(Segment(name="n", low=0, high=2**31, kind=SegmentKind.INTEGER),), max_contributors=2
        ),
        lambda: Segment(name="x", low=1.0, high=1.0),
        lambda: Segment(name="x", low=0.0, high=float("inf")),
        lambda: Segment(name="x", low=0.0, high=1.0, length=0),
        lambda: Segment(name="Bad Name", low=0.0, high=1.0),
        lambda: Segment(name="n", low=0.5, high=3, kind=SegmentKind.INTEGER),
    ],
)
def test_bad_codec_configurations_are_refused(make: object) -> None:
    with pytest.raises(ConfigError):
        make()  # type: ignore[operator]
