"""Attacks on guarantees of docs/governance.md that no other test attacks directly.

- *Consent*: "Any bad row stops the import before anything is stored, with the line number": a date beyond
  the calendar (``9999-12-31`` as an end, an instant whose UTC form is before year 1 or after 9999) in a CSV
  row or a FHIR period.
- *Consent* / *An id spelled another way*: a patient's deny or withdrawal is honoured. A deny stated under
  another spelling of the study's purpose (``Research`` for ``research``) must exclude the patient like a
  deny under another spelling of the id does, and a withdrawal said so must name the snapshots of the
  study's purpose; a permit under another spelling still grants nothing.
- *A task's way through the site's gate*, step 3: an unusable ``policy.toml`` (non-finite or negative caps,
  ``k`` of 0 or a float, a string where a list or a boolean goes, an unknown key, a consent model in
  another case) refuses every task with code ``site_policy`` before the dataset is opened, and stops the
  agent at start-up; a change is logged once (``configuration.changed``), and not again after a restart.
- Step 2: the orchestrator's round commitments are logged once each, across tasks and agent restarts, even
  when the task carrying them is then refused.
- Steps 8 and 10: the cohort refusal's reason never states a count. Step 4: a malformed signature or key is
  ``spec_signature``, and registers and pins nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from agent.site_fixtures import PATIENTS, absent_cohort, agent, approve, cohort, gate_study, make_home, task
from fedhealth.agent import SiteHome
from fedhealth.agent._governance import GovernanceGate, SiteGovernance
from fedhealth.core import ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.governance import (
    AuditEventType,
    AuditLog,
    ConsentDecision,
    ConsentImportError,
    ConsentModel,
    ConsentRecord,
    ConsentRegistry,
    PolicyError,
    decide,
    read_stored_log,
)
from fedhealth.protocol import FailureCode, LogHeadInfo, RoundCommitment, StudySpec

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
HEADER = "patient_id,purpose,decision,valid_from,valid_until,withdrawn_at\n"
GOOD_ROW = "p-0001,research,permit,2025-01-01,,\n"


# --- consent import: a date beyond the calendar is a bad row ------------------------------------------------


@pytest.fixture
def registry(engine: Engine, site_key: IdentityKey) -> ConsentRegistry:
    log = AuditLog(engine, site_key, "site:hospital-a", ManualClock(T0), salted=True)
    return ConsentRegistry(engine, log, model=ConsentModel.OPT_IN)


@pytest.mark.parametrize(
    ("column", "row"),
    [
        ("valid_from", "p-0002,research,permit,0001-01-01T00:00:00+01:00,,"),  # before year 1 in UTC
        ("withdrawn_at", "p-0002,research,deny,,,9999-12-31T23:00:00-05:00"),  # after year 9999 in UTC
    ],
    ids=["before-year-1", "withdrawn-after-year-9999"],
)
def test_a_consent_csv_row_with_a_date_beyond_the_calendar_stops_the_import_naming_its_line(
    registry, tmp_path, column, row
):
    path = tmp_path / "consent.csv"
    path.write_text(HEADER + GOOD_ROW + row + "\n")
    with pytest.raises(ConsentImportError) as caught:
        registry.import_csv(path)
    message = str(caught.value)
    assert "consent.csv line 3" in message
    assert column in message
    assert registry.records() == []  # the good row before it is not stored either


def test_a_fhir_consent_whose_period_starts_before_the_calendar_stops_the_import_naming_it(registry):
    consent = {
        "resourceType": "Consent",
        "id": "c-9999",
        "status": "active",
        "scope": {"coding": [{"code": "research"}]},
        "category": [{"coding": [{"code": "research"}]}],
        "patient": {"reference": "Patient/p-0003"},
        "provision": {
            "type": "permit",
            "period": {"start": "0001-01-01T00:30:00+01:00", "end": "2030-01-01"},
        },
    }
    with pytest.raises(ConsentImportError, match=r"Consent/c-9999"):
        registry.import_fhir({"resourceType": "Bundle", "entry": [{"resource": consent}]})
    assert registry.records() == []


def test_9999_12_31_as_an_end_is_the_open_end_hospital_exports_mean_by_it(registry, tmp_path):
    """``9999-12-31`` as ``valid_until`` (whose next midnight is in year 10000) is the calendar's last
    instant, in a CSV row and in a FHIR period: the record is stored, in force, and a later deny still
    outweighs it."""
    path = tmp_path / "consent.csv"
    path.write_text(
        HEADER
        + "p-0001,research,permit,2025-01-01,9999-12-31,\n"
        + "p-0004,research,permit,2025-01-01,9999-12-31T23:59:59-05:00,\n"  # local time west of UTC
    )
    registry.import_csv(path)
    consent = {
        "resourceType": "Consent",
        "id": "c-open",
        "status": "active",
        "scope": {"coding": [{"code": "research"}]},
        "category": [{"coding": [{"code": "research"}]}],
        "patient": {"reference": "Patient/p-0002"},
        "provision": {"type": "permit", "period": {"start": "2025-01-01", "end": "9999-12-31"}},
    }
    offset = {
        **consent,
        "id": "c-open-local",
        "patient": {"reference": "Patient/p-0005"},
        "provision": {
            "type": "permit",
            "period": {"start": "2025-01-01", "end": "9999-12-31T23:30:00-01:00"},
        },
    }
    registry.import_fhir({"resourceType": "Bundle", "entry": [{"resource": consent}, {"resource": offset}]})
    ends = {r.patient_id: r.valid_until for r in registry.records()}
    assert ends == dict.fromkeys(["p-0001", "p-0002", "p-0004", "p-0005"], datetime.max.replace(tzinfo=UTC))
    late = datetime(9999, 12, 31, 12, tzinfo=UTC)
    kept = registry.filter(["p-0001", "p-0002", "p-0003", "p-0004", "p-0005"], "research", late)
    assert kept.kept_patient_ids == ("p-0001", "p-0002", "p-0004", "p-0005")
    registry.add([_record("p-0002", "research", ConsentDecision.DENY, T0)])
    assert registry.filter(["p-0001", "p-0002"], "research", T0).kept_patient_ids == ("p-0001",)


# --- consent: a deny under another spelling of the purpose --------------------------------------------------


def _record(patient: str, purpose: str, decision: ConsentDecision, start: datetime) -> ConsentRecord:
    return ConsentRecord(patient_id=patient, purpose=purpose, decision=decision, valid_from=start)


@pytest.mark.parametrize("spelling", ["Research", "RESEARCH", "research\u200b", "ｒｅｓｅａｒｃｈ"])
def test_a_deny_under_another_spelling_of_the_studys_purpose_outweighs_an_any_purpose_permit(
    registry, spelling
):
    """The patient gave a general permit (``*``), then said no to research, spelled as the consent feed
    spells it. A study for ``research`` must not use them."""
    registry.add(
        [
            _record("p-0001", "*", ConsentDecision.PERMIT, T0 - timedelta(days=400)),
            _record("p-0001", spelling, ConsentDecision.DENY, T0 - timedelta(days=10)),
            _record("p-0002", "*", ConsentDecision.PERMIT, T0 - timedelta(days=400)),  # control
        ]
    )
    result = registry.filter(["p-0001", "p-0002"], "research", T0)
    assert result.kept_patient_ids == ("p-0002",)
    assert result.denied_count == 1
    assert decide(registry.records("p-0001"), "research", T0) is ConsentDecision.DENY
    assert decide(registry.records("p-0002"), "research", T0) is ConsentDecision.PERMIT


def test_under_opt_out_a_deny_under_another_spelling_of_the_purpose_excludes_the_patient(engine, site_key):
    log = AuditLog(engine, site_key, "site:hospital-a", ManualClock(T0), salted=True)
    registry = ConsentRegistry(engine, log, model=ConsentModel.OPT_OUT)
    registry.add([_record("p-0001", "Research", ConsentDecision.DENY, T0 - timedelta(days=1))])
    result = registry.filter(["p-0001", "p-0002", "p-0003"], "research", T0)
    assert result.kept_patient_ids == ("p-0002", "p-0003")


def test_a_permit_under_another_spelling_of_the_purpose_grants_nothing(registry):
    """The control of the rule above: only a deny reaches across spellings, so no cohort widens."""
    registry.add([_record("p-0001", "Research", ConsentDecision.PERMIT, T0 - timedelta(days=1))])
    assert registry.filter(["p-0001"], "research", T0).kept_patient_ids == ()
    assert decide(registry.records("p-0001"), "research", T0) is None


def test_a_later_permit_for_the_purpose_still_outweighs_an_earlier_deny_under_another_spelling(registry):
    """The latest statement wins, whatever the spelling of the older one."""
    registry.add(
        [
            _record("p-0001", "Research", ConsentDecision.DENY, T0 - timedelta(days=100)),
            _record("p-0001", "research", ConsentDecision.PERMIT, T0 - timedelta(days=1)),
        ]
    )
    assert registry.filter(["p-0001"], "research", T0).kept_patient_ids == ("p-0001",)


def test_a_withdrawal_said_under_another_spelling_of_the_purpose_names_the_studys_snapshots(registry):
    registry.add([_record("p-0001", "research", ConsentDecision.PERMIT, T0 - timedelta(days=10))])
    used = registry.filter(["p-0001"], "research", T0, task_id="tk-1", study_id="st-1")
    other = registry.filter(["p-0001"], "treatment", T0)  # a snapshot of another purpose (empty: no permit)
    assert used.kept_patient_ids == ("p-0001",)
    notice = registry.withdraw("p-0001", "Research", when=T0 + timedelta(hours=1))
    assert notice.snapshot_hashes == (used.snapshot_hash,)
    assert other.snapshot_hash not in notice.snapshot_hashes
    assert registry.filter(["p-0001"], "research", T0 + timedelta(days=1)).kept_patient_ids == ()


# --- the site's gate: policy.toml, round commitments, cohort reasons ----------------------------------------


def study(**changes: object) -> StudySpec:
    return gate_study("doc-attacks", **changes)


@pytest.fixture
def home(tmp_path: Path) -> SiteHome:
    return make_home(tmp_path / "site")


def entries(home: SiteHome, kind: AuditEventType) -> list:
    with SiteGovernance(home) as governance:
        return [e for e in read_stored_log(governance.engine).entries if e.type == kind]


BAD_POLICIES = [
    "default_max_epsilon = nan\n",
    "default_max_epsilon = inf\n",
    "default_max_epsilon = -1.0\n",
    "[max_epsilon]\ncohort = nan\n",
    "[max_epsilon]\ncohort = -inf\n",
    "[max_epsilon]\ncohort = { a = 1 }\n",
    "max_epsilon = 3.0\n",
    "min_cohort_k = 0\n",
    "min_cohort_k = -5\n",
    "min_cohort_k = 2.5\n",
    "min_cohort_k = true\n",
    'min_cohort_k = "20"\n',
    'require_secure_aggregation = "yes"\n',
    'allowed_recipes = "logreg"\n',
    'allowed_recipes = [""]\n',
    "allowed_owners = [1]\n",
    'consent_model = "OPT-IN"\n',
    "consent_model = 1\n",
    "min_cohort = 5\n",  # a typo must not silently disable the rule
    "min_cohort_k = 5\nmin_cohort_k = 6\n",  # not TOML
    "\ufeffmin_cohort_k = 5\n",  # a byte-order mark: not TOML either
]


@pytest.mark.parametrize("policy", BAD_POLICIES, ids=range(len(BAD_POLICIES)))
def test_an_unusable_policy_refuses_every_task_before_the_data_and_stops_the_agent_at_start(
    home, tmp_path, policy
):
    spec = study()
    approve(home, spec)
    site, client = agent(home, absent_cohort(tmp_path))  # started under the defaults
    home.policy_path.write_text(policy, encoding="utf-8")
    site.handle(task(spec, task_id="tk-1"))
    site.handle(task(spec, task_id="tk-2", round=2))
    assert [f.code for f in client.failures] == [FailureCode.SITE_POLICY, FailureCode.SITE_POLICY]
    refused = entries(home, AuditEventType.TASK_REFUSED)
    assert [e.payload["rule"] for e in refused] == ["site_policy", "site_policy"]
    with pytest.raises(PolicyError), SiteGovernance(home) as governance:
        GovernanceGate(governance)


def test_a_policy_change_is_logged_once_and_not_again_after_a_restart(home, tmp_path):
    spec = study()
    approve(home, spec)
    home.policy_path.write_text("min_cohort_k = 5\n")
    site, client = agent(home, cohort(tmp_path))
    site.handle(task(spec, task_id="tk-1"))
    site.handle(task(spec, task_id="tk-2", round=2))
    assert len(entries(home, AuditEventType.CONFIGURATION_CHANGED)) == 1
    restarted, _ = agent(home, cohort(tmp_path))  # the same file: nothing changed
    assert len(entries(home, AuditEventType.CONFIGURATION_CHANGED)) == 1
    home.policy_path.write_text("min_cohort_k = 6\n")
    restarted.handle(task(spec, task_id="tk-3", round=2))
    changes = entries(home, AuditEventType.CONFIGURATION_CHANGED)
    assert len(changes) == 2
    assert changes[-1].payload["value"]["policy"]["min_cohort_k"] == 6
    assert client.failures == []


def _commitment(study_id: str, round: int, seq: int, fill: str) -> RoundCommitment:
    return RoundCommitment(
        study_id=study_id,
        round=round,
        model_digest=None,
        orchestrator_head=LogHeadInfo(seq=seq, hash=fill * 64),
    )


def test_round_commitments_are_logged_once_each_across_tasks_refusals_and_restarts(home, tmp_path):
    spec = study()
    approve(home, spec)
    first = _commitment("st-1", 1, 7, "a")
    second = _commitment("st-1", 2, 9, "b")
    site, _ = agent(home, absent_cohort(tmp_path))
    # refused (the dataset is missing, and then a spec mismatch): the commitments are still anchored once
    site.handle(task(spec, task_id="tk-1", commitments=[first]))
    site.handle(task(spec, task_id="tk-2", commitments=[first, first]))
    site.handle(task(spec, task_id="tk-3", round=99, commitments=[first, second]))
    restarted, _ = agent(home, absent_cohort(tmp_path))
    restarted.handle(task(spec, task_id="tk-4", commitments=[second, first]))
    anchors = entries(home, AuditEventType.ANCHOR_RECORDED)
    heads = sorted((e.payload["round"], e.payload["orchestrator_head"]["hash"]) for e in anchors)
    assert heads == [(1, "a" * 64), (2, "b" * 64)]
    # the same head given as the commitment of another round is a separate statement, logged too
    restarted.handle(task(spec, task_id="tk-5", commitments=[_commitment("st-1", 3, 7, "a")]))
    assert len(entries(home, AuditEventType.ANCHOR_RECORDED)) == 3


@pytest.mark.parametrize("opt_in", [False, True], ids=["after-data", "before-data"])
def test_a_cohort_refusal_never_states_the_count(home, tmp_path, opt_in):
    """Seven patients remain where k is 20: no reason in the site's log states 7 (nor the 33 left out)."""
    spec = study()
    approve(home, spec)
    permitted = PATIENTS[:7]
    with SiteGovernance(home) as governance:
        governance.consent().add(
            [_record(p, "research", ConsentDecision.PERMIT, T0 - timedelta(days=30)) for p in permitted]
            + [_record(p, "research", ConsentDecision.DENY, T0 - timedelta(days=30)) for p in PATIENTS[7:]]
        )
    model = "opt-in" if opt_in else "opt-out"
    home.policy_path.write_text(f'min_cohort_k = 20\nconsent_model = "{model}"\n')
    site, client = agent(home, cohort(tmp_path))
    site.handle(task(spec))
    assert [f.code for f in client.failures] == [FailureCode.MIN_COHORT]
    decisions = [
        e for e in entries(home, AuditEventType.POLICY_DECISION) if e.payload["rule"] == "min_cohort_k"
    ]
    refused = entries(home, AuditEventType.TASK_REFUSED)
    assert decisions
    assert not decisions[-1].payload["allowed"]
    assert (decisions[-1].payload["subject"].get("stage") == "before data") is opt_in
    for text in [d.payload["reason"] for d in decisions] + [r.payload["reason"] for r in refused]:
        assert "20" in text  # the site's own k is stated ...
        for count in ("7", "33", "40"):
            assert count not in text.replace("20", "")  # ... never a count of patients


