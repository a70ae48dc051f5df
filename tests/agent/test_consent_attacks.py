"""Attacks on "patients' consent choices are honoured" (docs/governance.md, *A task's way through the site's
gate* step 9, *Consent*, *Site policy* defaults): the real agent with its real gates on a real site home,
handed tasks by an orchestrator that would like a withdrawn or denying patient's rows to be trained on.

Each test withdraws or denies one patient (``p0003``) at a moment the attacker picks (between approval and
the first task, between two rounds of a running study), or changes how the patient is spelled or how the
dataset names its rows, and then reads the site's own consent snapshot of the task (the set of patients it
kept) and what went upstream. Every test also has its control: the same patient *is* used when nothing was
withdrawn, so a test cannot pass because the patient was never there.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from site_fixtures import PATIENTS, agent, approve, cohort_csv, make_home, task
from sqlalchemy import select

from fedhealth.agent import SiteHome
from fedhealth.agent._governance import SiteGovernance, withdrawal_notices
from fedhealth.core import InputError
from fedhealth.governance import (
    GOVERNANCE_METADATA,
    AuditEventType,
    ConsentDecision,
    ConsentRecord,
    consent_snapshot_hash,
    read_stored_log,
)
from fedhealth.protocol import FailureCode, StudySpec, TaskKind
from support import logreg_recipe

VICTIM = "p0003"
MEMBERS = GOVERNANCE_METADATA.tables["gov_consent_snapshot_members"]


def uri(path: Path) -> str:
    return f"file://{path}?label=label&id=patient_id"


def write_csv_without_ids(path: Path) -> str:
    """The same rows in the same order, exported without their patient id column."""
    rows = [f"{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}" for i, _ in enumerate(PATIENTS)]
    path.write_text("age,marker,label\n" + "\n".join(rows) + "\n")
    return f"file://{path}?label=label"


def study(name: str = "consent-study", **changes: object) -> StudySpec:
    fields: dict[str, object] = {
        "name": name,
        "dataset": "cohort",
        "recipe": logreg_recipe(2, learning_rate=0.5),
        "rounds": 3,
        "train_sites": ["hospital-a"],
    }
    fields.update(changes)
    return StudySpec.model_validate(fields)


def permit_everyone(home: SiteHome, purpose: str = "research") -> None:
    with SiteGovernance(home) as governance:
        governance.consent().add(
            [ConsentRecord(patient_id=p, purpose=purpose, decision=ConsentDecision.PERMIT) for p in PATIENTS]
        )


def withdraw(home: SiteHome, patient: str, purpose: str | None = None) -> None:
    with SiteGovernance(home) as governance:
        governance.consent().withdraw(patient, purpose)


def deny(home: SiteHome, patient: str, purpose: str = "research") -> None:
    with SiteGovernance(home) as governance:
        governance.consent().add(
            [ConsentRecord(patient_id=patient, purpose=purpose, decision=ConsentDecision.DENY)]
        )


def set_policy(home: SiteHome, text: str) -> None:
    home.policy_path.write_text(text)


def kept_patients(home: SiteHome, task_id: str) -> set[str]:
    """The patients the site's consent snapshot of ``task_id`` kept (its own record, never sent)."""
    with SiteGovernance(home) as governance:
        entries = read_stored_log(governance.engine).entries
        applied = [
            e
            for e in entries
            if e.type == AuditEventType.CONSENT_APPLIED and e.payload.get("task_id") == task_id
        ]
        assert len(applied) == 1, f"task {task_id}: {len(applied)} consent.applied entries"
        digest = applied[0].payload["snapshot_hash"]
        with governance.engine.connect() as conn:
            rows = conn.execute(select(MEMBERS.c.patient_id).where(MEMBERS.c.snapshot_hash == digest))
            return {str(r) for r in rows.scalars()}


def rows_used(result) -> int:
    return result.metrics.num_samples + result.metrics.num_eval_samples


@pytest.fixture
def home(tmp_path: Path) -> SiteHome:
    return make_home(tmp_path / "site")


# --- the control: the victim is in the cohort when nothing was withdrawn ---------------------------------


