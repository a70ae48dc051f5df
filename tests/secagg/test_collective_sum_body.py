"""A secure sum's body, bit for bit: the header, then the fixed-point values plus the AES-256-CTR keystream of
each lower pair and minus that of each higher pair, mod 2^64, across the chunks it is built in, the same
whether it is built in a fresh buffer or in a site's reused CallBuffer (of any earlier size)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedhealth.crypto import keystream
from fedhealth.secagg import CallBuffer, CollectiveOp, decode_call, encode_fixed
from fedhealth.secagg._session import _CHUNK, masked_sum_call

LENGTHS = [0, 1, 8, _CHUNK - 1, _CHUNK, _CHUNK + 1, 2 * _CHUNK + 5]


def reference(values: np.ndarray, n_sites: int, add: list[bytes], subtract: list[bytes]) -> np.ndarray:
    total = encode_fixed(values, n_sites)
    for key, sign in [(k, 1) for k in add] + [(k, -1) for k in subtract]:
        mask = np.frombuffer(keystream(key, 8 * values.size), dtype="<u8")
        total = total + mask if sign > 0 else total - mask  # uint64 arithmetic wraps mod 2^64
    return total


@pytest.mark.parametrize("length", LENGTHS)
def test_a_sum_body_is_the_fixed_point_values_plus_and_minus_the_pair_keystreams(length: int) -> None:
    rng = np.random.default_rng(length)
    values = rng.normal(scale=1000.0, size=length)
    add, subtract = [os.urandom(32), os.urandom(32)], [os.urandom(32)]
    expected = reference(values, 4, add, subtract)
    fresh = masked_sum_call(values, 4, add, subtract)
    op, payload = decode_call(fresh)
    assert op is CollectiveOp.SUM
    assert np.array_equal(np.frombuffer(payload, dtype="<u8"), expected)
    buffer = CallBuffer()
    for _ in range(2):  # the second build reuses the buffer's body and scratch
        assert bytes(masked_sum_call(values, 4, add, subtract, buffer)) == fresh


def test_a_reused_call_buffer_builds_each_size_exactly_whatever_it_held_before() -> None:
    buffer = CallBuffer()
    keys = [os.urandom(32) for _ in range(3)]
    for length in [*LENGTHS, *reversed(LENGTHS)]:
        values = np.linspace(-5.0, 5.0, length)
        expected = reference(values, 3, keys[:1], keys[1:])
        body = masked_sum_call(values, 3, keys[:1], keys[1:], buffer)
        assert np.array_equal(np.frombuffer(body[8:], dtype="<u8"), expected)
        unmasked = masked_sum_call(values, 3, [], [], buffer)
        assert np.array_equal(np.frombuffer(unmasked[8:], dtype="<u8"), encode_fixed(values, 3))
