"""Collective sessions (secagg core): exact fixed-point sums, masks that cancel only over every participant,
fresh indices, the set-up's checks, signed broadcasts, and equivocation that garbles instead of leaking."""

from __future__ import annotations

import json

import numpy as np
import pytest
from collective_session import fixed_point_sum, make_config, open_session
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhealth.core import ConfigError
from fedhealth.crypto import IdentityKey
from fedhealth.secagg import (
    CollectiveConfig,
    CollectiveOp,
    CollectiveRelay,
    CollectiveSite,
    FixedPointRangeError,
    KeyReuseGuard,
    SecAggMessageError,
    SecAggProtocolError,
    SecAggSecurityError,
    SessionFailedError,
    SessionFailure,
    decode_call,
    decode_fixed,
    encode_call,
    encode_fixed,
    value_bound,
)

NAMES = ["a", "b", "c", "d", "e", "f"]


def _values(n: int) -> st.SearchStrategy[float]:
    bound = value_bound(n)
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, exclude_min=True, exclude_max=True)


# --- the sum is exact -------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 6), st.integers(0, 24), st.integers(1, 3), st.data())
def test_unmasked_sum_equals_the_fixed_point_sum_exactly(
    n: int, length: int, calls: int, data: st.DataObject
) -> None:
    session = open_session(NAMES[:n])
    session.set_up()
    for _ in range(calls):
        values = {
            s: np.array(data.draw(st.lists(_values(n), min_size=length, max_size=length)), dtype=np.float64)
            for s in session.names
        }
        results = session.secure_sum(values)
        expected = fixed_point_sum(list(values.values()))
        for total in results.values():
            # bit for bit, not approximately
            assert total.tobytes() == expected.tobytes()
    session.end()


def test_sum_keeps_the_shape_and_accepts_integer_and_boolean_arrays() -> None:
    session = open_session(["a", "b", "c"])
    session.set_up()
    values = {
        "a": np.arange(6, dtype=np.int32).reshape(2, 3),
        "b": np.ones((2, 3), dtype=bool),
        "c": np.full((2, 3), 0.5, dtype=np.float32),
    }
    results = session.secure_sum(values)
    assert results["b"].shape == (2, 3)
    assert results["b"].tolist() == [[1.5, 2.5, 3.5], [4.5, 5.5, 6.5]]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 10_000), st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=20))
def test_fixed_point_round_trip_is_within_half_a_step(n: int, values: list[float]) -> None:
    bound = value_bound(n)
    array = np.clip(np.array(values), -bound / 2, bound / 2)
    decoded = decode_fixed(encode_fixed(array, n))
    assert np.all(np.abs(decoded - array) <= 2.0**-41)


@pytest.mark.parametrize("n", [3, 4, 7, 1000])
def test_the_largest_values_allowed_cannot_overflow_the_ring(n: int) -> None:
    top = np.nextafter(value_bound(n), 0)
    encoded = encode_fixed(np.array([top, -top]), n)
    as_int = encoded.view(np.int64).astype(object)
    assert n * abs(int(as_int[0])) < 2**63
    assert n * abs(int(as_int[1])) < 2**63


@pytest.mark.parametrize(
    ("value", "what"),
    [(np.nan, "not finite"), (np.inf, "not finite"), (-np.inf, "not finite"), (2.0**22, "outside")],
)
def test_a_value_the_ring_cannot_hold_is_refused_with_its_position_not_its_value(
    value: float, what: str
) -> None:
    values = np.zeros(5)
    values[3] = value
    with pytest.raises(FixedPointRangeError) as caught:
        encode_fixed(values, 4)
    message = str(caught.value)
    assert "position 3" in message
    assert what in message
    assert "2^23/4" in message
    assert str(value) not in message


def test_a_refused_value_uses_no_index() -> None:
    session = open_session(["a", "b", "c"])
    session.set_up()
    site = session.sites["a"]
    with pytest.raises(FixedPointRangeError):
        site.prepare_sum(np.array([1e30]))
    site.prepare_sum(np.array([1.0]))
    assert site.pending_index == 1


