"""The exact row counts of federated LightGBM ride packed, several to a secure-sum value: the packing is
carry-free as long as no count and no sum of counts exceeds the tree's pooled rows, and refuses otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from fedhealth.learning._lightgbm_network import (
    TreeTracker,
    UnprotectedCollectiveError,
    count_fields,
    pack_counts,
    unpack_counts,
)
from fedhealth.secagg import decode_fixed, encode_fixed


@pytest.mark.parametrize("rows", [1, 2, 486, 50_000, 131_071, 131_072, 2**26 - 1, 2**40])
def test_packed_counts_of_every_site_sum_to_the_summed_counts_through_the_ring(rows):
    rng = np.random.default_rng(rows)
    bits, per_word = count_fields(rows)
    assert per_word * bits <= 53
    assert rows < 2**bits
    # four sites whose counts per cell sum to at most the pooled rows, the largest cells included
    size = 7 * per_word + 3
    shares = rng.dirichlet(np.ones(4), size=size).T * rng.integers(0, rows + 1, size=size)
    sites = np.floor(shares).astype(np.int64)
    sites[0, :2] = [rows - sites[1:, 0].sum(), 0]  # a cell holding every pooled row
    ring = [encode_fixed(pack_counts(c, rows), 4) for c in sites]  # what each site's secure sum carries
    total = decode_fixed(np.sum(ring, axis=0, dtype=np.uint64))  # the ring's sum, as the session decodes it
    assert np.array_equal(unpack_counts(total, rows, size), sites.sum(axis=0))
    assert pack_counts(sites[0], rows).size == -(-size // per_word)


def test_a_count_above_the_pooled_rows_is_refused_before_anything_is_sent():
    with pytest.raises(UnprotectedCollectiveError, match="exceeds the pooled rows"):
        pack_counts(np.array([3, 501, 0]), 500)
    with pytest.raises(UnprotectedCollectiveError, match="exceeds the pooled rows"):
        pack_counts(np.array([-1]), 500)
    with pytest.raises(UnprotectedCollectiveError):
        count_fields(2**53)


def test_summed_counts_that_do_not_add_up_to_the_leaf_are_refused():
    codes = np.array([[0, 1], [1, 0], [1, 1]], dtype=np.int64)
    tree = TreeTracker(codes, num_bins=[2, 2], num_leaves=4, max_depth=-1, min_data_in_leaf=1)
    tree.start(6)  # six pooled rows: every feature's counts of the root must add up to 6
    with pytest.raises(UnprotectedCollectiveError, match="do not add up"):
        tree.take_histogram(np.array([2, 4, 3, 4]))  # as if a field had carried into its neighbour
    tree.take_histogram(np.array([2, 4, 3, 3]))
