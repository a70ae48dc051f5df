"""Attacks on cross-anchoring by an orchestrator that shows different parties different views of its log
(docs/governance.md *Cross-anchoring*, *Split views*): two forks of its log shown to two sites, an export that
does not extend what a site was shown, an old signed head replayed as a new round's commitment, another
site's round commitment handed to a site, a head of another federation's log, and a site's head filed under
another site's name.

Each side's log is a real SQLite log signed with its own key, exchanged as the services do (the site attests
its head, the orchestrator commits the round, the site anchors the commitment); a fork is the orchestrator's
database copied and continued two ways under the same key. Verification is what ``fedhealth audit verify
--home ORCH --peer SITE_A --peer SITE_B`` runs (``verify_home``), or the CLI on an export.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from test_audit_and_approval_attacks import T0, Party, party, problem, sql
from typer.testing import CliRunner

from fedhealth.cli._governance import HomeKind, anchors_from_peers, audit_app, verify_home
from fedhealth.core import ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.governance import (
    AuditEventType,
    AuditLog,
    AuditProblem,
    LogHead,
    commit_round,
    export_stored_log,
    record_anchor,
)
from fedhealth.governance._audit import _signing_message  # what an audit head's signature covers

A, B = "hospital-a", "hospital-b"
runner = CliRunner()


@dataclass
class TwoSites:
    """An orchestrator and two sites, each with its own log (what their homes hold)."""

    orchestrator: Party
    sites: dict[str, Party]
    clock: ManualClock

    def work(self, site: str, study: str, number: int) -> LogHead:
        """The site does a task of the round and attests its head."""
        log = self.sites[site].log
        log.append(AuditEventType.TASK_RECEIVED, {"task_id": f"{study}-{number}-{site}", "study_id": study})
        log.append(AuditEventType.TASK_COMPLETED, {"task_id": f"{study}-{number}-{site}", "study_id": study})
        return log.head()

    def commit(self, orchestrator: AuditLog, study: str, number: int, heads: dict[str, LogHead]) -> LogHead:
        orchestrator.append(
            AuditEventType.TASK_COMPLETED, {"task_id": f"{study}-{number}", "study_id": study}
        )
        entry = commit_round(orchestrator, study_id=study, round=number, model_digest=None, site_heads=heads)
        self.clock.advance(1)
        return entry.head

    def anchor(self, site: str, study: str, number: int, head: LogHead) -> None:
        """The site logs the commitment its next task carries, as the agent does (it checks nothing)."""
        record_anchor(self.sites[site].log, study_id=study, round=number, orchestrator_head=head)
        self.clock.advance(1)

    def honest_round(self, study: str, number: int, sites: tuple[str, ...] = (A, B)) -> LogHead:
        heads = {site: self.work(site, study, number) for site in sites}
        head = self.commit(self.orchestrator.log, study, number, heads)
        for site in sites:
            self.anchor(site, study, number, head)
        return head

    def verify_orchestrator(self, *sites: str, orchestrator: Party | None = None):
        peers = [self.sites[s].home() for s in (sites or (A, B))]
        return verify_home((orchestrator or self.orchestrator).home(), peers)

    def verify_site(self, site: str):
        return verify_home(self.sites[site].home(), [self.orchestrator.home()])

    def fork(self, tmp_path: Path) -> Party:
        """A second copy of the orchestrator's database, continued under the same key: the other view."""
        o = self.orchestrator
        path = tmp_path / "orchestrator-fork.sqlite"
        o.engine.dispose()
        shutil.copyfile(tmp_path / "orchestrator.sqlite", path)
        engine = create_engine(f"sqlite:///{path}")
        log = AuditLog(engine, o.key, "orchestrator", self.clock)
        return Party(HomeKind.ORCHESTRATOR, "orchestrator", o.key, engine, log)


@pytest.fixture
def fed(tmp_path: Path, sqlite_template: Path) -> TwoSites:
    clock = ManualClock(T0)
    federation = TwoSites(
        orchestrator=party(tmp_path, sqlite_template, HomeKind.ORCHESTRATOR, "orchestrator", clock),
        sites={name: party(tmp_path, sqlite_template, HomeKind.SITE, name, clock) for name in (A, B)},
        clock=clock,
    )
    for name, site in federation.sites.items():
        federation.orchestrator.log.append(AuditEventType.ENROLLMENT, {"site": name})
        site.log.append(AuditEventType.ENROLLMENT, {"site": name})
    federation.honest_round("st-1", 1)
    return federation