# --- masks ------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 6), st.data())
def test_masks_cancel_only_when_every_participant_contributed(n: int, data: st.DataObject) -> None:
    session = open_session(NAMES[:n])
    session.set_up()
    values = {s: np.arange(8, dtype=np.float64) * (i + 1) for i, s in enumerate(session.names)}
    session.secure_sum(values)
    masked = {s: np.frombuffer(session.seen[(1, s)][8:], dtype="<u8") for s in session.names}
    plain = {s: encode_fixed(v, n) for s, v in values.items()}
    subset = data.draw(st.lists(st.sampled_from(session.names), min_size=1, max_size=n - 1, unique=True))
    partial = np.sum([masked[s] for s in subset], axis=0, dtype=np.uint64)
    expected = np.sum([plain[s] for s in subset], axis=0, dtype=np.uint64)
    assert not np.array_equal(partial, expected)
    # every participant: the masks cancel
    assert np.array_equal(
        np.sum(list(masked.values()), axis=0, dtype=np.uint64),
        np.sum(list(plain.values()), axis=0, dtype=np.uint64),
    )


def test_no_masked_vector_the_relay_sees_is_a_sites_input() -> None:
    session = open_session(["a", "b", "c", "d"])
    session.set_up()
    values = {s: np.full(16, 3.0) for s in session.names}
    session.secure_sum(values)
    plain = encode_fixed(np.full(16, 3.0), 4)
    for s in session.names:
        body = session.seen[(1, s)]
        assert decode_call(body)[0] is CollectiveOp.SUM
        masked = np.frombuffer(body[8:], dtype="<u8")
        assert not np.any(masked == plain)  # no coordinate in clear (2^-64 per coordinate otherwise)


def test_each_call_gets_fresh_masks_and_a_site_never_goes_back_to_an_index() -> None:
    session = open_session(["a", "b", "c"])
    session.set_up()
    same = {s: np.ones(8) for s in session.names}
    session.secure_sum(same)
    session.secure_sum(same)
    assert session.seen[(1, "a")] != session.seen[(2, "a")]  # same values, same site: other masks
    site = session.sites["a"]
    site.prepare_sum(np.ones(8))
    assert site.pending_index == 3
    with pytest.raises(SecAggProtocolError, match="still pending"):
        site.prepare_sum(np.ones(8))
    with pytest.raises(SecAggProtocolError, match="set up already"):
        session.sites["b"].advertise()


def test_the_relay_refuses_a_call_for_a_closed_index_and_fails_on_one_ahead() -> None:
    session = open_session(["a", "b", "c"])
    session.set_up()
    session.secure_sum({s: np.ones(4) for s in session.names})
    old = session.seen[(1, "a")]
    # a re-sent call for the last index is a retry: harmless
    assert session.relay.receive("a", 1, old) is False
    with pytest.raises(SecAggProtocolError, match="closed"):
        session.relay.receive("a", 0, old)
    with pytest.raises(SessionFailedError) as caught:
        session.relay.receive("b", 5, old)
    assert caught.value.reason is SessionFailure.PROTOCOL_VIOLATION


# --- set-up -----------------------------------------------------------------------------------------------


def test_two_sites_or_too_many_colluders_cannot_hold_a_session() -> None:
    with pytest.raises(ConfigError, match="at least 3 sites"):
        make_config(["a", "b"])
    with pytest.raises(ConfigError, match="at least 2 sites outside the collusion bound"):
        make_config(["a", "b", "c"], collusion=2)
    make_config(["a", "b", "c"], collusion=1)


def _setup_result(session) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    bodies = {s: site.advertise() for s, site in session.sites.items()}
    session.post(bodies, 0)
    return json.loads(session.result(0))


def test_a_substituted_session_key_is_refused_by_the_site() -> None:
    session = open_session(["a", "b", "c"])
    adverts = _setup_result(session)
    adverts[1]["public_key"] = IdentityKey.generate().public().raw.hex()  # any other 32 bytes
    with pytest.raises(SecAggSecurityError, match="not signed"):
        session.sites["a"].establish(json.dumps(adverts).encode())
    with pytest.raises(SecAggProtocolError, match="over at this site"):
        session.sites["a"].prepare_barrier()


@pytest.mark.parametrize("change", ["drop", "duplicate", "reorder"])
def test_the_set_up_must_carry_exactly_one_advert_per_participant(change: str) -> None:
    session = open_session(["a", "b", "c"])
    adverts = _setup_result(session)
    if change == "drop":
        adverts = adverts[:2]
    elif change == "duplicate":
        adverts = [*adverts, adverts[1]]
    else:
        adverts = list(reversed(adverts))
    with pytest.raises(SecAggSecurityError, match="exactly one advert per participant"):
        session.sites["a"].establish(json.dumps(adverts).encode())


