"""Attacks on the masked collective sessions (federated statistics, boosting) by a lying relay or a malicious
site, in memory with the real masks and relay (docs/secure-aggregation.md, "Collective sessions";
docs/statistics.md, "The minimum-cell-count rule" and "What the orchestrator and the hospitals see").

Not repeated here: what tests/secagg/test_collective.py, tests/learning/test_boosting_attacks.py and
tests/agent/test_collective_checks.py already cover (equivocation, forged or replayed broadcasts within a
session, set-up substitutions, participants other than the spec's).
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any

import numpy as np
import pytest
from collective_session import open_session

from fedhealth.core import InputError
from fedhealth.crypto import IdentityKey
from fedhealth.data import TabularDataset
from fedhealth.learning import STATS_RECIPE, InMemorySession, SessionContext, StatsParams
from fedhealth.learning._stats import centre_and_half_width, join_limbs, strata
from fedhealth.secagg import (
    SUM_TAGS,
    CollectiveConfig,
    CollectiveRelay,
    CollectiveSite,
    SecAggProtocolError,
    SecAggSecurityError,
    SessionFailedError,
    decode_fixed,
    encode_fixed,
)

SITES = ("site-a", "site-b", "site-c")
EDGES = [0.0, 50.0, 100.0, 150.0]  # public edges: centre 75
VICTIM_AGE = 137.25  # the one label-1 record of the federation, at site-b
K = 5
ONE = 1 << 40  # one unit of the 2^-40 fixed point
COUNTS = 2  # the counts' call: after the set-up (0) and the checked sums' key (1)


def _dataset(name: str, ages: list[float], labels: list[int]) -> TabularDataset:
    X = np.array(ages, dtype=np.float64).reshape(-1, 1)
    y = np.array(labels, dtype=np.int64)
    return TabularDataset(
        name=name,
        X_train=X,
        y_train=y,
        X_test=np.zeros((0, 1)),
        y_test=np.zeros(0, dtype=np.int64),
        feature_names=("age",),
    )


def _datasets() -> dict[str, TabularDataset]:
    """Label 0 everywhere but one record of site-b: the label-1 stratum counts 1 record (suppressed at k=5),
    and so does site-b's own label-1 stratum."""
    return {
        "site-a": _dataset("a", [40.0 + i for i in range(8)], [0] * 8),
        "site-b": _dataset("b", [60.0 + i for i in range(7)] + [VICTIM_AGE], [0] * 7 + [1]),
        "site-c": _dataset("c", [20.0 + 3 * i for i in range(9)], [0] * 9),
    }


def _ctx(site: str) -> SessionContext:
    return SessionContext(site=site, seed=0, rng=np.random.default_rng(0), noise=None)


def _victim_figure() -> float:
    centre, _ = centre_and_half_width(np.array(EDGES))
    return VICTIM_AGE - centre  # the sum of x - c over a cell that holds the victim alone


def _sums_of(result: bytes, n: int) -> np.ndarray:
    """A stats checked sum's result as the orchestrator reads it: the check values dropped, the ring
    decoded, the three limbs joined."""
    ring = np.frombuffer(result, dtype="<u8").astype(np.uint64)[:-SUM_TAGS]
    decoded = decode_fixed(ring)
    return join_limbs(decoded.reshape(3, -1), n)


class _ForgingRelay(InMemorySession):
    """The orchestrator's relay, computing every sum honestly but answering every site the *same* forged
    first sum (the stats counts): each count from 1 to k-1 becomes k. Every site is sent the same bytes, so
    the chains agree and the closing check passes. It records the true result of every call it computed."""

    def __init__(self, sites: tuple[str, ...]) -> None:
        super().__init__(sites, call_timeout_s=30)
        self.true_results: dict[int, bytes] = {}
        self.forged: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def exchange(self, site: str, index: int, body: bytes) -> bytes | memoryview:
        result = bytes(super().exchange(site, index, body))
        with self._lock:
            self.true_results.setdefault(index, result)
            if index != COUNTS:  # call 0 is the set-up, 1 the checked sums' key, 2 the counts
                return result
            if index not in self.forged:
                words = np.frombuffer(result, dtype="<u8").view(np.int64).copy()
                limbs = words[:-SUM_TAGS].reshape(3, -1)  # the check values after them: it cannot redo those
                low = limbs[2]
                small = (limbs[0] == 0) & (limbs[1] == 0) & (low >= ONE) & (low < K * ONE)
                low[small] = K * ONE
                self.forged[index] = words.view(np.uint64).astype("<u8").tobytes()
            return self.forged[index]