def test_control_two_studies_interleaved_at_two_sites_verify_with_their_round_anchors(fed):
    fed.honest_round("st-2", 1, sites=(B,))
    fed.honest_round("st-1", 2)
    fed.honest_round("st-2", 2, sites=(B,))
    assert problem(fed.verify_orchestrator()) is None
    assert problem(fed.verify_site(A)) is None
    assert problem(fed.verify_site(B)) is None


# --- a fork: one view per site ------------------------------------------------------------------------------


def test_two_forks_shown_to_two_sites_are_named_by_the_site_that_saw_the_other_whichever_is_exported(
    fed, tmp_path
):
    """The orchestrator commits round 2 one way in the log it shows hospital-a and the auditor, and another
    way (hospital-b's head where hospital-a's was) in a copy whose head it gives hospital-b. Both forks are
    signed by its key and each verifies alone; checked against both sites' anchors, whichever fork it
    produces is named at the entry the other site anchored."""
    shown_to_b = fed.fork(tmp_path)
    a_head = fed.work(A, "st-1", 2)
    head_a = fed.commit(fed.orchestrator.log, "st-1", 2, {A: a_head})
    fed.anchor(A, "st-1", 2, head_a)
    b_head = fed.work(B, "st-1", 2)
    head_b = fed.commit(shown_to_b.log, "st-1", 2, {B: b_head})
    fed.anchor(B, "st-1", 2, head_b)
    assert fed.orchestrator.log.verify().ok
    assert shown_to_b.log.verify().ok

    for exported in (fed.orchestrator, shown_to_b):
        assert problem(fed.verify_orchestrator(orchestrator=exported)) == (
            head_a.seq,
            AuditProblem.ANCHOR_MISMATCH,
        )

    # the documented limit: checked against the one site that saw the fork produced, it verifies
    assert problem(fed.verify_orchestrator(A)) is None
    # ... and the two sites' logs alone, without the orchestrator's, prove the fork: two heads its key signed
    # under one number with different hashes
    key = fed.orchestrator.key.public()
    assert head_a.seq == head_b.seq
    assert head_a.entry_hash != head_b.entry_hash
    assert head_a.signed_by(key)
    assert head_b.signed_by(key)


def test_an_export_that_does_not_extend_the_head_a_site_was_shown_is_named_offline(fed, tmp_path):
    """The auditor gets an export (``GET /api/v1/governance/audit``) of a log that does not extend the head
    hospital-b was shown; ``audit verify --file --key --anchor`` with the heads hospital-b kept names it."""
    shown_to_b = fed.fork(tmp_path)
    fed.honest_round("st-1", 2, sites=(A,))
    head_b = fed.commit(shown_to_b.log, "st-1", 2, {B: fed.work(B, "st-1", 2)})
    fed.anchor(B, "st-1", 2, head_b)
    out = tmp_path / "orchestrator.jsonl"
    export_stored_log(fed.orchestrator.engine, out)
    key = fed.orchestrator.key.public().raw.hex()
    kept = [f"{h['seq']}:{h['hash']}" for h in _orchestrator_heads_kept(fed.sites[B])]
    args = ["verify", "--file", str(out), "--key", key]
    assert runner.invoke(audit_app, args).exit_code == 0  # alone, the export verifies
    result = runner.invoke(audit_app, [*args, *(x for h in kept for x in ("--anchor", h))])
    assert result.exit_code == 1, result.output
    assert f"bad entry {head_b.seq}: anchor_mismatch" in result.output


def _orchestrator_heads_kept(site: Party) -> list[dict[str, object]]:
    return [
        e.payload["orchestrator_head"] for e in site.log.entries() if e.type == AuditEventType.ANCHOR_RECORDED
    ]


# --- old or foreign heads given as a round's commitment -----------------------------------------------------


def test_an_old_head_replayed_as_later_rounds_commitments_is_named_after_the_orchestrator_rewrites(fed):
    """The orchestrator gives the sites round 1's genuine signed head again as the commitment of rounds 2 and
    3, so nothing after it is anchored, then rewrites those rounds with its own key. Every anchored entry is
    still there, unchanged; the anchors name the round they were given for, and round 1's entry commits
    round 1. Before the round check this verified."""
    o = fed.orchestrator
    round_1 = next(e for e in o.log.entries() if e.type == AuditEventType.ROUND_COMMITTED).head
    for number in (2, 3):
        heads = {site: fed.work(site, "st-1", number) for site in (A, B)}
        fed.commit(o.log, "st-1", number, heads)
        for site in (A, B):
            fed.anchor(site, "st-1", number, round_1)
    o.rewrite_from(round_1.seq + 1, 5)
    assert o.log.verify().ok
    report = fed.verify_orchestrator()
    assert problem(report) == (round_1.seq, AuditProblem.ANCHOR_DISPUTED)
    assert "as the commitment of study st-1 round 2, but it commits study st-1 round 1" in report.summary()
    assert "replayed to hospital-a, or hospital-a's log misstates it" in report.summary()