MALFORMED_SIGNATURES = [
    {"spec_signature": "zz" * 64, "owner_public_key": "00" * 32},  # not hex
    {"spec_signature": "00" * 64, "owner_public_key": "abc"},  # odd length
    {"spec_signature": "00" * 64, "owner_public_key": "00" * 31},  # a key of 31 bytes
    {"spec_signature": "", "owner_public_key": "00" * 32},  # an empty signature
    {"spec_signature": "00" * 64},  # a signature without its key
    {"owner_public_key": "00" * 32},  # a key without its signature
]


@pytest.mark.parametrize("fields", MALFORMED_SIGNATURES, ids=range(len(MALFORMED_SIGNATURES)))
def test_a_malformed_spec_signature_is_refused_as_such_before_the_data_and_never_registers(
    home, tmp_path, fields
):
    """Step 4: a task carrying a signature or key that is not one is ``spec_signature`` (not an internal
    error, not a spec recorded as signed), before the dataset is opened."""
    spec = study()
    site, client = agent(home, absent_cohort(tmp_path))
    site.handle(task(spec, **fields))
    assert [f.code for f in client.failures] == [FailureCode.SPEC_SIGNATURE]
    with SiteGovernance(home) as governance:
        assert governance.approvals.list() == []
        assert governance.approvals.owner_key("alice") is None  # nothing pinned on a forged first use
