"""Attacks on the audit logs, cross-anchoring, the steward's review rule and the consent registry
(docs/governance.md *The audit logs*, *Cross-anchoring*, *The data steward's commands*, *Consent*), played by
the party that holds the log's key (a malicious orchestrator or site rewriting its own history), by someone
who can write the database but has no key, and by a peer that would like an honest log to look rewritten.

The verification is the one ``fedhealth audit verify --home A --peer B`` runs (``verify_home`` on the homes'
logs with the writer keys pinned from the homes), on two real logs: an orchestrator's with ``round.committed``
entries holding the site's attested heads, and a site's with ``anchor.recorded`` entries holding the
orchestrator's round commitments, exchanged as the services do.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from typer.testing import CliRunner

from fedhealth.agent import review, was_reviewed
from fedhealth.cli._governance import HomeKind, HomeLog, audit_app, verify_home
from fedhealth.core import ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.governance import (
    ApprovalRegistry,
    AuditEventType,
    AuditLog,
    AuditProblem,
    ConsentDecision,
    ConsentRecord,
    ConsentRegistry,
    LogHead,
    commit_round,
    export_stored_log,
    record_anchor,
    spec_hash,
)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SITE = "hospital-a"
runner = CliRunner()


def sql(engine: Engine, statement: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement), params)


@dataclass
class Party:
    """One side's log in its own SQLite file, with its key (what a home holds)."""

    kind: HomeKind
    name: str
    key: IdentityKey
    engine: Engine
    log: AuditLog

    def home(self) -> HomeLog:
        return HomeLog(
            path=Path(self.name), kind=self.kind, name=self.name, engine=self.engine, key=self.key.public()
        )

    def rewrite_from(self, seq: int, entries: int, marker: str = "rewritten") -> None:
        """The writer deletes its history from ``seq`` on and re-signs a new one with its own key."""
        sql(self.engine, "DELETE FROM gov_audit_entries WHERE seq >= :s", s=seq)
        for i in range(entries):
            self.log.append(AuditEventType.CONFIGURATION_CHANGED, {"setting": f"{marker}{i}", "value": i})


def party(tmp_path: Path, template: Path, kind: HomeKind, name: str, clock: ManualClock) -> Party:
    path = tmp_path / f"{name}.sqlite"
    shutil.copyfile(template, path)
    engine = create_engine(f"sqlite:///{path}")
    key = IdentityKey.generate()
    actor = "orchestrator" if kind is HomeKind.ORCHESTRATOR else f"site:{name}"
    return Party(kind, name, key, engine, AuditLog(engine, key, actor, clock, salted=kind is HomeKind.SITE))


@dataclass
class Federation:
    orchestrator: Party
    site: Party
    clock: ManualClock

    def round(self, study: str, number: int) -> None:
        """One round as the services run it: the site works and attests its head; the orchestrator commits
        the round holding that head; the next task carries the commitment, which the site anchors."""
        s, o = self.site.log, self.orchestrator.log
        s.append(AuditEventType.TASK_RECEIVED, {"task_id": f"{study}-{number}", "study_id": study})
        s.append(AuditEventType.TASK_COMPLETED, {"task_id": f"{study}-{number}", "study_id": study})
        attested = s.head()
        o.append(AuditEventType.TASK_COMPLETED, {"task_id": f"{study}-{number}", "study_id": study})
        entry = commit_round(o, study_id=study, round=number, model_digest=None, site_heads={SITE: attested})
        self.clock.advance(1)
        record_anchor(s, study_id=study, round=number, orchestrator_head=entry.head)
        self.clock.advance(1)

    def verify_orchestrator(self):
        return verify_home(self.orchestrator.home(), [self.site.home()])

    def verify_site(self):
        return verify_home(self.site.home(), [self.orchestrator.home()])


