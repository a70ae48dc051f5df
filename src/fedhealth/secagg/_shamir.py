"""Shamir secret sharing over the prime field GF(2**521 - 1).

Secrets are 32-byte strings (a self-mask seed, an X25519 private key) read as integers below 2**256, so one
field element holds a whole secret. A share is the point ``(x, f(x))`` of a random polynomial of degree
``threshold - 1`` with ``f(0) = secret``; any ``threshold`` points give ``f(0)`` back by Lagrange
interpolation, and fewer are consistent with every secret equally often. The x-coordinate of a site is its
1-based position in the round's sorted site list. Pure Python integers: the work is per pair of sites, never
per parameter.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32


def evaluate_polynomial(coefficients: Sequence[int], x: int, prime: int = PRIME) -> int:
    """``sum(c_i * x**i) mod prime`` by Horner's rule; ``coefficients[0]`` is the constant term."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % prime
    return acc


def split_int(
    secret: int,
    xs: Sequence[int],
    threshold: int,
    prime: int = PRIME,
    *,
    coefficients: Sequence[int] | None = None,
) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` for each x in ``xs``; any ``threshold`` of them reconstruct it.

    ``coefficients`` (the ``threshold - 1`` non-constant ones) exists for exhaustive tests over small fields;
    by default they are drawn uniformly from the field with the OS's randomness.
    """
    if not 0 <= secret < prime:
        raise ValueError("the secret must be a field element")
    if threshold < 1 or threshold > len(xs):
        raise ValueError(f"threshold {threshold} is not within 1..{len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < prime for x in xs):
        raise ValueError("share x-coordinates must be distinct and non-zero")
    if coefficients is None:
        coefficients = [secrets.randbelow(prime) for _ in range(threshold - 1)]
    elif len(coefficients) != threshold - 1:
        raise ValueError("a polynomial for threshold t has t - 1 random coefficients")
    poly = [secret, *coefficients]
    return {x: evaluate_polynomial(poly, x, prime) for x in xs}


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...], prime: int) -> tuple[int, ...]:
    weights = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % prime
                den = den * (xm - xj) % prime
        weights.append(num * pow(den, -1, prime) % prime)
    return tuple(weights)


def reconstruct_int(points: Mapping[int, int], threshold: int, prime: int = PRIME) -> int:
    """``f(0)`` from at least ``threshold`` points (the ``threshold`` smallest x are used)."""
    if len(points) < threshold:
        raise ValueError(f"{len(points)} shares cannot reconstruct a secret that needs {threshold}")
    xs = tuple(sorted(points)[:threshold])
    if any(not 0 < x < prime for x in xs) or any(not 0 <= points[x] < prime for x in xs):
        raise ValueError("shares must be field elements with non-zero x")
    weights = _lagrange_at_zero(xs, prime)
    return sum(w * points[x] for w, x in zip(weights, xs, strict=True)) % prime


def split_secret(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Share a 32-byte secret; each share is a 66-byte big-endian field element."""
    if len(secret) != SECRET_BYTES:
        raise ValueError("secrets are 32 bytes")
    shares = split_int(int.from_bytes(secret, "big"), xs, threshold)
    return {x: y.to_bytes(SHARE_BYTES, "big") for x, y in shares.items()}


def reconstruct_secret(points: Mapping[int, bytes], threshold: int) -> bytes:
    """The 32-byte secret from at least ``threshold`` shares; ``ValueError`` if they cannot encode one."""
    if any(len(y) != SHARE_BYTES for y in points.values()):
        raise ValueError("a share is 66 bytes")
    value = reconstruct_int({x: int.from_bytes(y, "big") for x, y in points.items()}, threshold)
    if value >> (8 * SECRET_BYTES):
        raise ValueError("the shares do not encode a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def _value_at(points: Mapping[int, int], x: int, prime: int = PRIME) -> int:
    """The value at ``x`` of the polynomial through exactly ``points`` (Lagrange)."""
    total = 0
    for xj, yj in points.items():
        num, den = 1, 1
        for xm in points:
            if xm != xj:
                num = num * (x - xm) % prime
                den = den * (xj - xm) % prime
        total = (total + yj * num * pow(den, -1, prime)) % prime
    return total


def _sets_leaving_out_few(xs: Sequence[int], threshold: int) -> Iterator[tuple[int, ...]]:
    """Every set of ``threshold`` of ``xs``, those that leave out fewer of the smallest x first: the
    ``threshold`` smallest, then each leaving one of the ``threshold + 1`` smallest out, then two of the
    ``threshold + 2`` smallest, and so on. So k wrong shares cost at most C(threshold + k, k) sets wherever
    they are, where sets in plain order would all hold a wrong share with the smallest x for the first
    C(len(xs) - 1, threshold - 1) of them (and the bound would fail the round over one wrong share)."""
    yield tuple(xs[:threshold])
    for k in range(1, len(xs) - threshold + 1):
        front = xs[: threshold + k]
        for left_out in itertools.combinations(front[:-1], k):  # each set once: the one whose largest x is
            yield tuple(x for x in front if x not in left_out)  # front[-1]


def reconstruct_verified(
    points: Mapping[int, bytes],
    threshold: int,
    verify: Callable[[bytes], bool],
    *,
    max_tries: int = 512,
) -> tuple[bytes, frozenset[int]]:
    """The secret from shares some of which may be wrong, when a wrong secret can be told (``verify``: a
    commitment or a public key matches): the first ``threshold`` shares whose secret verifies, the
    ``threshold`` smallest x first, then sets leaving out one of the smallest, then two, and so on (at most
    ``max_tries`` sets: see :func:`_sets_leaving_out_few`), and the x of every
    share that is not on that polynomial (their holders revealed a wrong share, or were dealt one: the
    holder cannot be told from the dealer without verifiable shares; looked for only when the
    first set failed, and shares that are no field element at all). Raises ``ValueError`` when
    no set tried verifies. Every set rebuilds the same one secret or a wrong one: trying sets reveals
    nothing that the right set does not."""
    if len(points) < threshold:
        raise ValueError(f"{len(points)} shares cannot reconstruct a secret that needs {threshold}")
    wrong_size = {x for x, y in points.items() if len(y) != SHARE_BYTES}
    values = {x: int.from_bytes(y, "big") for x, y in points.items() if x not in wrong_size}
    values = {x: y for x, y in values.items() if 0 < x < PRIME and 0 <= y < PRIME}
    for tries, xs in enumerate(itertools.islice(_sets_leaving_out_few(sorted(values), threshold), max_tries)):
        chosen = {x: values[x] for x in xs}
        value = reconstruct_int(chosen, threshold)
        if value >> (8 * SECRET_BYTES):
            continue
        secret = value.to_bytes(SECRET_BYTES, "big")
        if not verify(secret):
            continue
        # The shares off this polynomial, once a wrong one was met (the first set failed): in the usual case
        # the check of every other share would cost O(n t^2) field products per secret, for nothing.
        off = {x for x in values if x not in chosen and _value_at(chosen, x) != values[x]} if tries else set()
        return secret, frozenset(off | (set(points) - set(values)))
    raise ValueError("no set of the shares rebuilds a secret that verifies")
