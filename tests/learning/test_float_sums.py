"""The boosting recipes' exact float sums (``FloatSums``) over a real in-memory session (real masks and
relay): one part per value while every site's values lie on the 2^-40 grid, both parts otherwise, the
result exact either way, and the sites always agree on which."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedhealth.learning import InMemorySession
from fedhealth.learning._lightgbm_network import FloatSums
from fedhealth.secagg import SessionFailedError

SITES = ["a", "b", "c"]


def _gradients(seed: int, size: int) -> np.ndarray:
    """float32 gradients of magnitude at least 2^-17 (multiples of 2^-40), as float64, as LightGBM and
    XGBoost hand their histograms over (float64 sums of float32 values)."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(-1, 1, size).astype(np.float32)
    values[np.abs(values) < 2**-17] = 2**-17
    return values.astype(np.float64)


def _exact(vectors: list[np.ndarray]) -> np.ndarray:
    """The correctly rounded sum of each position (``math.fsum``)."""
    return np.array([math.fsum(column) for column in zip(*vectors, strict=True)])


def _run(vectors_per_call: dict[str, list[np.ndarray]], session: InMemorySession | None = None) -> Any:
    session = session or InMemorySession(SITES, call_timeout_s=30)

    def program(member: Any) -> tuple[list[np.ndarray], list[tuple[int, int, bool]]]:
        sums = FloatSums(member.secure_sum)
        results, states = [], []
        for values in vectors_per_call[member.site]:
            results.append(sums(values)[0])
            states.append((sums.calls, sums.repeats, sums.one_part))
        return results, states

    return session.run(program)


def test_values_on_the_grid_sum_in_one_secure_sum_exactly():
    vectors = {s: [_gradients(i, 500)] for i, s in enumerate(SITES)}
    runs = _run(vectors)
    for site in SITES:
        (total,), states = runs[site]
        assert states == [(1, 0, True)]  # one secure sum of 500 values and the flag
        assert np.array_equal(total, _exact([vectors[s][0] for s in SITES]))


def test_a_site_with_a_value_off_the_grid_makes_every_site_repeat_in_two_parts_exactly():
    on_grid = {s: _gradients(10 + i, 300) for i, s in enumerate(SITES)}
    tiny = on_grid["c"].copy()
    tiny[7] = 3 * 2.0**-70  # a confident row's hessian: below the 2^-40 grid, within the 2^-80 one
    tiny[8] = 0.25 + 2.0**-60
    calls = {s: [on_grid[s], tiny if s == "c" else on_grid[s], on_grid[s], on_grid[s]] for s in SITES}
    runs = _run(calls)
    first = _exact([on_grid[s] for s in SITES])
    second = _exact([calls[s][1] for s in SITES])
    assert second[7] != first[7]
    assert second[8] != first[8]
    for site in SITES:
        totals, states = runs[site]
        # call 1: one part; call 2: one part, flag 1, repeated in two parts; call 3: two parts, flag 0;
        # call 4: one part again
        assert states == [(1, 0, True), (3, 1, False), (4, 1, True), (5, 1, True)]
        assert np.array_equal(totals[0], first)
        assert np.array_equal(totals[1], second)
        assert np.array_equal(totals[2], first)
        assert np.array_equal(totals[3], first)


def test_extra_words_ride_in_one_part_in_either_form():
    extra = {s: np.arange(5, dtype=np.float64) * 2.0**-40 * (i + 1) for i, s in enumerate(SITES)}
    values = {s: _gradients(20 + i, 50) for i, s in enumerate(SITES)}
    values["b"][0] = 2.0**-50  # off the grid: the extra words must survive the repeat too

    def program(member: Any) -> tuple[np.ndarray, np.ndarray | None, int]:
        sums = FloatSums(member.secure_sum)
        total, words = sums(values[member.site], extra[member.site])
        return total, words, sums.repeats

    runs = InMemorySession(SITES, call_timeout_s=30).run(program)
    for site in SITES:
        total, words, repeats = runs[site]
        assert repeats == 1
        assert np.array_equal(total, _exact([values[s] for s in SITES]))
        assert words is not None
        assert np.array_equal(words, sum(extra.values()))


class _LyingRelay(InMemorySession):
    """An orchestrator that tells site ``b`` that a site was off the grid in the first sum of 64 values."""

    lied = False

    def exchange(self, site: str, index: int, body: bytes) -> bytes | memoryview:
        result = super().exchange(site, index, body)
        if site != "b" or self.lied or len(result) != 8 * (64 + 1):
            return result
        self.lied = True
        lie = bytearray(result)
        lie[-8:] = (2**40).to_bytes(8, "little")  # the flag's sum, fixed point: 1
        return bytes(lie)


def test_an_orchestrator_that_tells_one_site_another_flag_fails_the_session_before_summing():
    session = _LyingRelay(SITES, call_timeout_s=30)
    vectors = {s: [_gradients(30 + i, 64), _gradients(40 + i, 64)] for i, s in enumerate(SITES)}
    # b sends both parts of the second sum, the others one: the relay refuses to add vectors of different
    # lengths, so no sum of the second call is made, and the session fails at every site
    with pytest.raises(SessionFailedError, match="disagree"):
        _run(vectors, session)
    assert session.lied
