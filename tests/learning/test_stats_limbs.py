"""Property tests of the exact sums behind ``stats``: the three-limb split of a figure is exact, its limbs
fit the secure sum's range, and the fixed-point sum of the limbs recombines to the figures' sum within the
documented ``n 2^-41`` plus one rounding."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhealth.learning._stats import join_limbs, limb_base, split_limbs
from fedhealth.secagg import decode_fixed, encode_fixed, value_bound

FIGURES = st.floats(min_value=-(2.0**55), max_value=2.0**55, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(FIGURES, min_size=1, max_size=20), n_sites=st.integers(min_value=1, max_value=64))
def test_the_limb_split_is_exact_and_every_limb_fits_the_secure_sum(values, n_sites):
    v = np.array(values)
    if float(np.abs(v).max()) >= limb_base(n_sites) ** 2 * value_bound(n_sites):
        return  # beyond the exact range: refused (test_stats_recipe)
    limbs = split_limbs(v, n_sites)
    assert np.array_equal(join_limbs(limbs, n_sites), v)  # bit for bit
    assert np.all(np.abs(limbs) < value_bound(n_sites))
    assert np.array_equal(limbs[0], np.trunc(limbs[0]))  # the two upper limbs are integers
    assert np.array_equal(limbs[1], np.trunc(limbs[1]))


@settings(max_examples=200, deadline=None)
@given(sites=st.lists(st.lists(FIGURES, min_size=3, max_size=3), min_size=2, max_size=8))
def test_the_fixed_point_sum_of_the_limbs_is_the_sum_of_the_figures(sites):
    n = len(sites)
    local = [np.array(s) for s in sites]
    if max(float(np.abs(v).max()) for v in local) >= limb_base(n) ** 2 * value_bound(n):
        return
    ring = np.zeros(3 * 3, dtype=np.uint64)
    for v in local:
        np.add(ring, encode_fixed(split_limbs(v, n), n), out=ring)
    got = join_limbs(decode_fixed(ring).reshape(3, 3), n)
    for i in range(3):
        exact = math.fsum(float(v[i]) for v in local)
        bound = n * 2.0**-41 + 2 * math.ulp(abs(exact) + limb_base(n) ** 2)
        assert abs(float(got[i]) - exact) <= bound
