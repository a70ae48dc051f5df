"""Governance through the real services: a real orchestrator and real agents as processes over HTTPS.

One federation serves the whole file: ``north`` (breast-cancer site 0) holds consent records, 20 % of its
patients denying; ``south`` (site 1) has imported none; ``gate``'s dataset is a CSV file that is deleted once
its agent has started (``site serve`` checks every dataset when it starts), so any task that got as far as
loading data would fail with ``dataset_unavailable``: a refusal with another code was made before the data
was loaded.

A study waits for the approval of every site it names; to put an unapproved spec in front of ``gate``'s gate,
the orchestrator is told ``gate`` approved it (as a mistaken or compromised orchestrator could act anyway)
while ``gate``'s steward never did.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from fedhealth.agent import SiteHome, TaskContext, TaskRefused, report_approval
from fedhealth.agent._governance import GovernanceGate, SiteGovernance
from fedhealth.cli import app
from fedhealth.client import ClientError
from fedhealth.core import decode_tensors
from fedhealth.crypto import IdentityKey
from fedhealth.data import open_dataset
from fedhealth.governance import (
    AuditEntry,
    AuditEventType,
    AuditLog,
    PolicyError,
    SignedSpec,
    consent_snapshot_hash,
    read_stored_log,
    site_anchors,
    spec_hash,
)
from fedhealth.privacy import DpSgdRelease, epsilon
from fedhealth.protocol import FailureCode, PrivacySpec, StudyStatus, Task, TaskKind, TaskStatus
from fedhealth.runtime import run_study_in_memory
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, breast_spec, logreg_recipe

pytestmark = pytest.mark.e2e
runner = CliRunner()
TRAINING = ["north", "south"]
DATA = {"north": BREAST_SITES["hospital-a"], "south": BREAST_SITES["hospital-b"]}
PURPOSE = "research"


def cli(*args: str) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("governance")
    with LocalFederation(root, log_level="warning") as fed:
        fed.start_orchestrator()
        for site in TRAINING:
            fed.add_site(site)
        fed.add_site("gate")
        yield fed


@pytest.fixture(scope="module")
def north_consent(fed, tmp_path_factory):
    """north's consent registry: every 5th training patient, and every 5th held-out patient, denies the
    purpose; the others permit. Returns the training ids and every denying patient."""
    full = open_dataset(DATA["north"])
    ids, held_out = full.patient_ids_train, full.patient_ids_test
    denying = set(ids[::5]) | set(held_out[::5])
    csv = tmp_path_factory.mktemp("consent") / "north.csv"
    rows = [f"{p},{PURPOSE},{'deny' if p in denying else 'permit'},2020-01-01,," for p in (*ids, *held_out)]
    csv.write_text(
        "patient_id,purpose,decision,valid_from,valid_until,withdrawn_at\n" + "\n".join(rows) + "\n"
    )
    result = cli("site", "consent", "import", csv, "--home", fed.site_home("north").root)
    assert result.exit_code == 0, result.output
    assert f"{len(ids) + len(held_out)} added" in result.stdout
    return ids, denying


@pytest.fixture(scope="module")
def running(fed, north_consent, tmp_path_factory):
    fed.start_agent("north", {"breast-cancer": DATA["north"]})
    fed.start_agent("south", {"breast-cancer": DATA["south"]})
    gate_csv = tmp_path_factory.mktemp("gate") / "gate.csv"
    gate_csv.write_text("x1,x2,y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)))
    fed.start_agent("gate", {"breast-cancer": f"file://{gate_csv}?label=y"})
    fed.wait_for_sites(["north", "south", "gate"])
    gate_csv.unlink()  # checked when the agent started; gone by the first task
    return fed


def tell_orchestrator_gate_approved(fed: LocalFederation, spec: Any) -> None:
    """The orchestrator believes ``gate`` approved ``spec``; gate's steward did not."""
    report_approval(
        fed.site_home("gate"), spec_hash(spec.model_dump(mode="json")), approved=True, url=fed.url
    )


@pytest.fixture(scope="module")
def trained(running):
    spec = breast_spec(TRAINING, rounds=2, name="consented")
    study = running.create_study(spec)
    final = running.wait_for_study(study.study_id, timeout=180)
    assert final.status is StudyStatus.COMPLETED, final.reason
    return spec, final


def site_entries(fed: LocalFederation, site: str) -> list[AuditEntry]:
    engine = create_engine(f"sqlite:///{fed.site_home(site).database_path}")
    try:
        return list(read_stored_log(engine).entries)
    finally:
        engine.dispose()


