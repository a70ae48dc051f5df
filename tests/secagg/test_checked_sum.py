"""Checked sums: a secure sum the relay cannot alter unnoticed (docs/secure-aggregation.md, "Checked sums").

The leader seals one secret to every site (the relay relays it and cannot open it); each site then adds to
its masked values 64 secret random linear combinations of them, and checks the summed combinations against
the sum it receives. These tests drive the sites and the relay in memory, the relay lying where they say."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from collective_session import Session, fixed_point_sum, open_session

from fedhealth.secagg import (
    SUM_TAGS,
    CollectiveOp,
    SecAggProtocolError,
    SecAggSecurityError,
    encode_call,
)


def _seal(session: Session, tamper: Callable[[str, bytes], bytes] | None = None) -> None:
    bodies = {s: site.prepare_group_secret() for s, site in session.sites.items()}
    index = session.sites[session.names[0]].pending_index
    session.post(bodies, index)
    result = session.result(index)
    for s, site in session.sites.items():
        site.complete_group_secret(tamper(s, result) if tamper is not None else result)


def _checked_sum(
    session: Session, values: dict[str, np.ndarray], tamper: Callable[[str, bytes], bytes] | None = None
) -> dict[str, np.ndarray]:
    bodies = {s: bytes(session.sites[s].prepare_checked_sum(v)) for s, v in values.items()}
    index = session.sites[session.names[0]].pending_index
    session.post(bodies, index)
    result = session.result(index)
    return {
        s: site.complete_checked_sum(tamper(s, result) if tamper is not None else result)
        for s, site in session.sites.items()
    }


def _ready(names: tuple[str, ...] = ("a", "b", "c", "d")) -> Session:
    session = open_session(names)
    session.set_up()
    _seal(session)
    return session


def _add(result: bytes, at: int, delta: int) -> bytes:
    words = np.frombuffer(result, dtype="<u8").copy()
    words[at] = (int(words[at]) + delta) % (1 << 64)
    return words.astype("<u8").tobytes()


def test_a_checked_sum_is_the_sum_and_the_session_ends_cleanly():
    session = _ready()
    rng = np.random.default_rng(3)
    values = {s: rng.normal(0.0, 100.0, size=(2, 7)) for s in session.names}
    got = _checked_sum(session, values)
    expected = fixed_point_sum(list(values.values()))
    for total in got.values():
        assert total.shape == (2, 7)
        assert np.array_equal(total, expected)
    session.end()


@pytest.mark.parametrize(
    "delta",
    [1 << 40, 3 << 40, 1 << 63, 1],  # one count more, three more, the top bit alone (2^-40: the lowest bit)
    ids=["one-count", "three-counts", "top-bit", "lowest-bit"],
)
def test_a_relay_that_alters_a_checked_sum_the_same_way_for_every_site_fails_it_at_every_site(delta):
    """The attack a plain sum cannot see (the same wrong sum to all sites keeps their chains equal): here
    every site refuses it, whichever value is changed and by how much, the check values left as they are."""
    session = _ready()
    values = {s: np.arange(5, dtype=np.float64) + i for i, s in enumerate(session.names)}
    bodies = {s: bytes(session.sites[s].prepare_checked_sum(values[s])) for s in session.names}
    index = session.sites[session.names[0]].pending_index
    session.post(bodies, index)
    forged = _add(session.result(index), 2, delta)
    for site in session.sites.values():
        with pytest.raises(SecAggSecurityError, match="relay altered it"):
            site.complete_checked_sum(forged)
    with pytest.raises(SecAggProtocolError, match="over at this site"):
        session.sites["a"].prepare_barrier()  # fails closed


def test_a_relay_that_also_adjusts_the_check_values_by_guessing_is_caught():
    """Without the secret, the relay's best guess at the check values of an altered sum: the values of an
    honest sum moved by the same amount everywhere. It fails."""
    session = _ready()
    values = {s: np.full(6, 2.0) for s in session.names}

    def forge(site: str, result: bytes) -> bytes:
        altered = _add(result, 0, 1 << 40)
        for t in range(SUM_TAGS):
            altered = _add(altered, 6 + t, 1 << 40)
        return altered

    with pytest.raises(SecAggSecurityError, match="relay altered it"):
        _checked_sum(session, values, tamper=forge)


def test_the_relay_never_holds_the_group_secret_in_clear():
    session = open_session(("a", "b", "c"))
    session.set_up()
    _seal(session)
    secret = session.sites["a"]._group_secret  # the leader drew it
    assert secret is not None
    assert all(site._group_secret == secret for site in session.sites.values())
    relayed = b"".join(session.seen.values()) + session.result(1)
    assert secret not in relayed
    assert secret.hex().encode() not in relayed
    assert session.relay.released is None  # a sealed secret is no broadcast: never kept as a result


def test_a_sealed_secret_the_leader_did_not_sign_is_refused():
    session = open_session(("a", "b", "c"))
    session.set_up()

    def swap(site: str, result: bytes) -> bytes:
        return result[:-64] + bytes(64) if site != "a" else result

    with pytest.raises(SecAggSecurityError, match="not signed by the session's leader"):
        _seal(session, tamper=swap)


def test_a_checked_sum_before_the_group_secret_is_refused_and_a_non_leader_cannot_send_a_secret():
    session = open_session(("a", "b", "c"))
    session.set_up()
    with pytest.raises(SecAggProtocolError, match="group secret first"):
        session.sites["b"].prepare_checked_sum(np.ones(3))
    # a non-leader that puts a sealed payload in the call breaks the relay's rule for the op
    body = session.sites["b"].prepare_group_secret()
    forged = encode_call(CollectiveOp.SEAL, b"x" * 80)
    assert len(forged) > len(body)
    with pytest.raises(Exception, match="only the leader"):
        session.relay.receive("b", 1, forged)