def test_control_without_a_withdrawal_the_patient_is_used(home, tmp_path):
    spec = study()
    approve(home, spec)
    permit_everyone(home)
    site, client = agent(home, {"cohort": uri(cohort_csv(tmp_path / "d.csv"))})
    site.handle(task(spec))
    assert client.failures == []
    assert VICTIM in kept_patients(home, "tk-1")
    assert rows_used(client.results[0]) == len(PATIENTS)


# --- withdrawn between the steward's approval and the first task ------------------------------------------


@pytest.mark.parametrize(
    "deadline", [timedelta(days=5), timedelta(seconds=-60)], ids=["deadline-ahead", "deadline-backdated"]
)
def test_a_withdrawal_between_approval_and_training_excludes_the_patient_whatever_the_task_says(
    home, tmp_path, deadline
):
    """The orchestrator cannot pick the consent date: a task back-dated (its deadline before the withdrawal)
    is still judged on the site's own clock. (Back-dated within the round period a site still trains in,
    tests/agent/test_training_deadline.py; further back the task is refused before any row is read.)"""
    spec = study()
    approve(home, spec)
    permit_everyone(home)
    withdraw(home, VICTIM)
    site, client = agent(home, {"cohort": uri(cohort_csv(tmp_path / "d.csv"))})
    when = datetime.now(UTC) + deadline
    site.handle(task(spec).model_copy(update={"deadline": when}))
    assert client.failures == []
    kept = kept_patients(home, "tk-1")
    assert VICTIM not in kept
    assert kept == set(PATIENTS) - {VICTIM}
    assert rows_used(client.results[0]) == len(PATIENTS) - 1


# --- withdrawn while the study runs -------------------------------------------------------------------------


def test_a_withdrawal_during_a_running_study_excludes_the_patient_from_every_later_round_and_evaluation(
    home, tmp_path
):
    spec = study()
    approve(home, spec)
    permit_everyone(home)
    site, client = agent(home, {"cohort": uri(cohort_csv(tmp_path / "d.csv"))})
    site.handle(task(spec, round=1, task_id="tk-1"))
    assert VICTIM in kept_patients(home, "tk-1")  # control: round 1 trained on the patient

    withdraw(home, VICTIM)
    site.handle(task(spec, round=2, task_id="tk-2"))
    site.handle(task(spec, kind=TaskKind.EVALUATE, round=spec.rounds + 1, task_id="tk-3"))
    assert client.failures == []
    assert VICTIM not in kept_patients(home, "tk-2")
    assert VICTIM not in kept_patients(home, "tk-3")
    assert rows_used(client.results[1]) == len(PATIENTS) - 1

    # the withdrawal notice names round 1's snapshot (so its model gets flagged), and no patient id
    with SiteGovernance(home) as governance:
        (notice,) = withdrawal_notices(governance)
        round_one = [
            e.payload["snapshot_hash"]
            for e in read_stored_log(governance.engine).entries
            if e.type == AuditEventType.CONSENT_APPLIED and e.payload.get("task_id") == "tk-1"
        ]
    assert set(round_one) <= set(notice.snapshot_hashes)
    assert VICTIM not in repr(notice.to_json())


def test_a_withdrawal_for_the_studys_purpose_beats_an_any_purpose_permit(home, tmp_path):
    spec = study()
    approve(home, spec)
    permit_everyone(home, purpose="*")
    withdraw(home, VICTIM, purpose="research")
    site, client = agent(home, {"cohort": uri(cohort_csv(tmp_path / "d.csv"))})
    site.handle(task(spec))
    assert client.failures == []
    assert VICTIM not in kept_patients(home, "tk-1")


# --- what goes upstream ------------------------------------------------------------------------------------


def test_an_orchestrator_knowing_every_patient_cannot_learn_the_withdrawal_from_what_is_sent(home, tmp_path):
    """It knows the 40 ids and that one of them may have withdrawn: nothing sent names a patient, and the
    attested consent snapshot is neither bare snapshot hash it could compute for its two guesses."""
    spec = study()
    approve(home, spec)
    permit_everyone(home)
    withdraw(home, VICTIM)
    site, client = agent(home, {"cohort": uri(cohort_csv(tmp_path / "d.csv"))})
    site.handle(task(spec))
    (result,) = client.results
    today = datetime.now(UTC).date()
    guesses = {
        consent_snapshot_hash(PATIENTS, "research", today),
        consent_snapshot_hash(set(PATIENTS) - {VICTIM}, "research", today),
    }
    assert consent_snapshot_hash(kept_patients(home, "tk-1"), "research", today) in guesses  # control
    assert result.attestation.consent_snapshot not in guesses
    with SiteGovernance(home) as governance:
        notices = [n.to_json() for n in withdrawal_notices(governance)]
    wire = result.model_dump_json() + repr(notices)
    for pid in PATIENTS:
        assert pid not in wire