def orchestrator_entries(fed: LocalFederation) -> list[AuditEntry]:
    lines = fed.operator.request("GET", "/api/v1/governance/audit").text.splitlines()
    assert json.loads(lines[0])["format"] == "fedhealth.audit-log"
    return [AuditEntry.from_json(json.loads(line)) for line in lines[1:] if line.strip()]


def provenance(fed: LocalFederation, model: str) -> dict[str, Any]:
    return fed.operator.request("GET", f"/api/v1/governance/models/{model}/provenance").json()


# --- consent at training time ------------------------------------------------------------------------------


def test_training_uses_exactly_the_patients_whose_consent_permits_the_purpose(
    running, north_consent, trained
):
    ids, denying = north_consent
    spec, final = trained
    full = open_dataset(DATA["north"])
    keep = np.array([p not in denying for p in ids])
    keep_test = np.array([p not in denying for p in full.patient_ids_test])
    assert 0.19 < 1 - keep.mean() < 0.21
    # the permitted rows, training and held-out, selected here by the data layer (not the agent's code path)
    permitted = full.select(keep, keep_test)
    south = open_dataset(DATA["south"])
    # by count: every north training task trained on exactly the permitted rows and reported metrics on the
    # permitted held-out rows; south (no consent records imported, so nobody denied) on all of its rows
    for r in final.rounds[:-1]:
        by_site = {t.site: t for t in r.tasks}
        assert by_site["north"].metrics.num_samples == int(keep.sum())
        assert by_site["north"].metrics.num_eval_samples == int(keep_test.sum())
        assert by_site["south"].metrics.num_samples == south.num_train
    # by fingerprint and consent snapshot, as the orchestrator's provenance records them: keyed commitments,
    # which north opens to an auditor, each to the digest of exactly the permitted rows
    lineage = provenance(running, final.model_digest)["lineage"]
    applied = [e for e in site_entries(running, "north") if e.type == AuditEventType.CONSENT_APPLIED]
    day = date.fromisoformat(applied[-1].payload["date"])
    with SiteGovernance(running.site_home("north")) as governance:
        revealed = governance.commitments.reveal(final.study_id, to="test auditor")
    revealed.verify()
    opened = {o.commitment: o.digest for o in revealed.openings}
    permitted_patients = [*permitted.patient_ids_train, *permitted.patient_ids_test]
    for version in lineage[:-1]:
        assert opened[version["dataset_fingerprints"]["north"]] == permitted.fingerprint
        assert opened[version["consent_snapshots"]["north"]] == consent_snapshot_hash(
            permitted_patients, PURPOSE, day
        )
        assert version["dataset_fingerprints"]["north"] != permitted.fingerprint  # never the bare hash
        assert version["dataset_fingerprints"]["south"] not in (south.fingerprint, "unattested")
    # the counts in north's log, over distinct patients
    assert applied[-1].payload["counts"]["kept"] == len(permitted_patients)
    assert applied[-1].payload["counts"]["denied"] == len(denying)
    assert applied[-1].payload["consent_model"] == "opt-in"
    # and the model is, bit for bit, the one trained in memory on exactly these rows
    reference = run_study_in_memory(spec, {"north": permitted, "south": south})
    model, _ = decode_tensors(running.model_bytes(final.study_id))
    for name, value in reference.params.items():
        np.testing.assert_array_equal(model[name], value)


def test_provenance_records_each_version_with_its_parent_spec_and_sites(running, trained):
    spec, final = trained
    lineage = provenance(running, final.model_digest)["lineage"]
    assert [v["round"] for v in lineage] == [2, 1, 0]
    assert [v["model_digest"] for v in lineage[:-1]] == [r.model_digest for r in reversed(final.rounds[:-1])]
    assert lineage[0]["parent_digest"] == lineage[1]["model_digest"]
    assert lineage[-1]["parent_digest"] is None
    assert {v["spec_hash"] for v in lineage} == {spec_hash(spec.model_dump(mode="json"))}
    assert all(v["n_sites"] == 2 for v in lineage[:-1])
    prov = running.operator.request(
        "GET",
        f"/api/v1/governance/models/{final.model_digest[:12]}/provenance",
        params={"format": "prov-json"},
    ).json()
    assert f"fh:model/{final.model_digest}" in prov["entity"]