def test_an_advert_from_another_session_is_refused() -> None:
    other = open_session(["a", "b", "c"])
    stale = _setup_result(other)
    session = open_session(["a", "b", "c"])
    fresh = _setup_result(session)
    fresh[2] = stale[2]  # c's advert, validly signed, but for another attempt
    with pytest.raises(SecAggSecurityError, match="another session"):
        session.sites["a"].establish(json.dumps(fresh).encode())


def test_a_peer_reusing_a_session_key_from_an_earlier_session_is_refused() -> None:
    first = open_session(["a", "b", "c"])
    guard = KeyReuseGuard()
    identities = {s: k.public() for s, k in first.keys.items()}
    first.sites["a"] = CollectiveSite(first.config, "a", first.keys["a"], identities, key_guard=guard)
    first.set_up()
    # a second session of the same sites where b (validly signing) advertises its old ephemeral key again
    config = make_config(["a", "b", "c"])
    second = {s: CollectiveSite(config, s, first.keys[s], identities) for s in config.sites}
    second["a"] = CollectiveSite(config, "a", first.keys["a"], identities, key_guard=guard)
    second["b"]._agreement = first.sites["b"]._agreement  # the misbehaving peer
    relay = CollectiveRelay(config, identities)
    for s, site in second.items():
        relay.receive(s, 0, site.advertise())
    result = relay.result(0)
    assert result is not None
    with pytest.raises(SecAggSecurityError, match="used twice"):
        second["a"].establish(bytes(result))


def test_the_relay_fails_the_session_on_an_unsigned_advert_naming_the_site() -> None:
    session = open_session(["a", "b", "c"])
    body = session.sites["b"].advertise()
    forged = json.loads(decode_call(body)[1].tobytes())
    forged["signature"] = "00" * 64
    with pytest.raises(SessionFailedError) as caught:
        session.relay.receive("b", 0, encode_call(CollectiveOp.SETUP, json.dumps(forged).encode()))
    assert caught.value.reason is SessionFailure.SECURITY
    assert "b's advert" in caught.value.detail


def test_a_site_needs_its_own_identity_among_the_peers() -> None:
    config = make_config(["a", "b", "c"])
    keys = {s: IdentityKey.generate() for s in config.sites}
    identities = {s: k.public() for s, k in keys.items()}
    with pytest.raises(ConfigError, match="identity"):
        CollectiveSite(config, "a", IdentityKey.generate(), identities)
    with pytest.raises(ConfigError, match="participants"):
        CollectiveSite(config, "a", keys["a"], {s: identities[s] for s in ("a", "b")})


# --- relay rules ------------------------------------------------------------------------------------------


def test_sites_that_disagree_on_a_call_fail_the_session() -> None:
    session = open_session(["a", "b", "c"])
    session.set_up()
    session.relay.receive("a", 1, session.sites["a"].prepare_sum(np.ones(4)))
    with pytest.raises(SessionFailedError, match="sums 5 values, others 4"):
        session.relay.receive("b", 1, session.sites["b"].prepare_sum(np.ones(5)))
    with pytest.raises(SessionFailedError):
        session.relay.result(1)

    session = open_session(["a", "b", "c"])
    session.set_up()
    session.relay.receive("a", 1, session.sites["a"].prepare_sum(np.ones(4)))
    with pytest.raises(SessionFailedError, match="diverged"):
        session.relay.receive("b", 1, session.sites["b"].prepare_barrier())


def test_only_the_leader_sends_a_broadcast_payload() -> None:
    session = open_session(["a", "b", "c"])
    session.set_up()
    with pytest.raises(SecAggProtocolError, match="only the leader"):
        session.sites["b"].prepare_broadcast(b"x")
    with pytest.raises(SessionFailedError, match="only the leader"):
        session.relay.receive("b", 1, encode_call(CollectiveOp.BROADCAST, b"y" * 80))


def test_a_lost_site_fails_the_session_and_the_survivors_partial_sum_stays_masked() -> None:
    session = open_session(["a", "b", "c", "d"])
    session.set_up()
    values = {s: np.full(8, 2.0) for s in session.names}
    bodies = {s: session.sites[s].prepare_sum(values[s]) for s in ("a", "b", "c")}
    session.post(bodies, 1)
    assert session.relay.result(1) is None
    assert session.relay.missing() == ["d"]
    session.relay.fail(SessionFailure.SITE_LOST, "d did not take part in call 1 in time")
    with pytest.raises(SessionFailedError, match="site_lost"):
        session.relay.result(1)
    survivors = np.sum([np.frombuffer(b[8:], dtype="<u8") for b in bodies.values()], axis=0, dtype=np.uint64)
    plain = np.sum([encode_fixed(values[s], 4) for s in bodies], axis=0, dtype=np.uint64)
    assert not np.any(survivors == plain)  # the masks with d never cancel