def test_a_relay_forging_the_count_sum_cannot_make_sites_sum_the_values_of_a_suppressed_cell() -> None:
    params = StatsParams(features=["age"], bins={"age": EDGES}, by_label=True, min_cell_count=K)
    datasets = _datasets()
    session = _ForgingRelay(SITES)
    # a site that detects the forgery and fails the session is a fine outcome
    with contextlib.suppress(SessionFailedError, SecAggSecurityError, InputError):
        session.run(lambda m: STATS_RECIPE.run_site(params, datasets[m.site], m, _ctx(m.site)))
    assert session.forged, "the relay never forged the count sum"
    moments = session.true_results.get(COUNTS + 1, b"")  # the moments (a barrier if no cell was wanted)
    seen = [_sums_of(moments, len(SITES))] if moments else []
    # what the orchestrator learns from every later sum: never the lone label-1 record's age
    for sums in seen:
        assert not np.any(np.isclose(sums, _victim_figure(), atol=1e-6)), sums
    # nor is it released to the researcher
    if session.relay.released is not None:
        report = json.loads(session.relay.released)
        [label_1] = [s for s in report["strata"] if s["stratum"] == {"label": 1, "site": None}]
        assert label_1["features"]["age"]["mean"]["suppressed"]


def test_without_a_forgery_the_lone_record_is_suppressed_and_its_value_never_summed() -> None:
    """The control of the test above: the honest relay's sums never hold the lone record's value."""

    class _Recording(InMemorySession):
        def __init__(self) -> None:
            super().__init__(SITES, call_timeout_s=30)
            self.results: dict[int, bytes] = {}

        def exchange(self, site: str, index: int, body: bytes) -> bytes | memoryview:
            result = bytes(super().exchange(site, index, body))
            self.results.setdefault(index, result)
            return result

    params = StatsParams(features=["age"], bins={"age": EDGES}, by_label=True, min_cell_count=K)
    datasets = _datasets()
    session = _Recording()
    session.run(lambda m: STATS_RECIPE.run_site(params, datasets[m.site], m, _ctx(m.site)))
    for index, result in session.results.items():
        if index in (COUNTS, COUNTS + 1) and result:
            assert not np.any(np.isclose(_sums_of(result, 3), _victim_figure(), atol=1e-6))
    report = json.loads(session.relay.released or b"{}")
    [label_1] = [s for s in report["strata"] if s["stratum"] == {"label": 1, "site": None}]
    assert label_1["rows"]["suppressed"]
    assert label_1["features"]["age"]["mean"]["suppressed"]


class _PaddingSite:
    """A malicious participant's collectives: honest but for the first secure sum, where it adds ``pad``
    phantom records to another hospital's per-site stratum (a cell only that hospital fills). It keeps every
    sum it receives."""

    def __init__(self, inner: Any, positions: list[int], pad: float) -> None:
        self._inner = inner
        self._positions = positions
        self._pad = pad
        self._calls = 0
        self.received: list[np.ndarray] = []

    @property
    def site(self) -> str:
        return str(self._inner.site)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self._inner.sites)

    def checked_sum(self, values: Any) -> np.ndarray:
        values = np.array(values, dtype=np.float64)
        if self._calls == 0:
            for at in self._positions:
                values[2, at] += self._pad  # the low limb: counts are small integers
        self._calls += 1
        total = self._inner.checked_sum(values)
        self.received.append(join_limbs(np.asarray(total), len(self.sites)))
        return np.asarray(total)

    def broadcast(self, data: bytes | None) -> bytes:
        return bytes(self._inner.broadcast(data))

    def barrier(self) -> None:
        self._inner.barrier()