def test_a_withdrawal_after_training_flags_every_model_version_trained_on_the_patient(
    running, north_consent, trained, tmp_path
):
    ids, denying = north_consent
    _, final = trained
    home = running.site_home("north").root
    # a patient who denied was in no snapshot: withdrawing flags nothing
    never_used = sorted(denying)[0]
    result = cli("site", "consent", "withdraw", never_used, "--purpose", PURPOSE, "--home", home)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[0])["snapshot_hashes"] == []
    assert "0 model version(s) flagged" in result.stderr
    # a patient who permitted and was trained on
    used = next(p for p in ids if p not in denying)
    result = cli("site", "consent", "withdraw", used, "--purpose", PURPOSE, "--home", home)
    assert result.exit_code == 0, result.output
    notice = json.loads(result.stdout.splitlines()[0])
    assert used not in result.stdout
    lineage = provenance(running, final.model_digest)
    trained_versions = {v["model_digest"] for v in lineage["lineage"] if v["round"] > 0}
    assert {f["model_digest"] for f in lineage["flags"]} == trained_versions
    assert {f["notice_id"] for f in lineage["flags"]} == {notice["notice_id"]}
    assert all(f["site"] == "north" for f in lineage["flags"])
    # the card says so
    credential = running.home.admin_credential
    out = tmp_path / "card.md"
    remote = ["--credential", credential, "--orchestrator", running.url]
    result = cli("model", "card", final.model_digest[:16], *remote, "--out", out)
    assert result.exit_code == 0, result.output
    assert "**Flagged:**" in out.read_text()
    shown = cli("provenance", "show", final.model_digest[:16], *remote)
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[0].endswith("[FLAGGED: consent withdrawn]")
    # the orchestrator logged the notice it received
    received = [e for e in orchestrator_entries(running) if e.type == AuditEventType.CONSENT_WITHDRAWN]
    assert [e.payload["notice_id"] for e in received][-1] == notice["notice_id"]


def test_provenance_records_the_dp_parameters_and_the_epsilon_each_site_spent(running):
    for site in TRAINING:
        running.set_budget(site, "breast-cancer", 100.0, 1e-5)
    privacy = PrivacySpec(
        delta=1e-5, noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=0.1, steps_per_round=4
    )
    spec = breast_spec(TRAINING, rounds=2, name="private", privacy=privacy)
    final = running.wait_for_study(running.create_study(spec).study_id, timeout=240)
    assert final.status is StudyStatus.COMPLETED, final.reason
    lineage = provenance(running, final.model_digest)["lineage"]
    # each round's version states the study's cumulative spend at each site, as its ledger accounted it
    for version, rounds in zip(lineage[:-1], (2, 1), strict=True):
        assert version["dp_params"]["level"] == "record"
        assert version["dp_params"]["noise_multiplier"] == 1.1
        assert version["dp_params"]["delta"] == 1e-5
        expected = epsilon(DpSgdRelease(noise_multiplier=1.1, sample_rate=0.1, steps=4 * rounds), delta=1e-5)
        for site in TRAINING:
            assert version["epsilon_spent"][site] == pytest.approx(expected, rel=1e-6)
    spent = [e for e in orchestrator_entries(running) if e.type == AuditEventType.BUDGET_SPENT]
    assert {e.payload["site"] for e in spent if e.payload["study_id"] == final.study_id} == set(TRAINING)


# --- refusals before any data is read ----------------------------------------------------------------------


def gate_study(fed: LocalFederation, name: str, *, approve: bool, **changes: Any):
    spec = breast_spec(["gate"], rounds=1, name=name, **changes)
    if not approve:
        tell_orchestrator_gate_approved(fed, spec)
    study = fed.create_study(spec, approve=approve)
    final = fed.wait_for_study(study.study_id, timeout=60)
    assert final.status is StudyStatus.FAILED
    (task,) = final.rounds[0].tasks
    assert task.status is TaskStatus.FAILED
    return spec, task