# --- broadcast and equivocation ---------------------------------------------------------------------------


def _broadcast(session, payload: bytes, tamper=None) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    bodies = {
        s: site.prepare_broadcast(payload if s == session.config.leader else None)
        for s, site in session.sites.items()
    }
    index = session.sites["a"].pending_index
    session.post(bodies, index)
    result = session.result(index)
    return {
        s: site.complete_broadcast(tamper(s, result) if tamper else result)
        for s, site in session.sites.items()
    }


def test_every_site_receives_the_leaders_broadcast() -> None:
    session = open_session(["a", "b", "c"])
    session.set_up()
    got = _broadcast(session, b"split on feature 3")
    assert set(got.values()) == {b"split on feature 3"}
    assert session.relay.released == b"split on feature 3"


def test_a_forged_or_replayed_broadcast_is_refused() -> None:
    session = open_session(["a", "b", "c"])
    session.set_up()
    first = {}

    def keep(site: str, result: bytes) -> bytes:
        first[site] = result
        return result

    _broadcast(session, b"first", keep)
    with pytest.raises(SecAggSecurityError, match="not signed by the session's leader"):
        _broadcast(session, b"second", lambda s, r: first[s] if s == "c" else r)  # replay of call 1
    session = open_session(["a", "b", "c"])
    session.set_up()
    with pytest.raises(SecAggSecurityError):
        _broadcast(session, b"ok", lambda s, r: b"evil" + r[4:] if s == "b" else r)


def test_equivocation_garbles_every_later_sum_and_fails_the_end_at_every_honest_site() -> None:
    session = open_session(["a", "b", "c", "d"])
    session.set_up()
    values = {s: np.arange(4, dtype=np.float64) for s in session.names}

    def lie_to_b(site: str, result: bytes) -> bytes:
        if site != "b":
            return result
        forged = bytearray(result)
        forged[0] ^= 1
        return bytes(forged)

    session.secure_sum(values, tamper=lie_to_b)
    later = session.secure_sum(values)
    true_sum = fixed_point_sum(list(values.values()))
    # b's masks no longer cancel with anyone's: the relay's sum (what every site decodes) is noise
    assert not np.allclose(later["a"], true_sum)
    bodies = {s: site.prepare_end() for s, site in session.sites.items()}
    index = session.sites["a"].pending_index
    session.post(bodies, index)
    result = session.result(index)
    for s in session.names:
        with pytest.raises(SecAggSecurityError, match="different results"):
            session.sites[s].complete_end(result)


def test_an_honest_session_ends_cleanly_and_counts_its_calls() -> None:
    session = open_session(["a", "b", "c"])
    session.set_up()
    session.secure_sum({s: np.ones(2) for s in session.names})
    bodies = {s: site.prepare_barrier() for s, site in session.sites.items()}
    session.post(bodies, 2)
    for site in session.sites.values():
        site.complete_barrier(session.result(2))
    session.end()
    assert session.relay.done
    assert session.relay.calls == 2
    with pytest.raises(SecAggProtocolError, match="ended"):
        session.sites["a"].prepare_barrier()


# --- wire -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"", b"FHCS", b"XXXX\x02\x00\x00\x00", b"FHCS\x09\x00\x00\x00", b"FHCS\x02\x01\x00\x00"]
)
def test_malformed_calls_are_refused(body: bytes) -> None:
    with pytest.raises(SecAggMessageError):
        decode_call(body)


def test_config_digest_binds_every_field() -> None:
    base = make_config(["a", "b", "c"], attempt="x")
    digests = {base.digest()}
    for change in (
        {"study_id": "study-2"},
        {"round": 2},
        {"attempt": "y"},
        {"spec_hash": "cd" * 32},
        {"sites": ("a", "b", "d")},
        {"collusion": 1},
    ):
        fields = {**base.to_json(), **change}
        fields["sites"] = tuple(fields["sites"])
        digests.add(CollectiveConfig(**fields).digest())
    assert len(digests) == 7


def test_relay_needs_the_participants_identities() -> None:
    config = make_config(["a", "b", "c"])
    with pytest.raises(ConfigError):
        CollectiveRelay(config, {"a": IdentityKey.generate().public()})