def test_a_malicious_site_cannot_unsuppress_another_hospitals_per_site_cell() -> None:
    params = StatsParams(features=["age"], bins={"age": EDGES}, by_label=True, by_site=True, min_cell_count=K)
    layout = strata(params, SITES)
    block = 1 + (2 + len(EDGES) + 1)  # rows, then per feature observed, missing and the histogram
    target = layout.index(next(s for s in layout if s.label == 1 and s.site == "site-b"))
    positions = [target * block, target * block + 1]  # site-b's label-1 rows and observed count
    datasets = _datasets()
    session = InMemorySession(SITES, call_timeout_s=30)
    spies: dict[str, _PaddingSite] = {}

    def program(member: Any) -> Any:
        if member.site == "site-c":
            member = spies.setdefault("site-c", _PaddingSite(member, positions, K - 1.0))
        return STATS_RECIPE.run_site(params, datasets[member.site], member, _ctx(member.site))

    # site-b noticing its own cell's count is wrong, and failing the session, is a fine outcome
    with contextlib.suppress(SessionFailedError, SecAggSecurityError, InputError):
        session.run(program)
    attacker = spies["site-c"]
    for sums in attacker.received[1:]:  # the moments, and anything after
        assert not np.any(np.isclose(sums, _victim_figure(), atol=1e-6)), sums


# --- what the relay can and cannot do to one call -----------------------------------------------------------


def test_a_relay_sending_every_site_the_same_wrong_sum_is_not_detected_as_documented() -> None:
    """docs/secure-aggregation.md ("Equivocation"): a site cannot check the sum itself; the *same* wrong sum
    to every site (here: the previous call's sum replayed) keeps the chains equal and the session ends
    cleanly. A documented limitation, pinned here so that a change of behaviour is noticed."""
    session = open_session(["a", "b", "c"])
    session.set_up()
    first = {s: np.full(3, float(i + 1)) for i, s in enumerate(session.names)}
    got = session.secure_sum(first)
    assert all(np.array_equal(v, np.full(3, 6.0)) for v in got.values())
    replay = session.result(1)
    second = {s: np.full(3, 100.0) for s in session.names}
    got = session.secure_sum(second, tamper=lambda site, result: replay)
    assert all(np.array_equal(v, np.full(3, 6.0)) for v in got.values())  # not 300: nobody can tell
    session.end()  # and the closing check passes


def test_a_site_re_sending_a_call_with_another_body_neither_counts_twice_nor_replaces_its_first() -> None:
    session = open_session(["a", "b", "c"])
    session.set_up()
    values = {"a": np.full(4, 1.0), "b": np.full(4, 2.0), "c": np.full(4, 4.0)}
    bodies = {s: session.sites[s].prepare_sum(v) for s, v in values.items()}
    session.relay.receive("a", 1, bodies["a"])
    # a malicious (or confused) a: its call again, with another vector, then the vector of b it copied
    forged = bytes(bodies["a"][:8]) + encode_fixed(np.full(4, 1000.0), 3).astype("<u8").tobytes()
    assert session.relay.receive("a", 1, forged) is False
    assert session.relay.receive("a", 1, bodies["b"]) is False
    assert session.relay.result(1) is None  # b and c have not sent: no answer yet, to anyone
    assert session.relay.missing() == ["b", "c"]
    session.relay.receive("b", 1, bodies["b"])
    assert session.relay.result(1) is None
    session.relay.receive("c", 1, bodies["c"])
    result = session.result(1)
    for s, site in session.sites.items():
        assert np.array_equal(site.complete_sum(result), np.full(4, 7.0)), s


def test_a_non_participant_cannot_contribute_to_or_complete_a_call() -> None:
    session = open_session(["a", "b", "c"])
    session.set_up()
    bodies = {s: session.sites[s].prepare_sum(np.ones(2)) for s in ("a", "b")}
    session.post(bodies, 1)
    with pytest.raises(SecAggProtocolError, match="not a participant"):
        session.relay.receive("mallory", 1, bodies["a"])
    assert session.relay.result(1) is None
    assert session.relay.missing() == ["c"]


def test_a_wrong_length_sum_from_one_site_fails_the_session_naming_it_and_drops_the_partial_sum() -> None:
    session = open_session(["a", "b", "c", "d"])
    session.set_up()
    good = {s: session.sites[s].prepare_sum(np.full(6, 3.0)) for s in ("a", "b")}
    session.post(good, 1)
    bad = bytes(good["a"][:8]) + b"\x01" * (8 * 6 + 3)  # not a uint64 vector
    with pytest.raises(SessionFailedError, match="c sent a sum that is not a uint64 vector") as info:
        session.relay.receive("c", 1, bad)
    assert info.value.reason.value == "protocol_violation"
    assert session.relay._acc is None  # nothing over a subset of the sites is kept
    with pytest.raises(SessionFailedError):
        session.relay.result(1)


