"""Collective sessions through the real services: four agent processes, the orchestrator over HTTPS.

The orchestrator's relay is instrumented from outside (``relay_capture/sitecustomize.py``, loaded through
PYTHONPATH) to record what it was handed, so the tests can compare it with each site's own values: the
orchestrator holds masked vectors and sums, never a site's vector; a site lost mid-session fails the
session for everyone, with the reason, and the call it was lost in is never completed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from support_services import audit_entries

from fedhealth.governance import AuditEntry, AuditEventType, read_stored_log
from fedhealth.learning import probe_values, reload_recipes
from fedhealth.protocol import RecipeSpec, SecureAggregationSpec, StudySpec, StudyStatus, TaskKind, TaskStatus
from fedhealth.runtime import run_collective_in_memory
from fedhealth.secagg import encode_fixed
from fedhealth.sim import LocalFederation, benchmark_collective
from fedhealth.sim._bench import percentile
from support import BREAST_SITES, TOY_COLLECTIVE_RECIPE, TOY_PLUGIN_PATH, breast_datasets

pytestmark = pytest.mark.e2e
SITES = ["site-a", "site-b", "site-c", "site-d"]
CAPTURE_DIR = Path(__file__).with_name("relay_capture")


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("relay") / "relay.jsonl"


@pytest.fixture(scope="module")
def fed(tmp_path_factory, capture):
    path = os.pathsep.join(p for p in (str(CAPTURE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "FEDHEALTH_TEST_RELAY_CAPTURE": str(capture)}
    with LocalFederation(tmp_path_factory.mktemp("collective"), env=env) as fed:
        fed.start_orchestrator()
        for site in SITES:
            fed.add_site(site)
            fed.start_agent(site, {})
        fed.wait_for_sites(SITES)
        yield fed


def _probe(
    fed: LocalFederation, name: str, *, size: int, calls: int, baseline: bool, timeout_s: float
) -> Any:
    spec = StudySpec(
        name=name,
        dataset="none",
        recipe=RecipeSpec(
            name="collective-probe", params={"size": size, "calls": calls, "baseline": baseline}
        ),
        rounds=1,
        train_sites=SITES,
        round_deadline_s=600,
        secure_aggregation=SecureAggregationSpec(site_keys=fed.site_keys(SITES), stage_timeout_s=timeout_s),
    )
    return fed.create_study(spec)


def _records(capture: Path) -> list[dict[str, Any]]:
    if not capture.exists():
        return []
    return [json.loads(line) for line in capture.read_text().splitlines() if line.strip()]


def _session_ended(fed: LocalFederation, study_id: str) -> dict[str, Any]:
    entries = [e for e in audit_entries(fed) if e["type"] == AuditEventType.SESSION_ENDED.value]
    [entry] = [e["payload"] for e in entries if e["payload"]["study_id"] == study_id]
    return entry


def _site_entries(fed: LocalFederation, site: str) -> list[AuditEntry]:
    engine = create_engine(f"sqlite:///{fed.site_home(site).database_path}")
    try:
        return list(read_stored_log(engine).entries)
    finally:
        engine.dispose()


def test_a_session_of_four_real_agents_sums_exactly_and_the_orchestrator_holds_only_masked_vectors(
    fed, capture
):
    capture.unlink(missing_ok=True)
    study = _probe(fed, "probe-exact", size=64, calls=4, baseline=True, timeout_s=60)
    final = fed.wait_for_study(study.study_id, timeout=180, interval=0.2)
    assert final.status is StudyStatus.COMPLETED, final.reason
    [session] = final.rounds
    assert session.kind is TaskKind.COLLECTIVE
    assert {t.status for t in session.tasks} == {TaskStatus.COMPLETED}
    metrics = session.metrics or {}
    assert metrics["mismatches"] == 0  # every site got the exact fixed-point sum, every call
    # (3 warm-up + 4 timed) x (secure + unmasked), the sum of the timings, the report's broadcast
    assert metrics["session"]["calls"] == 7 * 2 + 2

    # what the relay was handed: each secure sum masked in every coordinate; the unmasked baseline (the
    # probe's by design) equal to the site's values, which shows the comparison would catch clear text
    plain = {s: encode_fixed(probe_values(k, 64), 4)[:16].tolist() for k, s in enumerate(SITES)}
    sums = [r for r in _records(capture) if r["event"] == "received" and r["op"] == "SUM"]
    secure = [r for r in sums if r["index"] % 2 == 1 and r["index"] <= 13]
    baseline = [r for r in sums if r["index"] % 2 == 0]
    assert len(secure) == len(baseline) == 7 * 4
    for record in secure:
        assert not any(a == b for a, b in zip(record["head"], plain[record["site"]], strict=True))
    for record in baseline:
        assert record["head"] == plain[record["site"]]

    entry = _session_ended(fed, study.study_id)
    assert entry["outcome"] == "completed"
    assert entry["calls"] == 16
    assert entry["sites"] == SITES
    for site in SITES:  # each site's own log: the session received and completed under the approved spec
        outcomes = [
            e.payload.get("outcome")
            for e in _site_entries(fed, site)
            if e.type is AuditEventType.TASK_COMPLETED and e.payload["study_id"] == study.study_id
        ]
        assert outcomes == ["completed"]


def test_a_site_killed_mid_session_fails_it_for_everyone_with_the_reason_and_nothing_is_revealed(
    fed, capture
):
    capture.unlink(missing_ok=True)
    study = _probe(fed, "probe-killed", size=16, calls=1_000_000, baseline=False, timeout_s=5)
    deadline = time.monotonic() + 60
    while max((r["index"] for r in _records(capture) if r["event"] == "completed"), default=0) < 20:
        assert time.monotonic() < deadline, "the session did not get going"
        time.sleep(0.05)
    victim = fed.agents["site-c"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    final = fed.wait_for_study(study.study_id, timeout=60, interval=0.2)

    assert final.status is StudyStatus.FAILED
    assert "site-c did not take part in collective call" in (final.reason or "")
    [session] = final.rounds
    assert {t.status for t in session.tasks} == {TaskStatus.FAILED}
    assert all("site-c did not take part" in (t.reason or "") for t in session.tasks)

    records = _records(capture)
    completed = max(r["index"] for r in records if r["event"] == "completed")
    lost_at = completed + 1
    at_loss = [r for r in records if r["event"] == "received" and r["index"] == lost_at]
    assert "site-c" not in {r["site"] for r in at_loss}
    assert not [r for r in records if r["event"] == "completed" and r["index"] >= lost_at]  # no partial sum
    plain = {s: encode_fixed(probe_values(k, 16), 4)[:16].tolist() for k, s in enumerate(SITES)}
    sums = [r for r in records if r["event"] == "received" and r["op"] == "SUM"]
    assert len(sums) > 60
    for record in sums:  # every vector the orchestrator held, the survivors' last ones too, was masked
        assert not any(a == b for a, b in zip(record["head"], plain[record["site"]], strict=True))

    entry = _session_ended(fed, study.study_id)
    assert entry["outcome"] == "failed"
    assert entry["calls"] == completed  # the collectives completed before the loss (set-up excluded)
    assert "site-c" in entry["reason"]
    for site in ("site-a", "site-b", "site-d"):  # the survivors' own logs end the session with the failure
        outcomes = [
            e.payload.get("outcome")
            for e in _site_entries(fed, site)
            if e.type is AuditEventType.TASK_COMPLETED and e.payload["study_id"] == study.study_id
        ]
        assert outcomes == ["failed"]

    # the federation goes on: site-c back, a new session completes
    fed.start_agent("site-c", {})
    fed.wait_for_sites(SITES)
    again = _probe(fed, "probe-after", size=8, calls=2, baseline=False, timeout_s=30)
    after = fed.wait_for_study(again.study_id, timeout=120, interval=0.2)
    assert after.status is StudyStatus.COMPLETED, after.reason
    assert (after.rounds[0].metrics or {})["mismatches"] == 0


def test_a_site_revoked_mid_session_fails_the_session_at_once_and_is_refused_at_its_next_call(fed, capture):
    capture.unlink(missing_ok=True)
    study = _probe(fed, "probe-revoked", size=16, calls=1_000_000, baseline=False, timeout_s=5)
    deadline = time.monotonic() + 60
    while max((r["index"] for r in _records(capture) if r["event"] == "completed"), default=0) < 20:
        assert time.monotonic() < deadline, "the session did not get going"
        time.sleep(0.05)
    fed.operator.revoke_site("site-d")
    revoked = time.time()
    final = fed.wait_for_study(study.study_id, timeout=60, interval=0.2)
    assert final.status is StudyStatus.FAILED
    # at the revocation, not at the call's deadline: the reason says why
    assert "site_lost: site-d was revoked or re-keyed during the session" in (final.reason or "")
    # not one call of site-d reached the relay after the revocation, although its token had minutes left
    late = [r for r in _records(capture) if r.get("site") == "site-d" and r["time"] > revoked]
    assert late == []
    fed.agents["site-d"].wait(30)  # refused with 403 at its next call, the agent stops
    assert fed.agents["site-d"].returncode == 3


def test_the_collective_benchmark_times_secure_and_unmasked_sums_in_one_session(tmp_path):
    result = benchmark_collective(sites=3, size=100, calls=3, workdir=tmp_path)
    assert result.mismatches == 0
    assert (result.sites, result.size, result.calls) == (3, 100, 3)
    assert len(result.secure_s) == len(result.plain_s) == 3
    assert 0 < result.secure_median_s <= result.secure_p99_s
    assert result.to_json()["secure_p99_ms"] == result.secure_p99_s * 1e3


def test_p99_is_the_nearest_rank():
    values = [float(v) for v in range(1, 201)]
    assert percentile(values, 0.99) == 198.0
    assert percentile(values, 0.5) == 100.0
    assert percentile([3.0], 0.99) == 3.0


def test_a_third_party_collective_recipe_runs_through_the_services_and_equals_the_in_memory_run(
    tmp_path, monkeypatch
):
    sites = sorted(BREAST_SITES)
    with LocalFederation(tmp_path, log_level="warning", python_path=[TOY_PLUGIN_PATH]) as fed:
        fed.start_orchestrator()
        for site in sites:
            fed.add_site(site)
            fed.start_agent(site, {"breast-cancer": BREAST_SITES[site]})
        fed.wait_for_sites(sites)
        spec = StudySpec(
            name="toy-mean",
            dataset="breast-cancer",
            recipe=RecipeSpec(name=TOY_COLLECTIVE_RECIPE, params={"n_features": 30}),
            rounds=1,
            train_sites=sites,
            round_deadline_s=120,
            secure_aggregation=SecureAggregationSpec(site_keys=fed.site_keys(sites)),
        )
        final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=120, interval=0.2)
    assert final.status is StudyStatus.COMPLETED, final.reason
    released = final.rounds[0].metrics or {}
    monkeypatch.syspath_prepend(str(TOY_PLUGIN_PATH))
    reload_recipes()
    try:
        reference = run_collective_in_memory(spec, breast_datasets(BREAST_SITES))
    finally:
        reload_recipes()
    assert released["means"] == reference["means"]  # bit for bit: the same exact fixed-point sums
    assert released["rows"] == reference["rows"]