def test_an_entry_that_commits_no_round_given_as_a_commitment_is_named(fed):
    o = fed.orchestrator
    o.log.append(AuditEventType.MODEL_RELEASED, {"model_digest": "ab" * 32})
    released = o.log.head()
    fed.commit(o.log, "st-1", 2, {A: fed.work(A, "st-1", 2)})
    fed.anchor(A, "st-1", 2, released)
    report = fed.verify_orchestrator()
    assert problem(report) == (released.seq, AuditProblem.ANCHOR_DISPUTED)
    assert "it is a model.released entry, not a round commitment" in report.summary()


def test_another_sites_round_commitment_given_to_a_site_is_named(fed):
    """Round 2 is recorded with hospital-a's head only (hospital-b's refusal left out of the record), yet
    hospital-b is handed that commitment as its own round's: it anchors a record that does not hold it."""
    fed.work(B, "st-1", 2)
    head = fed.commit(fed.orchestrator.log, "st-1", 2, {A: fed.work(A, "st-1", 2)})
    fed.anchor(A, "st-1", 2, head)
    fed.anchor(B, "st-1", 2, head)
    report = fed.verify_orchestrator()
    assert problem(report) == (head.seq, AuditProblem.ANCHOR_DISPUTED)
    assert "that round's commitment holds no head of hospital-b" in report.summary()
    assert problem(fed.verify_orchestrator(A)) is None  # hospital-a's view is consistent


def test_a_site_cannot_dispute_a_round_with_a_head_the_orchestrator_never_signed(fed):
    """The round a site names is its word, so only heads the orchestrator's key signed are checked: a head
    the site made up disputes nothing (and, as before, frames nothing as rewritten)."""
    fake = LogHead(seq=3, entry_hash="0f" * 32)
    fed.anchor(A, "st-1", 9, fake)
    assert problem(fed.verify_orchestrator()) is None


def test_known_limit_a_head_of_another_federations_log_binds_nothing_and_verification_only_notes_it(fed):
    """The orchestrator answers hospital-a with heads of a shadow log under another key. The site holds no
    key of the orchestrator's log to check them against, so it anchors them; they bind nothing, and the
    orchestrator then rewrites what it committed for hospital-a unnoticed by hospital-a's anchors. What is
    detected: ``verify --peer`` counts those heads as not signed by the orchestrator's key, in its note."""
    shadow = IdentityKey.generate()
    o = fed.orchestrator
    for number in (2, 3):
        heads = {A: fed.work(A, "st-1", number)}
        real = fed.commit(o.log, "st-1", number, heads)
        forged = LogHead(
            seq=real.seq, entry_hash="1e" * 32, signature=shadow.sign(_signing_message("1e" * 32))
        )
        fed.anchor(A, "st-1", number, forged)
    o.rewrite_from(real.seq - 3, 6)
    assert problem(fed.verify_orchestrator(A)) is None
    _, notes = anchors_from_peers(o.home(), [fed.sites[A].home()])
    assert "2 more not signed by orchestrator's key" in notes[0]


def test_known_limit_a_site_head_filed_under_another_sites_name_anchors_neither_and_is_only_noted(fed):
    """The orchestrator records hospital-a's attested head under hospital-b's name (hospital-b's own head
    left out). Neither site's log is anchored by that record; verifying hospital-b notes a head its key did
    not sign, and hospital-a's log is held only up to its earlier heads."""
    a_head = fed.work(A, "st-1", 2)
    fed.work(B, "st-1", 2)
    head = fed.commit(fed.orchestrator.log, "st-1", 2, {B: a_head})
    fed.anchor(B, "st-1", 2, head)
    assert problem(fed.verify_orchestrator()) is None  # the record holds hospital-b, as given to it
    assert problem(fed.verify_site(B)) is None
    _, notes = anchors_from_peers(fed.sites[B].home(), [fed.orchestrator.home()])
    assert "1 more not signed by hospital-b's key" in notes[0]
    # hospital-a can now rewrite what it did in round 2 without the orchestrator's record showing it
    sql(fed.sites[A].engine, "DELETE FROM gov_audit_entries WHERE seq > :s", s=a_head.seq - 2)
    assert problem(fed.verify_site(A)) is None