@pytest.fixture
def federation(tmp_path: Path, sqlite_template: Path) -> Federation:
    clock = ManualClock(T0)
    fed = Federation(
        orchestrator=party(tmp_path, sqlite_template, HomeKind.ORCHESTRATOR, "orchestrator", clock),
        site=party(tmp_path, sqlite_template, HomeKind.SITE, SITE, clock),
        clock=clock,
    )
    fed.orchestrator.log.append(AuditEventType.ENROLLMENT, {"site": SITE})
    fed.site.log.append(AuditEventType.ENROLLMENT, {"site": SITE})
    for number in (1, 2, 3):
        fed.round("st-1", number)
    # entries after the last anchor: the documented window
    fed.orchestrator.log.append(AuditEventType.MODEL_RELEASED, {"model_digest": "ab" * 32})
    return fed


def problem(report) -> tuple[int, AuditProblem] | None:
    return None if report.ok else (report.first_bad.seq, report.first_bad.problem)


# --- the control --------------------------------------------------------------------------------------------


def test_control_both_honest_logs_verify_against_each_others_anchors(federation):
    assert federation.verify_orchestrator().ok
    assert federation.verify_site().ok


# --- the orchestrator rewrites its own log with its own key ------------------------------------------------


def orchestrator_entries(fed: Federation) -> list[tuple[int, str]]:
    with fed.orchestrator.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT seq, type FROM gov_audit_entries ORDER BY seq"))]


def test_an_orchestrator_rewriting_an_anchored_entry_with_its_own_key_is_named(federation):
    o = federation.orchestrator
    first_commit = next(seq for seq, kind in orchestrator_entries(federation) if kind == "round.committed")
    # it rewrites history from the first round on (say, to drop a site's refusal), re-signing it all
    o.rewrite_from(first_commit - 1, 8)
    assert o.log.verify().ok  # the chain alone cannot tell
    found = problem(federation.verify_orchestrator())
    assert found is not None
    assert found[1] is AuditProblem.ANCHOR_MISMATCH


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_an_orchestrator_truncating_its_log_below_an_anchor_is_named(federation, keep):
    sql(federation.orchestrator.engine, "DELETE FROM gov_audit_entries WHERE seq > :k", k=keep)
    found = problem(federation.verify_orchestrator())
    assert found is not None
    assert found[1] in (AuditProblem.ANCHOR_MISSING, AuditProblem.ANCHOR_MISMATCH)


def test_an_orchestrator_dropping_one_entry_and_renumbering_with_its_key_is_named(federation):
    """Drop the round-1 task outcome, then re-append every later entry (re-signed, renumbered)."""
    o = federation.orchestrator
    rows = orchestrator_entries(federation)
    victim = next(seq for seq, kind in rows if kind == "task.completed")
    with o.engine.connect() as conn:
        later = conn.execute(
            text("SELECT type, payload FROM gov_audit_entries WHERE seq > :s ORDER BY seq"), {"s": victim}
        ).all()
    sql(o.engine, "DELETE FROM gov_audit_entries WHERE seq >= :s", s=victim)
    for kind, payload in later:
        body = json.loads(payload)
        o.log.append(AuditEventType(kind), body)
    assert o.log.verify().ok
    found = problem(federation.verify_orchestrator())
    assert found is not None
    assert found[1] is AuditProblem.ANCHOR_MISMATCH


def test_an_orchestrator_swapping_two_anchored_entries_is_named(federation):
    o = federation.orchestrator
    sql(o.engine, "UPDATE gov_audit_entries SET seq = -1 WHERE seq = 2")
    sql(o.engine, "UPDATE gov_audit_entries SET seq = 2 WHERE seq = 3")
    sql(o.engine, "UPDATE gov_audit_entries SET seq = 3 WHERE seq = -1")
    assert problem(federation.verify_orchestrator()) is not None


# --- the site rewrites its own log with its own key ---------------------------------------------------------


def test_a_site_rewriting_its_log_before_an_attested_head_is_named(federation):
    s = federation.site
    s.rewrite_from(3, 12)
    assert s.log.verify().ok
    found = problem(federation.verify_site())
    assert found is not None
    assert found[1] is AuditProblem.ANCHOR_MISMATCH


def test_a_site_truncating_its_log_below_an_attested_head_is_named(federation):
    sql(federation.site.engine, "DELETE FROM gov_audit_entries WHERE seq > 2")
    found = problem(federation.verify_site())
    assert found is not None
    assert found[1] is AuditProblem.ANCHOR_MISSING


