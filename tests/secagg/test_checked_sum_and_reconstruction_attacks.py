"""Attacks on the newest SecAgg defences: checked sums in collective sessions (docs/secure-aggregation.md,
"Checked sums") against a relay that replays, swaps or retargets results, and the server's reconstruction
from shares some of which are wrong (``reconstruct_verified``, ``AggregateResult.misbehaving``) against
liars placed where its search looks first.
"""

from __future__ import annotations

import hashlib
import itertools
import time

import numpy as np
import pytest
from collective_session import open_session
from test_checked_sum import _checked_sum, _ready, _seal

from fedhealth.secagg import SecAggSecurityError
from fedhealth.secagg._shamir import SHARE_BYTES, reconstruct_verified, split_secret

# --- checked sums -------------------------------------------------------------------------------------------


def test_a_relay_replaying_an_earlier_checked_sum_of_the_same_shape_is_caught_at_every_site():
    session = _ready()
    first = {s: np.full(4, float(i)) for i, s in enumerate(session.names)}
    bodies = {s: bytes(session.sites[s].prepare_checked_sum(first[s])) for s in session.names}
    index = session.sites[session.names[0]].pending_index
    session.post(bodies, index)
    earlier = session.result(index)
    for site in session.sites.values():
        site.complete_checked_sum(earlier)
    second = {s: np.full(4, 100.0 + i) for i, s in enumerate(session.names)}
    with pytest.raises(SecAggSecurityError, match="relay altered it"):
        _checked_sum(session, second, tamper=lambda _s, _r: earlier)


def test_a_relay_altering_only_one_sites_result_is_caught_by_that_site():
    session = _ready()
    values = {s: np.arange(3, dtype=np.float64) * (i + 1) for i, s in enumerate(session.names)}
    bodies = {s: bytes(session.sites[s].prepare_checked_sum(values[s])) for s in session.names}
    index = session.sites[session.names[0]].pending_index
    session.post(bodies, index)
    honest = session.result(index)
    words = np.frombuffer(honest, dtype="<u8").copy()
    words[1] += np.uint64(1 << 40)  # one count more, for site "c" only
    forged = words.tobytes()
    for name, site in session.sites.items():
        if name == "c":
            with pytest.raises(SecAggSecurityError, match="relay altered it"):
                site.complete_checked_sum(forged)
        else:
            site.complete_checked_sum(honest)


def test_a_relay_swapping_checked_sums_between_two_sessions_of_the_same_sites_is_caught():
    """Two sessions (another attempt) of the same four sites: each has its own group secret and its own
    masks, so the other session's sum, check values and all, fails the check."""
    one, other = _ready(), _ready()
    values = {s: np.full(5, 7.0) for s in one.names}
    bodies_one = {s: bytes(one.sites[s].prepare_checked_sum(values[s])) for s in one.names}
    bodies_other = {s: bytes(other.sites[s].prepare_checked_sum(values[s])) for s in other.names}
    index = one.sites["a"].pending_index
    assert index == other.sites["a"].pending_index
    one.post(bodies_one, index)
    other.post(bodies_other, index)
    from_other = other.result(index)
    for site in one.sites.values():
        with pytest.raises(SecAggSecurityError):
            site.complete_checked_sum(from_other)


def test_a_seal_message_from_another_session_or_with_its_sealed_copies_swapped_is_refused():
    one, other = open_session(("a", "b", "c")), open_session(("a", "b", "c"))
    one.set_up()
    other.set_up()
    bodies = {s: other.sites[s].prepare_group_secret() for s in other.names}
    index = other.sites["a"].pending_index
    other.post(bodies, index)
    replayed = other.result(index)
    with pytest.raises(SecAggSecurityError, match="not signed by the session's leader"):
        _seal(one, tamper=lambda site, result: replayed if site == "b" else result)
    # within one session: b handed c's sealed copy (re-encoded, signature kept) cannot open it
    fresh = open_session(("a", "b", "c"))
    fresh.set_up()

    def swap(site: str, result: bytes) -> bytes:
        return result.replace(b'"b"', b'"x"').replace(b'"c"', b'"b"') if site == "b" else result

    with pytest.raises(SecAggSecurityError):
        _seal(fresh, tamper=swap)


# --- reconstruction from shares some of which are wrong ----------------------------------------------------

SECRET = bytes(range(32))


def _verify(secret: bytes) -> bool:
    return hashlib.sha256(secret).digest() == hashlib.sha256(SECRET).digest()


def _shares(n: int, t: int) -> dict[int, bytes]:
    return split_secret(SECRET, list(range(1, n + 1)), t)


def _wrong(share: bytes) -> bytes:
    return ((int.from_bytes(share, "big") + 1) % ((1 << 521) - 1)).to_bytes(SHARE_BYTES, "big")


@pytest.mark.parametrize("liar", [1, 2, 11])
def test_one_wrong_share_among_the_smallest_x_is_named_and_the_secret_still_rebuilt(liar):
    """20 shares, threshold 11: the liar holds one of the smallest x, which every early set of a
    smallest-first search contains. One wrong share must never cost the round while 19 right ones remain."""
    points = _shares(20, 11)
    points[liar] = _wrong(points[liar])
    secret, wrong = reconstruct_verified(points, 11, _verify)
    assert secret == SECRET
    assert wrong == {liar}


def test_as_many_wrong_shares_as_the_survivors_spare_at_the_front_are_still_found_within_the_bound():
    points = _shares(20, 11)
    for x in (1, 3):
        points[x] = _wrong(points[x])
    secret, wrong = reconstruct_verified(points, 11, _verify)
    assert (secret, wrong) == (SECRET, {1, 3})


def test_the_search_stops_after_its_bound_however_the_shares_are_crafted():
    """Every share wrong: no set verifies; the search gives up after max_tries sets, not C(60, 31)."""
    points = {x: _wrong(y) for x, y in _shares(60, 31).items()}
    tried = 0

    def counting(secret: bytes) -> bool:
        nonlocal tried
        tried += 1
        return _verify(secret)

    started = time.monotonic()
    with pytest.raises(ValueError, match="no set of the shares"):
        reconstruct_verified(points, 31, counting, max_tries=64)
    assert tried <= 64
    assert time.monotonic() - started < 5.0
    assert sum(1 for _ in itertools.islice(itertools.combinations(range(60), 31), 65)) == 65


def test_a_dealer_that_dealt_an_honest_holder_a_wrong_share_gets_that_holder_named():
    """What a name in ``misbehaving`` proves (docs/secure-aggregation.md): its share is off the secret's
    polynomial, which its holder or the share's dealer caused; without verifiable shares the server cannot
    tell which. The dealer here is the liar; the holder it dealt to (x=5) revealed exactly what it got."""
    dealt = _shares(8, 5)
    dealt[5] = _wrong(dealt[5])  # the dealer's doing; the holder reveals it unchanged
    secret, wrong = reconstruct_verified(dealt, 5, _verify)
    assert (secret, wrong) == (SECRET, {5})