def assert_refused_in_both_logs(fed: LocalFederation, task_id: str, rule: str, words: str) -> str:
    (site_refusal,) = [
        e
        for e in site_entries(fed, "gate")
        if e.type == AuditEventType.TASK_REFUSED and e.payload["task_id"] == task_id
    ]
    (orch_refusal,) = [
        e
        for e in orchestrator_entries(fed)
        if e.type == AuditEventType.TASK_REFUSED and e.payload["task_id"] == task_id
    ]
    assert site_refusal.payload["rule"] == orch_refusal.payload["rule"] == rule
    # the site's log has the decision's own sentence; the orchestrator only the rule's fixed one
    assert words in site_refusal.payload["reason"]
    assert orch_refusal.payload["reason"] == FailureCode(rule).message
    assert orch_refusal.payload["site"] == "gate"
    # nothing was read: no consent was applied for this task (the patient list is never opened either)
    applied = [
        e
        for e in site_entries(fed, "gate")
        if e.type == AuditEventType.CONSENT_APPLIED and e.payload.get("task_id") == task_id
    ]
    assert applied == []
    return str(site_refusal.payload["reason"])


def set_policy(fed: LocalFederation, site: str, toml: str | None) -> None:
    path = fed.site_home(site).policy_path
    if toml is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(toml)


def test_a_task_that_passes_governance_at_gate_would_fail_on_its_missing_data(running):
    """The control for the refusals below: at ``gate`` an allowed task reaches its (absent) data."""
    set_policy(running, "gate", None)
    _, task = gate_study(running, "control", approve=True)
    assert task.reason.startswith("dataset_unavailable: ")


def test_an_unapproved_study_is_refused_with_the_reason_in_both_logs(running):
    set_policy(running, "gate", None)
    _, task = gate_study(running, "unapproved", approve=False)
    assert task.reason.startswith("study_approval: ")
    assert_refused_in_both_logs(running, task.task_id, "study_approval", "is not approved")


def test_a_spec_changed_after_approval_is_refused(running):
    set_policy(running, "gate", None)
    approved = breast_spec(["gate"], rounds=1, name="drifting")
    running.approve("gate", approved, reason="IRB-2026-07")
    changed = approved.model_copy(update={"recipe": logreg_recipe(30, learning_rate=0.5)})
    tell_orchestrator_gate_approved(running, changed)
    study = running.create_study(changed, approve=False)
    final = running.wait_for_study(study.study_id, timeout=60)
    (task,) = final.rounds[0].tasks
    assert task.reason.startswith("study_approval: ")
    reason = assert_refused_in_both_logs(running, task.task_id, "study_approval", "changed after approval")
    assert spec_hash(approved.model_dump(mode="json"))[:12] in reason  # the approved spec is named


def test_a_recipe_the_site_policy_does_not_allow_is_refused(running):
    set_policy(running, "gate", 'allowed_recipes = ["synthetic"]\n')
    _, task = gate_study(running, "logreg-at-gate", approve=True)
    assert task.reason.startswith("allowed_recipes: ")
    assert_refused_in_both_logs(running, task.task_id, "allowed_recipes", "'logreg' is not among")
    changes = [
        e
        for e in site_entries(running, "gate")
        if e.type == AuditEventType.CONFIGURATION_CHANGED and e.payload.get("setting") == "site_policy"
    ]
    assert changes[-1].payload["value"]["policy"]["allowed_recipes"] == ["synthetic"]


def test_a_cohort_below_k_after_consent_is_refused_before_the_data_is_loaded(running, tmp_path):
    set_policy(running, "gate", "min_cohort_k = 20\n")
    csv = tmp_path / "gate.csv"
    csv.write_text("patient_id,purpose,decision\n" + "".join(f"g{i},{PURPOSE},permit\n" for i in range(12)))
    assert cli("site", "consent", "import", csv, "--home", running.site_home("gate").root).exit_code == 0
    _, task = gate_study(running, "tiny-cohort", approve=True)
    assert task.reason.startswith("min_cohort_k: ")
    assert_refused_in_both_logs(running, task.task_id, "min_cohort_k", "smaller than the site's minimum k=20")
    decisions = [
        e
        for e in site_entries(running, "gate")
        if e.type == AuditEventType.POLICY_DECISION and e.payload["subject"].get("task_id") == task.task_id
    ]
    assert decisions[-1].payload["rule"] == "min_cohort_k"
    assert decisions[-1].payload["subject"]["stage"] == "before data"
    set_policy(running, "gate", None)


def test_a_forged_owner_signature_is_refused_by_the_orchestrator(running, trained):
    spec = breast_spec(TRAINING, rounds=1, name="forged")
    forged = SignedSpec.sign(spec.model_dump(mode="json"), owner="admin", key=IdentityKey.generate())
    with pytest.raises(ClientError) as refused:
        running.operator.request(
            "POST",
            "/api/v1/governance/studies",
            json={"spec": spec.model_dump(mode="json"), "signature": forged.signature.hex()},
        )
    assert refused.value.status == 422
    # the studies the sites did receive carry the owner's signature, and each site recorded it as signed
    with SiteGovernance(running.site_home("north")) as north:
        assert all(a.signed for a in north.approvals.list())