def test_an_out_of_ring_vector_from_a_malicious_site_garbles_the_sum_but_hides_the_others() -> None:
    """A site that sends raw ring words (here: the int64 extremes, NaN's bit pattern as a 'value') instead
    of its masked fixed point controls the sum, and the relay cannot tell. What every participant gets is its
    words plus the others' values: no other site's own vector."""
    session = open_session(["a", "b", "c", "d"])
    session.set_up()
    values = {s: np.arange(4, dtype=np.float64) * (i + 1) for i, s in enumerate(session.names)}
    bodies = {s: session.sites[s].prepare_sum(values[s]) for s in ("a", "b", "c")}
    garbage = np.array([2**63 - 1, 2**63, 0x7FF8000000000001, 2**64 - 1], dtype=np.uint64)
    session.sites["d"].prepare_sum(values["d"])  # d's own masks, which it throws away
    bodies["d"] = bytes(bodies["a"][:8]) + garbage.astype("<u8").tobytes()
    session.post(bodies, 1)
    result = np.frombuffer(session.result(1), dtype="<u8")
    honest = np.sum([encode_fixed(values[s], 4) for s in ("a", "b", "c")], axis=0, dtype=np.uint64)
    # the result is not any honest site's vector, nor their plain sum: d's masks with them never cancel
    for s in ("a", "b", "c"):
        assert not np.any(result == encode_fixed(values[s], 4))
    assert not np.any(result == honest)


# --- session identity: another study, another session ------------------------------------------------------


def _site_set(config: CollectiveConfig, keys: dict[str, IdentityKey]) -> dict[str, CollectiveSite]:
    identities = {s: k.public() for s, k in keys.items()}
    return {s: CollectiveSite(config, s, keys[s], identities) for s in config.sites}


def test_a_session_id_reused_by_another_study_binds_nothing_across_them() -> None:
    """The orchestrator gives two studies (same sites, same keys, same spec hash and round) the same
    attempt id. The set-up adverts and the leader's broadcasts of one are refused by the other."""
    keys = {s: IdentityKey.generate() for s in ("a", "b", "c")}
    identities = {s: k.public() for s, k in keys.items()}
    common = {"round": 1, "attempt": "f" * 16, "spec_hash": "ab" * 32, "sites": ("a", "b", "c")}
    one = CollectiveConfig(study_id="study-one", **common)  # type: ignore[arg-type]
    two = CollectiveConfig(study_id="study-two", **common)  # type: ignore[arg-type]
    first, second = _site_set(one, keys), _site_set(two, keys)
    relay_one, relay_two = CollectiveRelay(one, identities), CollectiveRelay(two, identities)
    for s in ("a", "b", "c"):
        relay_one.receive(s, 0, first[s].advertise())
    set_up_one = bytes(relay_one.result(0) or b"")
    for s in ("a", "b", "c"):
        first[s].establish(set_up_one)
    # study one's adverts, relayed into study two's set-up (each is validly signed by its site)
    for s in ("a", "b"):
        relay_two.receive(s, 0, second[s].advertise())
    with pytest.raises(SessionFailedError, match="another session"):
        relay_two.receive("c", 0, _advert_body(set_up_one, 2))
    # and a site of study two shown study one's set-up refuses it
    with pytest.raises(SecAggSecurityError):
        second["a"].establish(set_up_one)
    # a broadcast study one's leader signed for call 1 is refused by study two's sites at call 1
    fresh = _site_set(two, keys)
    relay = CollectiveRelay(two, identities)
    for s, site in fresh.items():
        relay.receive(s, 0, site.advertise())
    set_up_two = bytes(relay.result(0) or b"")
    for site in fresh.values():
        site.establish(set_up_two)
    bodies_one = {s: first[s].prepare_broadcast(b"released" if s == "a" else None) for s in first}
    for s, body in bodies_one.items():
        relay_one.receive(s, 1, body)
    signed_in_one = bytes(relay_one.result(1) or b"")
    fresh["b"].prepare_broadcast(None)
    with pytest.raises(SecAggSecurityError, match="not signed by the session's leader"):
        fresh["b"].complete_broadcast(signed_in_one)


def _advert_body(set_up: bytes, position: int) -> bytes:
    """The call body carrying the advert at ``position`` of a set-up result."""
    from fedhealth.secagg._session import CollectiveOp, SessionAdvert, encode_call

    advert = SessionAdvert.from_json(json.loads(set_up)[position])
    return encode_call(CollectiveOp.SETUP, advert.to_bytes())
