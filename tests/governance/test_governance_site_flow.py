"""A site's governance end to end: the task gate, both audit logs, consent at training, withdrawal flags,
and cross-anchoring between a site and the orchestrator."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from fedhealth.core import ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.governance import (
    ApprovalRegistry,
    AuditEventType,
    AuditLog,
    AuditProblem,
    ConsentRegistry,
    FlagReason,
    ModelProvenance,
    ProvenanceStore,
    Rule,
    SitePolicy,
    TaskGate,
    TaskRequest,
    commit_round,
    create_governance_tables,
    orchestrator_anchors,
    record_anchor,
    record_task_refusal,
    site_anchors,
    spec_hash,
    verify_anchor,
    verify_chain,
)
from fedhealth.protocol import FailureCode, StudySpec, TaskFailure
from support import logreg_recipe

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
PATIENTS = [f"p{i:03d}" for i in range(50)]
DENYING = set(PATIENTS[::5])  # 20 %


def spec(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "sepsis-risk",
        "owner": "alice",
        "dataset": "icu-2024",
        "recipe": logreg_recipe(12),
        "rounds": 3,
        "train_sites": ["hospital-a"],
    }
    return StudySpec(**{**base, **changes}).model_dump(mode="json")


class Site:
    """A site's governance state in its own SQLite file, as the agent would hold it."""

    def __init__(self, path: Path, clock: ManualClock, policy: SitePolicy, template: Path) -> None:
        shutil.copyfile(template, path)  # an empty governance database, as create_governance_tables makes
        self.engine = create_engine(f"sqlite:///{path}")
        self.key = IdentityKey.generate()
        self.log = AuditLog(self.engine, self.key, "site:hospital-a", clock)
        self.approvals = ApprovalRegistry(self.engine, self.log)
        self.consent = ConsentRegistry(self.engine, self.log)
        self.gate = TaskGate(
            audit_log=self.log,
            approvals=self.approvals,
            policy=policy,
            consent=self.consent,
            site="hospital-a",
        )
        self.id_loads = 0

    def patient_ids(self) -> list[str]:
        self.id_loads += 1
        return [p for p in PATIENTS for _ in range(3)]  # three rows per patient

    def request(self, study_spec: dict[str, Any], **changes: Any) -> TaskRequest:
        base: dict[str, Any] = {
            "task_id": "task-1",
            "study_id": "st-1",
            "round": 1,
            "spec": study_spec,
            "purpose": "HRESCH",
            "recipe": study_spec["recipe"]["name"],
            "owner": study_spec["owner"],
            "dataset": study_spec["dataset"],
            "requested_epsilon": 1.0,
            "secure_aggregation": True,
        }
        return TaskRequest(**{**base, **changes})


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def site(tmp_path: Path, clock: ManualClock, sqlite_template: Path) -> Site:
    policy = SitePolicy(
        min_cohort_k=10,
        allowed_recipes=frozenset({"logreg"}),
        max_epsilon={"icu-2024": 3.0},
        require_secure_aggregation=True,
    )
    site = Site(tmp_path / "site.sqlite", clock, policy, sqlite_template)
    rows = [f"{p},HRESCH,{'deny' if p in DENYING else 'permit'},2025-01-01,," for p in PATIENTS]
    csv = tmp_path / "consent.csv"
    csv.write_text(
        "patient_id,purpose,decision,valid_from,valid_until,withdrawn_at\n" + "\n".join(rows) + "\n"
    )
    site.consent.import_csv(csv)
    return site


@pytest.fixture
def orchestrator_log(tmp_path: Path, clock: ManualClock, sqlite_template: Path) -> AuditLog:
    shutil.copyfile(sqlite_template, tmp_path / "orchestrator.sqlite")
    engine = create_engine(f"sqlite:///{tmp_path / 'orchestrator.sqlite'}")
    return AuditLog(engine, IdentityKey.generate(), "orchestrator", clock)