# --- the logs themselves -----------------------------------------------------------------------------------


def test_the_real_logs_verify_clean_and_each_matches_the_other_sides_anchors(running, trained):
    orchestrator = running.home.root
    sites = [running.site_home(s).root for s in ("north", "south", "gate")]
    peers = [a for s in sites for a in ("--peer", s)]
    result = cli("audit", "verify", "--home", orchestrator, *peers)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ")
    for site in sites:
        result = cli("audit", "verify", "--home", site, "--peer", orchestrator)
        assert result.exit_code == 0, result.output
        assert "anchor(s)" in result.stderr
    assert running.operator.request("GET", "/api/v1/governance/audit/verify").json()["ok"] is True
    # the anchors are real: north's log holds round commitments, and the orchestrator holds north's heads
    assert any(e.type == AuditEventType.ANCHOR_RECORDED for e in site_entries(running, "north"))
    assert site_anchors(orchestrator_entries(running), "north")


def _snapshot_home(source: Path, target: Path, database: str) -> Path:
    """Copy a home, its SQLite database through SQLite's backup API (consistent while the service runs)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.sqlite*", "blobs", "reports"))
    (target / database).parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(source / database) as src, sqlite3.connect(target / database) as dst:
        src.backup(dst)
    return target / database


def _rewrite(database: Path, key: IdentityKey, edit: int) -> None:
    """Re-sign the whole log with its writer's own key, changing entry ``edit``'s payload: a valid chain."""
    engine = create_engine(f"sqlite:///{database}")
    entries = list(read_stored_log(engine).entries)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM gov_audit_entries"))
    log = AuditLog(engine, key, "rewriter")
    for entry in entries:
        payload = dict(entry.payload)
        if entry.seq == edit:
            payload["rewritten"] = True
        log.append(AuditEventType(entry.type), payload, actor=entry.actor)
    engine.dispose()


def test_a_site_log_rewritten_after_its_head_was_anchored_is_detected(running, trained, tmp_path):
    home = _snapshot_home(running.site_home("north").root, tmp_path / "north", "site.sqlite").parent
    anchored = sorted(h.seq for h in site_anchors(orchestrator_entries(running), "north"))
    edit = anchored[0] - 1  # an entry before the first head the orchestrator holds
    _rewrite(home / "site.sqlite", IdentityKey.load(home / "identity.key"), edit)
    alone = cli("audit", "verify", "--home", home)
    assert alone.exit_code == 0, alone.output  # signed with the site's own key, the chain alone is fine
    result = cli("audit", "verify", "--home", home, "--peer", running.home.root)
    assert result.exit_code == 1
    assert result.stdout.startswith(f"bad entry {anchored[0]}: anchor_mismatch")


def test_an_orchestrator_log_rewritten_after_sites_anchored_it_is_detected(running, trained, tmp_path):
    home = tmp_path / "orchestrator"
    _snapshot_home(running.home.root, home, "state/orchestrator.sqlite")
    held = sorted(
        e.payload["orchestrator_head"]["seq"]
        for e in site_entries(running, "north")
        if e.type == AuditEventType.ANCHOR_RECORDED
    )
    _rewrite(home / "state" / "orchestrator.sqlite", IdentityKey.load(home / "signing.key"), held[0])
    assert cli("audit", "verify", "--home", home).exit_code == 0
    result = cli("audit", "verify", "--home", home, "--peer", running.site_home("north").root)
    assert result.exit_code == 1
    assert result.stdout.startswith(f"bad entry {held[0]}: anchor_mismatch")


def test_an_entry_edited_in_a_site_database_is_named(running, trained, tmp_path):
    home = _snapshot_home(running.site_home("south").root, tmp_path / "south", "site.sqlite").parent
    with sqlite3.connect(home / "site.sqlite") as conn:
        conn.execute("UPDATE gov_audit_entries SET actor = 'someone-else' WHERE seq = 5")
    result = cli("audit", "verify", "--home", home)
    assert result.exit_code == 1
    assert result.stdout.startswith("bad entry 5: hash_mismatch")


# --- the gate in process: what a misbehaving orchestrator could send --------------------------------------


def _site_home(tmp_path: Path) -> SiteHome:
    home = SiteHome(tmp_path / "site")
    home.root.mkdir()
    IdentityKey.generate().save(home.identity_path)
    home.settings_path.write_text(json.dumps({"site": "solo", "orchestrator": "https://127.0.0.1:1"}))
    return home


def test_the_gate_refuses_a_spec_whose_owner_signature_does_not_verify_before_reading_data(tmp_path):
    home = _site_home(tmp_path)
    spec = breast_spec(["solo"], rounds=1, name="signed")
    owner = IdentityKey.generate()
    signature = SignedSpec.sign(spec.model_dump(mode="json"), owner="admin", key=owner).signature
    with SiteGovernance(home) as governance:
        governance.approve(spec, reason="ok", steward="dana")
    altered = spec.model_copy(update={"rounds": 2})  # what the owner did not sign
    task = Task(
        task_id="t-1",
        study_id="st-1",
        round=1,
        kind=TaskKind.TRAIN,
        dataset="breast-cancer",
        recipe=altered.recipe,
        model_digest="0" * 64,
        seed=altered.seed,
        deadline=datetime.now(UTC),
        spec=altered,
        spec_signature=signature.hex(),
        owner_public_key=owner.public().raw.hex(),
    )
    gate = GovernanceGate.from_home(home)
    ctx = TaskContext(task=task, site="solo")
    with pytest.raises(TaskRefused) as refused:
        gate.before_data(ctx)
    assert refused.value.code == "spec_signature"
    assert not ctx.data_read
    gate.governance.close()


def test_the_gate_refuses_a_task_that_would_run_other_than_its_approved_spec(tmp_path):
    home = _site_home(tmp_path)
    spec = breast_spec(["solo"], rounds=1, name="approved")
    with SiteGovernance(home) as governance:
        governance.approve(spec, reason="ok", steward="dana")
    gate = GovernanceGate.from_home(home)
    base = {
        "task_id": "t-2",
        "study_id": "st-2",
        "round": 1,
        "kind": TaskKind.TRAIN,
        "dataset": "breast-cancer",
        "recipe": spec.recipe,
        "model_digest": "0" * 64,
        "seed": spec.seed,
        "deadline": datetime.now(UTC),
        "spec": spec,
    }
    bolder = logreg_recipe(30, learning_rate=5.0)
    for changes in ({"recipe": bolder}, {"dataset": "icu"}, {"seed": 8}, {"round": 2}):
        ctx = TaskContext(task=Task(**{**base, **changes}), site="solo")
        with pytest.raises(TaskRefused) as refused:
            gate.before_data(ctx)
        assert refused.value.code == "spec_mismatch", changes
    gate.before_data(TaskContext(task=Task(**base), site="solo"))  # the task as specified passes
    gate.governance.close()


def test_an_unusable_policy_file_stops_the_gate_naming_the_key(tmp_path):
    home = _site_home(tmp_path)
    home.policy_path.write_text("min_cohort = 5\n")
    with pytest.raises(PolicyError, match="min_cohort"):
        GovernanceGate.from_home(home)
    home.policy_path.write_text('consent_model = "maybe"\n')
    with pytest.raises(PolicyError, match="consent_model"):
        GovernanceGate.from_home(home)


def test_a_steward_approves_a_spec_file_before_the_study_starts(tmp_path):
    home = _site_home(tmp_path)
    spec = breast_spec(["solo"], rounds=1, name="planned")
    path = tmp_path / "study.json"
    path.write_text(json.dumps(spec.model_dump(mode="json", exclude_defaults=True)))  # as an owner writes it
    digest = spec_hash(spec.model_dump(mode="json"))
    wrong = cli("site", "approvals", "show", "ab" * 6, "--spec", path, "--home", home.root, "--offline")
    assert wrong.exit_code == 1
    assert f"hashes to {digest}" in wrong.stderr
    shown = cli("site", "approvals", "show", digest[:12], "--spec", path, "--home", home.root, "--offline")
    assert shown.exit_code == 0, shown.output
    approve = ["site", "approve", digest[:12], "--reason", "IRB-1", "--home", home.root, "--no-report"]
    result = cli(*approve)
    assert result.exit_code == 0, result.output
    assert digest in result.stdout
    listed = cli("site", "approvals", "--home", home.root, "--offline")
    assert f"{digest}  approved  planned" in listed.stdout
    with SiteGovernance(home) as governance:
        assert governance.approvals.check(spec.model_dump(mode="json")).allowed
