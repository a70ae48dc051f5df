"""The in-memory collectives (threads, real masks and relay): what a collective recipe sees in tests and in
the in-process runner."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedhealth.learning import (
    COLLECTIVE_PROBE_RECIPE,
    BenchmarkCollectives,
    Collectives,
    InMemorySession,
    ProbeParams,
    SessionContext,
    probe_expected,
    run_in_memory,
)
from fedhealth.secagg import FixedPointRangeError, SessionFailedError, SessionFailure

SITES = ["hospital-b", "hospital-a", "hospital-c"]


def test_every_site_gets_the_same_exact_sum_and_the_leaders_broadcast() -> None:
    def program(session: Collectives) -> tuple[np.ndarray, bytes]:
        mine = np.full((2, 2), float(session.sites.index(session.site)) + 0.25)
        total = session.secure_sum(mine)
        session.barrier()
        note = session.broadcast(b"from the leader" if session.site == session.sites[0] else None)
        return total, note

    results = run_in_memory(SITES, program)
    assert set(results) == set(SITES)
    for total, note in results.values():
        assert total.tolist() == [[3.75, 3.75], [3.75, 3.75]]
        assert note == b"from the leader"


def test_participants_are_sorted_and_the_first_leads() -> None:
    seen = run_in_memory(SITES, lambda s: (s.site, s.sites))
    assert {sites for _, sites in seen.values()} == {("hospital-a", "hospital-b", "hospital-c")}
    assert isinstance(InMemorySession(SITES).member("hospital-a"), BenchmarkCollectives)


def test_a_failing_site_program_fails_the_session_for_everyone_with_its_own_error() -> None:
    reasons: list[str] = []

    def program(session: Collectives) -> None:
        if session.site == "hospital-b":
            session.secure_sum(np.ones(3))
            raise RuntimeError("local bug")
        try:
            for _ in range(3):
                session.secure_sum(np.ones(3))
        except SessionFailedError as exc:
            reasons.append(exc.detail)
            raise

    with pytest.raises(RuntimeError, match="local bug"):
        run_in_memory(SITES, program)
    assert reasons == ["hospital-b's program failed (RuntimeError)"] * 2


def test_a_site_that_stops_answering_fails_the_session_after_the_call_timeout() -> None:
    release = threading.Event()
    failed_after: list[float] = []
    started = time.monotonic()

    def program(session: Collectives) -> None:
        if session.site == "hospital-c":
            release.wait(10)  # stuck (a dead process would never come back)
            return
        try:
            session.secure_sum(np.ones(2))
        except SessionFailedError:
            failed_after.append(time.monotonic() - started)
            release.set()
            raise

    with pytest.raises(SessionFailedError) as caught:
        InMemorySession(SITES, call_timeout_s=0.3).run(program)
    assert caught.value.reason is SessionFailure.SITE_LOST
    assert "hospital-c did not take part in call 1 within 0.3 s" in caught.value.detail
    assert len(failed_after) == 2
    assert max(failed_after) < 5


def test_a_value_out_of_range_is_refused_at_the_site_before_anything_is_sent() -> None:
    def program(session: Collectives) -> None:
        session.secure_sum(np.array([1e9 if session.site == "hospital-a" else 1.0]))

    session = InMemorySession(SITES, call_timeout_s=0.5)
    with pytest.raises(FixedPointRangeError):
        session.run(program)
    assert session.relay.index == 1  # no site's call 1 was completed; a's was never sent


def test_the_probe_recipe_reports_per_call_latency_and_no_mismatch() -> None:
    params = ProbeParams(size=50, calls=4, warmup=1)
    session = InMemorySession(SITES)
    outcomes = session.run(
        lambda s: COLLECTIVE_PROBE_RECIPE.run_site(
            params, None, s, SessionContext(site=s.site, seed=0, rng=np.random.default_rng(0))
        )
    )
    assert {o.record["mismatches_here"] for o in outcomes.values()} == {0}
    assert session.relay.released is not None
    report = COLLECTIVE_PROBE_RECIPE.finish(params, session.relay.released)
    assert report["mismatches"] == 0
    assert report["calls"] == 4
    assert len(report["secure_s"]) == len(report["plain_s"]) == 4  # type: ignore[arg-type]
    assert all(t > 0 for t in report["secure_s"])  # type: ignore[union-attr,operator]
    assert probe_expected(3, 4) == pytest.approx([3.0, 3.003, 3.006, 3.009], abs=1e-11)