def refuse_at_orchestrator(log: AuditLog, admission_rule: str) -> None:
    """What the orchestrator does with the agent's TaskFailure (the wire message is validated on the way):
    the site sends its rule's code only, and the orchestrator logs the code's fixed sentence."""
    failure = TaskFailure.model_validate_json(json.dumps({"code": admission_rule}))
    record_task_refusal(
        log, task_id="task-1", study_id="st-1", rule=failure.code, reason=failure.reason, site="hospital-a"
    )


def refusal_reasons(log: AuditLog) -> list[tuple[str, str]]:
    return [
        (e.payload["rule"], e.payload["reason"])
        for e in log.entries()
        if e.type is AuditEventType.TASK_REFUSED
    ]


@pytest.mark.parametrize(
    ("prepare", "request_changes", "rule", "words"),
    [
        ("nothing", {}, Rule.STUDY_APPROVAL, "not approved"),
        ("approve-then-change", {}, Rule.STUDY_APPROVAL, "changed after approval"),
        ("approve", {"recipe": "xgboost"}, Rule.ALLOWED_RECIPES, "xgboost"),
        ("approve", {"requested_epsilon": 5.0}, Rule.MAX_EPSILON, "exceeds"),
        ("approve", {"secure_aggregation": False}, Rule.SECURE_AGGREGATION, "secure aggregation"),
    ],
    ids=["unapproved", "changed-after-approval", "disallowed-recipe", "epsilon-cap", "no-secure-aggregation"],
)
def test_a_task_refused_before_any_data_is_read_has_its_reason_in_both_logs(
    site, orchestrator_log, prepare, request_changes, rule, words
):
    approved = spec()
    if prepare != "nothing":
        site.approvals.submit(approved)
        site.approvals.approve(spec_hash(approved), reason="IRB-2026-114", steward="dana")
    task_spec = spec(rounds=30) if prepare == "approve-then-change" else approved
    admission = site.gate.admit(site.request(task_spec, **request_changes), site.patient_ids, on=T0)
    assert not admission.allowed
    assert admission.refusal is not None
    assert admission.refusal.rule is rule
    assert words in admission.refusal.reason
    assert site.id_loads == 0
    assert admission.consent is None
    refuse_at_orchestrator(orchestrator_log, admission.refusal.rule.value)
    # the site's log has its decision's sentence; the orchestrator's the same rule with the rule's fixed one
    assert refusal_reasons(site.log) == [(rule.value, admission.refusal.reason)]
    assert refusal_reasons(orchestrator_log) == [(rule.value, FailureCode(rule.value).message)]
    assert site.log.verify().ok
    assert orchestrator_log.verify().ok


def test_a_cohort_below_k_after_consent_is_refused_before_training_data_is_loaded(
    tmp_path, clock, orchestrator_log, sqlite_template
):
    site = Site(tmp_path / "small.sqlite", clock, SitePolicy(min_cohort_k=45), sqlite_template)
    rows = [f"{p},HRESCH,{'deny' if p in DENYING else 'permit'},," for p in PATIENTS]
    csv = tmp_path / "c.csv"
    csv.write_text("patient_id,purpose,decision,valid_from,valid_until\n" + "\n".join(rows) + "\n")
    site.consent.import_csv(csv)
    site.approvals.submit(spec())
    site.approvals.approve(spec_hash(spec()), reason="ok", steward="dana")
    admission = site.gate.admit(site.request(spec()), site.patient_ids, on=T0)
    # 50 patients, 40 after consent: below k=45 although the raw cohort is above it
    assert not admission.allowed
    assert admission.refusal is not None
    assert admission.refusal.rule is Rule.MIN_COHORT
    assert admission.consent is not None
    assert admission.consent.kept_count == 40
    assert "40" not in admission.refusal.reason
    refuse_at_orchestrator(orchestrator_log, admission.refusal.rule.value)
    assert refusal_reasons(site.log) == [("min_cohort_k", admission.refusal.reason)]
    assert refusal_reasons(orchestrator_log) == [("min_cohort_k", FailureCode.MIN_COHORT.message)]


