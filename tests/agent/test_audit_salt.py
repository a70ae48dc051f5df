"""A site hands its log's head (an entry's hash) to the orchestrator with every task, and its log holds
patient ids (a consent withdrawal) and error texts. An unsalted entry's hash can be tested against guesses:
an orchestrator that knows every other field (the withdrawal notice it was sent, the time to the second)
finds the patient among a dictionary of ids. Every entry of a site's log carries 128 random bits, so it
cannot (docs/privacy.md, the attestation row of "What leaves a site")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from site_fixtures import make_home
from sqlalchemy import create_engine

from fedhealth.agent._governance import SiteGovernance
from fedhealth.core import ManualClock, canonical_json, sha256_hex
from fedhealth.crypto import IdentityKey
from fedhealth.governance import AuditEventType, AuditLog, create_governance_tables
from fedhealth.governance._audit import entry_body
from fedhealth.governance._timefmt import format_instant

T = datetime(2026, 12, 6, 9, 30, 15, 123456, tzinfo=UTC)
PATIENTS = [f"PAT-{i:04d}" for i in range(2000)]  # the hospital's id range, as an attacker would list it


def _withdrawal(patient: str) -> dict[str, object]:
    return {
        "patient_id": patient,
        "purpose": "research",
        "withdrawn_at": format_instant(T),
        "notice_id": "wd-known-to-the-orchestrator",
        "affected_snapshots": ["a" * 64],
    }


def _log(tmp_path, *, salted: bool) -> AuditLog:
    engine = create_engine(f"sqlite:///{tmp_path / 'site.sqlite'}")
    create_governance_tables(engine)
    return AuditLog(engine, IdentityKey.generate(), "site:ward-7", ManualClock(T), salted=salted)


def _guess(log: AuditLog, before: str, after: str, seq: int, signer: str) -> list[str]:
    """The orchestrator's attack: every field but the patient known (the entry's time to the microsecond,
    the most it could know), each candidate id hashed and compared with the head it was sent."""
    found = []
    for patient in PATIENTS:
        body = entry_body(
            seq=seq,
            time=format_instant(T),
            actor=log.actor,
            type=AuditEventType.CONSENT_WITHDRAWN.value,
            payload=_withdrawal(patient),
            prev_hash=before,
            signer=signer,
        )
        if sha256_hex(canonical_json(body)) == after:
            found.append(patient)
    return found


@pytest.mark.parametrize("salted", [False, True])
def test_a_withdrawn_patient_cannot_be_found_from_the_head_of_a_salted_log(tmp_path, salted):
    log = _log(tmp_path, salted=salted)
    first = log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t1", "study_id": "s1"})
    entry = log.append(AuditEventType.CONSENT_WITHDRAWN, _withdrawal("PAT-1377"))
    assert log.head().entry_hash == entry.entry_hash  # what the next task's attestation carries
    found = _guess(log, first.entry_hash, entry.entry_hash, entry.seq, entry.signer)
    if salted:
        assert found == []
        salt = entry.payload["salt"]
        assert len(salt) == 32
        assert set(salt) <= set("0123456789abcdef")
        assert log.verify().ok  # the salt is part of what each hash and signature covers
    else:  # the control: without the salt the attack names the patient
        assert found == ["PAT-1377"]


def test_two_identical_entries_of_a_salted_log_have_different_salts_and_hashes(tmp_path):
    log = _log(tmp_path, salted=True)
    a = log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t1", "study_id": "s1"})
    b = log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t1", "study_id": "s1"})
    assert a.payload["salt"] != b.payload["salt"]
    assert {k: v for k, v in a.payload.items() if k != "salt"} == {"task_id": "t1", "study_id": "s1"}


def test_every_entry_of_a_sites_own_log_is_salted(tmp_path):
    home = make_home(tmp_path / "site")
    with SiteGovernance(home, clock=ManualClock(T + timedelta(days=1))) as governance:
        governance.log.append(AuditEventType.TASK_RECEIVED, {"task_id": "t1", "study_id": "s1"})
        entries = governance.log.entries()
    assert len(entries) >= 2  # the enrollment record and the task
    assert all(len(e.payload.get("salt", "")) == 32 for e in entries)
