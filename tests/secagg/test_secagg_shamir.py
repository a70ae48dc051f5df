"""Shamir sharing: any t shares reconstruct; t - 1 shares are consistent with every secret equally often."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhealth.secagg._shamir import (
    PRIME,
    evaluate_polynomial,
    reconstruct_int,
    reconstruct_secret,
    split_int,
    split_secret,
)


def test_prime_is_the_mersenne_prime_2_521_minus_1() -> None:
    assert PRIME == 2**521 - 1
    assert pow(3, PRIME - 1, PRIME) == 1  # Fermat witness (2**521 - 1 is a known Mersenne prime)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(2, 12), st.data())
def test_any_t_shares_reconstruct_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    shares = split_secret(secret, xs, t)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
    assert reconstruct_secret({x: shares[x] for x in subset}, t) == secret


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32), st.integers(2, 8), st.data())
def test_t_minus_1_shares_are_consistent_with_any_other_secret(
    secret: bytes, other: bytes, t: int, data: st.DataObject
) -> None:
    xs = list(range(1, t + 3))
    shares = split_secret(secret, xs, t)
    seen = data.draw(st.lists(st.sampled_from(xs), min_size=t - 1, max_size=t - 1, unique=True))
    # the unique polynomial of degree t - 1 through (0, other) and the t - 1 seen shares: it exists for every
    # `other`, so those shares cannot tell the secrets apart
    points = {0: int.from_bytes(other, "big")} | {x: int.from_bytes(shares[x], "big") for x in seen}
    coeffs = _interpolate(points)
    assert len(coeffs) <= t
    assert coeffs[0] == int.from_bytes(other, "big")
    assert all(evaluate_polynomial(coeffs, x) == int.from_bytes(shares[x], "big") for x in seen)


def _interpolate(points: dict[int, int]) -> list[int]:
    """Coefficients of the polynomial through ``points`` over GF(PRIME), built independently (O(t^3))."""
    coeffs = [0] * len(points)
    for xj, yj in points.items():
        basis = [1]
        denom = 1
        for xm in points:
            if xm == xj:
                continue
            basis = [(a - xm * b) % PRIME for a, b in zip([0, *basis], [*basis, 0], strict=True)]
            denom = denom * (xj - xm) % PRIME
        scale = yj * pow(denom, -1, PRIME) % PRIME
        for i, b in enumerate(basis):
            coeffs[i] = (coeffs[i] + b * scale) % PRIME
    return coeffs


@pytest.mark.parametrize(("p", "t", "n"), [(7, 2, 3), (5, 3, 4)])
def test_t_minus_1_shares_have_the_same_distribution_for_every_secret_exhaustively(
    p: int, t: int, n: int
) -> None:
    xs = list(range(1, n + 1))
    for seen in itertools.combinations(xs, t - 1):
        distributions = []
        for secret in range(p):
            counts: Counter[tuple[int, ...]] = Counter()
            for coefficients in itertools.product(range(p), repeat=t - 1):
                shares = split_int(secret, xs, t, p, coefficients=coefficients)
                counts[tuple(shares[x] for x in seen)] += 1
            distributions.append(counts)
        assert all(d == distributions[0] for d in distributions)
        # and t shares determine the secret: each t-subset of shares maps to exactly one secret
    for secret in range(p):
        for coefficients in itertools.product(range(p), repeat=t - 1):
            shares = split_int(secret, xs, t, p, coefficients=coefficients)
            for subset in itertools.combinations(xs, t):
                assert reconstruct_int({x: shares[x] for x in subset}, t, p) == secret


def test_fewer_than_t_shares_are_refused() -> None:
    shares = split_secret(bytes(range(32)), [1, 2, 3, 4], 3)
    with pytest.raises(ValueError):
        reconstruct_secret({1: shares[1], 2: shares[2]}, 3)


@pytest.mark.parametrize(
    ("xs", "t"),
    [([1, 2, 3], 4), ([1, 2, 3], 0), ([1, 1, 2], 2), ([0, 1, 2], 2)],
)
def test_bad_share_parameters_are_refused(xs: list[int], t: int) -> None:
    with pytest.raises(ValueError):
        split_secret(bytes(32), xs, t)


def test_secret_must_be_32_bytes_and_shares_66() -> None:
    with pytest.raises(ValueError):
        split_secret(bytes(31), [1, 2], 2)
    with pytest.raises(ValueError):
        reconstruct_secret({1: bytes(65), 2: bytes(66)}, 2)


def test_shares_that_do_not_encode_a_32_byte_secret_are_refused() -> None:
    big = 1 << 300  # not a 32-byte secret
    shares = split_int(big, [1, 2], 2)
    with pytest.raises(ValueError):
        reconstruct_secret({x: y.to_bytes(66, "big") for x, y in shares.items()}, 2)