def test_every_decision_of_an_admitted_task_is_logged_and_only_consenting_rows_are_kept(site):
    site.approvals.submit(spec())
    site.approvals.approve(spec_hash(spec()), reason="IRB-2026-114", steward="dana")
    admission = site.gate.admit(site.request(spec()), site.patient_ids, on=T0)
    assert admission.allowed
    assert admission.consent is not None
    ids = site.patient_ids()
    kept = {ids[i] for i in admission.consent.kept_indices}
    assert kept == set(PATIENTS) - DENYING
    assert admission.consent.kept_count == 40
    assert len(admission.consent.kept_indices) == 120
    by_hand = hashlib.sha256(
        json.dumps(
            {
                "kind": "fedhealth.consent-snapshot.v1",
                "purpose": "HRESCH",
                "date": "2026-03-02",
                "patients": sorted(kept),
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
    ).hexdigest()
    assert admission.consent.snapshot_hash == by_hand
    decisions = [e.payload for e in site.log.entries() if e.type is AuditEventType.POLICY_DECISION]
    assert [d["rule"] for d in decisions] == [
        "study_approval",
        "allowed_recipes",
        "allowed_owners",
        "max_epsilon",
        "require_secure_aggregation",
        "min_cohort_k",
    ]
    assert all(d["allowed"] for d in decisions)
    assert all(d["subject"]["spec_hash"] == spec_hash(spec()) for d in decisions)


def test_every_refusal_code_is_a_wire_failure_code_that_counts_as_a_refusal():
    for rule in Rule:
        failure = TaskFailure(code=rule.value)
        assert failure.code.is_refusal, rule
        assert failure.code is not FailureCode.REFUSED  # a code of its own, with its own sentence


def test_a_withdrawal_after_training_flags_the_model_versions_trained_with_that_patient(
    site, tmp_path, clock
):
    orchestrator = create_engine(f"sqlite:///{tmp_path / 'orch.sqlite'}")
    create_governance_tables(orchestrator)
    provenance = ProvenanceStore(orchestrator, clock=clock)
    root = hashlib.sha256(b"init").hexdigest()
    provenance.record(_version(root, None, 0, None))
    site.approvals.submit(spec())
    site.approvals.approve(spec_hash(spec()), reason="ok", steward="dana")
    parent = root
    digests = []
    for round_ in (1, 2):
        admission = site.gate.admit(site.request(spec(), round=round_), site.patient_ids, on=T0)
        assert admission.consent is not None
        digest = hashlib.sha256(f"model-{round_}".encode()).hexdigest()
        provenance.record(_version(digest, parent, round_, admission.consent.snapshot_hash))
        parent, digests = digest, [*digests, digest]
        clock.advance(3600)
    # a patient who trained in rounds 1 and 2 withdraws; round 3 trains without them
    clock.advance(86400)
    notice = site.consent.withdraw("p001", "HRESCH")
    later = site.gate.admit(site.request(spec(), round=3), site.patient_ids, on=clock.now())
    assert later.consent is not None
    assert "p001" not in later.consent.kept_patient_ids
    third = hashlib.sha256(b"model-3").hexdigest()
    provenance.record(_version(third, parent, 3, later.consent.snapshot_hash))
    # a patient who had denied all along withdrawing touches nothing
    assert site.consent.withdraw("p000", "HRESCH").snapshot_hashes == ()
    flags = provenance.flag_withdrawal(notice.snapshot_hashes, site="hospital-a", notice_id=notice.notice_id)
    reasons = {f.model_digest: f.reason for f in flags}
    assert reasons == {
        digests[0]: FlagReason.TRAINED_ON_WITHDRAWN,
        digests[1]: FlagReason.TRAINED_ON_WITHDRAWN,
        third: FlagReason.DERIVED_FROM_FLAGGED,
    }
    assert provenance.flags(root) == []


def _version(digest: str, parent: str | None, round_: int, snapshot: str | None) -> ModelProvenance:
    sites = {"hospital-a": snapshot} if snapshot else {}
    return ModelProvenance(
        model_digest=digest,
        parent_digest=parent,
        study_id="st-1",
        round=round_,
        n_sites=len(sites),
        dataset_fingerprints={s: "fp-icu-2024" for s in sites},
        consent_snapshots=sites,
        spec_hash=spec_hash(spec()),
        software_version="0.1.0",
        created_at=T0 + timedelta(hours=round_),
    )


# --- cross-anchoring ----------------------------------------------------------------------------------------


def _run_round(site: Site, orchestrator_log: AuditLog, round_: int) -> None:
    site.log.append(AuditEventType.UPDATE_SENT, {"task_id": f"task-{round_}", "study_id": "st-1"})
    commitment = commit_round(
        orchestrator_log,
        study_id="st-1",
        round=round_,
        model_digest=None,
        site_heads={"hospital-a": site.log.head()},
    )
    record_anchor(site.log, study_id="st-1", round=round_, orchestrator_head=commitment.head)


def test_a_site_log_rewritten_after_the_orchestrator_anchored_it_is_detected(site, orchestrator_log):
    for round_ in (1, 2, 3):
        _run_round(site, orchestrator_log, round_)
    site_keys = {site.key.public().fingerprint: site.key.public()}
    anchors = site_anchors(orchestrator_log.entries(), "hospital-a")
    assert len(anchors) == 3
    assert verify_anchor(site.log.entries(), anchors).ok
    # the site rewrites history from its second update on, with its own key
    second_update = next(
        e.seq
        for e in site.log.entries()
        if e.type is AuditEventType.UPDATE_SENT and e.payload["task_id"] == "task-2"
    )
    with site.engine.begin() as conn:
        conn.execute(text("DELETE FROM gov_audit_entries WHERE seq >= :s"), {"s": second_update})
    for _ in range(6):
        site.log.append(AuditEventType.CONFIGURATION_CHANGED, {"note": "nothing happened"})
    assert verify_chain(site.log.entries(), site_keys).ok
    bad = verify_anchor(site.log.entries(), anchors).first_bad
    assert bad is not None
    assert bad.problem is AuditProblem.ANCHOR_MISMATCH
    assert bad.seq == anchors[1].seq
    assert site.log.verify(site_keys, anchored_heads=anchors).first_bad == bad


def test_an_orchestrator_log_rewritten_after_a_site_anchored_it_is_detected(site, orchestrator_log):
    for round_ in (1, 2):
        _run_round(site, orchestrator_log, round_)
    anchors = orchestrator_anchors(site.log.entries())
    assert len(anchors) == 2
    assert verify_anchor(orchestrator_log.entries(), anchors).ok
    with orchestrator_log.engine.begin() as conn:
        conn.execute(text("DELETE FROM gov_audit_entries WHERE seq = 2"))
    orchestrator_log.append(
        AuditEventType.ROUND_COMMITTED, {"study_id": "st-1", "round": 2, "site_heads": {}}
    )
    bad = verify_anchor(orchestrator_log.entries(), anchors).first_bad
    assert bad is not None
    assert bad.seq == 2
    assert bad.problem is AuditProblem.ANCHOR_MISMATCH


def test_consent_is_checked_on_the_given_date(site):
    site.approvals.submit(spec())
    site.approvals.approve(spec_hash(spec()), reason="ok", steward="dana")
    before = site.gate.admit(site.request(spec()), site.patient_ids, on=date(2024, 12, 31))
    assert before.refusal is not None
    assert before.refusal.rule is Rule.MIN_COHORT