# --- another spelling of the patient ------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", [" p0003", "p0003 ", "\tp0003", ""])
def test_a_withdrawal_with_a_padded_or_empty_id_is_refused_not_silently_recorded(home, spelling):
    """A withdrawal that would name nobody must not look done: the steward is told at once."""
    permit_everyone(home)
    with pytest.raises(InputError):
        withdraw(home, spelling)


@pytest.mark.parametrize("cell", [" p0003", "p0003 ", " p0003\t"])
def test_a_dataset_spelling_the_id_with_spaces_still_matches_the_deny_under_opt_out(home, tmp_path, cell):
    """Under opt-out a patient without a matching record is used: an id cell padded with spaces must still
    be the denying patient's id, or the deny would be missed."""
    set_policy(home, 'consent_model = "opt-out"\n')
    spec = study()
    approve(home, spec)
    deny(home, VICTIM)
    ids = [cell if p == VICTIM else p for p in PATIENTS]
    path = tmp_path / "padded.csv"
    rows = [f'"{p}",{i % 7 / 3:.3f},{i % 5 - 2},{i % 2}' for i, p in enumerate(ids)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    site, client = agent(home, {"cohort": uri(path)})
    site.handle(task(spec))
    assert client.failures == []
    assert VICTIM not in kept_patients(home, "tk-1")
    assert rows_used(client.results[0]) == len(PATIENTS) - 1


# --- a dataset re-registered so that its rows carry no patient id -------------------------------------------


def test_under_the_default_model_a_dataset_without_ids_is_refused_once_consent_records_exist(home, tmp_path):
    spec = study()
    approve(home, spec)
    permit_everyone(home)
    withdraw(home, VICTIM)
    # the site's dataset re-registered without its id column: rows could only be named by position
    site, client = agent(home, {"cohort": write_csv_without_ids(tmp_path / "no-ids.csv")})
    site.handle(task(spec))
    assert [f.code for f in client.failures] == [FailureCode.CONSENT]
    assert client.results == []


def test_under_opt_out_a_dataset_without_ids_is_not_trained_on_while_someone_has_denied(home, tmp_path):
    set_policy(home, 'consent_model = "opt-out"\n')
    spec = study()
    approve(home, spec)
    withdraw(home, VICTIM)  # the patient opted out: a deny in force from now
    # the same rows, the dataset re-registered without `id=`: the site can no longer tell which row is whose
    site, client = agent(home, {"cohort": write_csv_without_ids(tmp_path / "no-ids.csv")})
    site.handle(task(spec))
    used = sum(rows_used(r) for r in client.results)
    assert [f.code for f in client.failures] == [FailureCode.CONSENT]  # consent cannot be checked
    assert used == 0


def test_control_under_opt_out_with_ids_the_denying_patient_is_excluded(home, tmp_path):
    set_policy(home, 'consent_model = "opt-out"\n')
    spec = study()
    approve(home, spec)
    withdraw(home, VICTIM)
    site, client = agent(home, {"cohort": uri(cohort_csv(tmp_path / "d.csv"))})
    site.handle(task(spec))
    assert client.failures == []
    assert kept_patients(home, "tk-1") == set(PATIENTS) - {VICTIM}


# --- another purpose ----------------------------------------------------------------------------------------


def test_a_spec_whose_purpose_nobody_permitted_trains_on_nobody(home, tmp_path):
    """Everyone permitted 'research'; a study stating another purpose (approved as such) finds no cohort
    under opt-in and is refused before data, never trained on the 'research' permits."""
    spec = study(purpose="marketing")
    approve(home, spec)
    permit_everyone(home, purpose="research")
    site, client = agent(home, {"cohort": f"file://{tmp_path}/absent.csv?label=label&id=patient_id"})
    site.handle(task(spec))
    assert [f.code for f in client.failures] == [FailureCode.MIN_COHORT]
    assert client.results == []