# --- someone with write access to the database but no key ---------------------------------------------------


def test_a_key_planted_in_the_database_does_not_make_forged_entries_verify_under_the_home_key(federation):
    """Another account that can write the SQLite file registers its own key and appends an entry signed with
    it: verification under the home's pinned key names it."""
    intruder = IdentityKey.generate()
    forged = AuditLog(federation.site.engine, intruder, f"site:{SITE}", federation.clock)
    forged.append(AuditEventType.CONSENT_IMPORTED, {"source": "forged", "added": 0})
    found = problem(federation.verify_site())
    assert found is not None
    assert found[1] is AuditProblem.UNKNOWN_SIGNER


def test_an_export_rewritten_and_re_signed_with_another_key_fails_under_the_pinned_key(
    federation, tmp_path, sqlite_template
):
    """The export's header names its keys; an attacker re-signs the whole log with its own key and writes
    that key into the header. ``audit verify --file --key REAL`` names the first entry."""
    clock = ManualClock(T0)
    attacker = party(tmp_path, sqlite_template, HomeKind.SITE, "forged", clock)
    attacker.log.append(AuditEventType.ENROLLMENT, {"site": SITE})
    out = tmp_path / "forged.jsonl"
    export_stored_log(attacker.engine, out)
    real = federation.site.key.public().raw.hex()
    result = runner.invoke(audit_app, ["verify", "--file", str(out), "--key", real])
    assert result.exit_code == 1, result.output
    assert "unknown_signer" in result.output
    # control: the genuine export verifies under the same pinned key
    genuine = tmp_path / "site.jsonl"
    export_stored_log(federation.site.engine, genuine)
    assert runner.invoke(audit_app, ["verify", "--file", str(genuine), "--key", real]).exit_code == 0


def test_an_export_truncated_below_an_anchor_given_on_the_command_line_fails(federation, tmp_path):
    out = tmp_path / "site.jsonl"
    export_stored_log(federation.site.engine, out)
    head = federation.site.log.head()
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-4]) + "\n")
    real = federation.site.key.public().raw.hex()
    result = runner.invoke(
        audit_app, ["verify", "--file", str(out), "--key", real, "--anchor", f"{head.seq}:{head.entry_hash}"]
    )
    assert result.exit_code == 1, result.output
    assert "anchor_missing" in result.output


# --- a peer framing an honest log ---------------------------------------------------------------------------


@pytest.mark.parametrize("framed", ["site", "orchestrator"])
def test_a_peer_cannot_make_an_honest_log_look_rewritten(federation, framed):
    fed = federation
    if framed == "site":
        # the orchestrator's round record claims a head of the site's log that the site never attested
        real = fed.site.log.head()
        fake = LogHead(seq=real.seq - 1, entry_hash="0f" * 32)
        commit_round(
            fed.orchestrator.log, study_id="st-1", round=4, model_digest=None, site_heads={SITE: fake}
        )
        report = fed.verify_site()
    else:
        # the site's log claims it anchored an orchestrator head the orchestrator never committed
        real = fed.orchestrator.log.head()
        record_anchor(
            fed.site.log,
            study_id="st-1",
            round=4,
            orchestrator_head=LogHead(seq=real.seq - 1, entry_hash="0f" * 32),
        )
        report = fed.verify_orchestrator()
    # the framed side's own log is untouched: its chain verifies alone ...
    assert (fed.site if framed == "site" else fed.orchestrator).log.verify().ok
    # ... so verification against the peer must not name it as rewritten
    assert problem(report) is None or problem(report)[1] is not AuditProblem.ANCHOR_MISMATCH


# --- the steward's review -----------------------------------------------------------------------------------


@pytest.fixture
def site_registry(tmp_path: Path, sqlite_template: Path) -> tuple[ApprovalRegistry, AuditLog]:
    clock = ManualClock(T0)
    p = party(tmp_path, sqlite_template, HomeKind.SITE, SITE, clock)
    return ApprovalRegistry(p.engine, p.log), p.log


def spec(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "sepsis-risk", "owner": "alice", "dataset": "icu-2024", "rounds": 3}
    return {**base, **changes}


def test_reviewing_one_spec_does_not_count_as_reviewing_another(site_registry):
    registry, log = site_registry
    shown, other = spec(), spec(rounds=30)
    a = registry.submit(shown).spec_hash
    b = registry.submit(other).spec_hash
    review(registry, log, a, steward="dana")
    assert was_reviewed(log.engine, a)
    assert not was_reviewed(log.engine, b)


def test_a_spec_named_after_another_specs_hash_does_not_stand_in_for_its_review(site_registry):
    """The review check looks for the hash in the ``study.reviewed`` payloads: a spec whose own name (and
    so its review entry) carries the other spec's hash prefix must not count as a review of that spec."""
    registry, log = site_registry
    target = spec(rounds=30)
    digest = spec_hash(target)
    registry.submit(target)
    decoy = registry.submit(spec(name=digest[:63])).spec_hash  # a name holds at most 63 characters
    review(registry, log, decoy, steward="dana")
    assert not was_reviewed(log.engine, digest)


def test_a_later_rejection_revokes_and_only_the_latest_decision_counts(site_registry):
    registry, _ = site_registry
    digest = registry.submit(spec()).spec_hash
    registry.approve(digest, reason="IRB-1", steward="dana")
    registry.reject(digest, reason="revoked", steward="dana")
    assert not registry.check(spec()).allowed
    registry.approve(digest, reason="IRB-2", steward="dana")
    assert registry.check(spec()).allowed
    # a decision on one hash says nothing of a spec differing anywhere
    assert not registry.check(spec(rounds=4)).allowed
    assert not registry.check({**spec(), "extra": None}).allowed


# --- consent withdrawal against records the attacker or the EHR could add -----------------------------------


@pytest.fixture
def consent(tmp_path: Path, sqlite_template: Path) -> tuple[ConsentRegistry, ManualClock]:
    clock = ManualClock(T0)
    p = party(tmp_path, sqlite_template, HomeKind.SITE, SITE, clock)
    return ConsentRegistry(p.engine, p.log), clock


def test_a_withdrawal_is_not_undone_by_reimporting_the_same_fhir_consent(consent):
    registry, clock = consent
    resource = {
        "resourceType": "Consent",
        "id": "c-1",
        "status": "active",
        "scope": {"coding": [{"code": "research"}]},
        "category": [{"coding": [{"code": "59284-0"}]}],
        "patient": {"reference": "Patient/p0003"},
        "provision": {"type": "permit", "purpose": [{"code": "research"}]},
    }
    registry.import_fhir(resource)
    assert registry.filter(["p0003"], "research", clock.now()).kept_count == 1  # control
    clock.advance(60)
    registry.withdraw("p0003")
    clock.advance(60)
    registry.import_fhir(resource)  # the EHR's nightly export sends the unchanged resource again
    clock.advance(60)
    assert registry.filter(["p0003"], "research", clock.now()).kept_count == 0


def test_a_withdrawal_for_every_purpose_also_ends_a_permit_that_starts_later(consent):
    registry, _ = consent
    start = T0 + timedelta(days=30)
    registry.add(
        [
            ConsentRecord(
                patient_id="p0003", purpose="research", decision=ConsentDecision.PERMIT, valid_from=start
            )
        ]
    )
    registry.withdraw("p0003")
    assert registry.filter(["p0003"], "research", start + timedelta(days=1)).kept_count == 0


def test_a_purpose_withdrawal_also_ends_an_any_purpose_permit_that_starts_later(consent):
    registry, _ = consent
    start = T0 + timedelta(days=30)  # e.g. a FHIR Consent with provision.period.start next month, no purpose
    registry.add(
        [ConsentRecord(patient_id="p0003", purpose="*", decision=ConsentDecision.PERMIT, valid_from=start)]
    )
    assert registry.filter(["p0003"], "research", start + timedelta(days=1)).kept_count == 1  # control
    registry.withdraw("p0003", purpose="research")
    assert registry.filter(["p0003"], "research", start + timedelta(days=1)).kept_count == 0
