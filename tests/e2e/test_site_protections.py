"""The site's own protections through the real services: a real orchestrator and real agents as processes.

- finding 12: a site home is 0700 and its keys and database (with the database's -wal and -shm) 0600, the
  orchestrator's home the same; a home loosened later is tightened when its service starts.
- finding 16: a CSV parse error at a site reaches the orchestrator as a code: neither the file's path nor the
  patient id in the parse error is in the orchestrator's log, its database, the study report or its audit
  entries, and the site's ledger charged nothing; the site's own log keeps the detail.
- finding 17: consent governs evaluation as it governs training; a withdrawal is excluded from the next
  study's training and evaluation rows by the agent reading its real file.

The module runs with umask 022 (the common default), the setting under which main created world-readable
homes.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fedhealth.cli import app
from fedhealth.core import decode_tensors
from fedhealth.data import open_dataset
from fedhealth.governance import AuditEntry
from fedhealth.protocol import PrivacySpec, StudySpec, StudyStatus, TaskKind, TaskStatus
from fedhealth.runtime import run_study_in_memory
from fedhealth.sim import LocalFederation
from support import logreg_recipe

pytestmark = pytest.mark.e2e
runner = CliRunner()
PURPOSE = "research"
DELTA = 1e-5
N_PATIENTS = 80


def cli(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def write_cohort(path: Path, prefix: str) -> Path:
    """A real CSV file: a patient id column, three numeric features, a binary label."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(N_PATIENTS, 3))
    y = (x @ np.array([1.0, -0.7, 0.4]) + rng.normal(scale=0.5, size=N_PATIENTS) > 0).astype(int)
    rows = [f"{prefix}{i:04d},{x[i, 0]:.5f},{x[i, 1]:.5f},{x[i, 2]:.5f},{y[i]}" for i in range(N_PATIENTS)]
    path.write_text("patient_id,age,marker,dose,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hospital-files")
    (root / "ward-7").mkdir()
    return {
        # numeric ids at first: `site serve` checks its datasets when it starts and would refuse this one
        # (see the fed fixture, which breaks it once the agent runs)
        "ward": write_cohort(root / "ward-7" / "cohort.csv", ""),
        "clinic": write_cohort(root / "clinic.csv", "c"),
    }


def uris(files: dict[str, Path]) -> dict[str, str]:
    return {
        # the id column is not declared, so 'p0000' is read as a feature: a parse error naming it and the file
        "ward": f"file://{files['ward']}?label=label",
        "clinic": f"file://{files['clinic']}?label=label&id=patient_id&test_fraction=0.3&seed=0",
    }


@pytest.fixture(scope="module")
def fed(tmp_path_factory, umask_022, files) -> Iterator[LocalFederation]:
    with LocalFederation(tmp_path_factory.mktemp("site-protections"), log_level="warning") as fed:
        fed.start_orchestrator()
        for site in ("ward", "clinic"):
            fed.add_site(site)
        fed.set_budget("ward", "cohort", 5.0, DELTA)
        locations = uris(files)
        for site in ("ward", "clinic"):
            fed.start_agent(site, {"cohort": locations[site]})
        fed.wait_for_sites(["ward", "clinic"])
        # the ward's file changes under the running agent (a nightly export gone wrong): its ids become text
        write_cohort(files["ward"], "p")
        yield fed


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def orchestrator_entries(fed: LocalFederation) -> list[AuditEntry]:
    lines = fed.operator.request("GET", "/api/v1/governance/audit").text.splitlines()
    return [AuditEntry.from_json(json.loads(line)) for line in lines[1:] if line.strip()]


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# --- finding 16: PHI in failure reasons --------------------------------------------------------------------


@pytest.fixture(scope="module")
def parse_error_study(fed):
    spec = StudySpec(
        name="ward-dp",
        dataset="cohort",
        recipe=logreg_recipe(4, learning_rate=0.5),
        rounds=1,
        train_sites=["ward"],
        min_sites=1,
        round_deadline_s=60.0,
        privacy=PrivacySpec(
            delta=DELTA, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2, steps_per_round=3
        ),
    )
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=120)
    return final


def test_a_parse_error_reaches_the_orchestrator_as_its_code_and_nothing_else(fed, files, parse_error_study):
    final = parse_error_study
    (task,) = final.rounds[0].tasks
    assert task.status is TaskStatus.FAILED
    assert (
        task.reason == "dataset_invalid: the site's dataset does not fit the study (format, schema or values)"
    )
    secrets = [str(files["ward"]), "ward-7", "cohort.csv", "p0000"]
    report = fed.report(final.study_id)
    shown = {
        "study api": fed.operator.request("GET", f"/api/v1/studies/{final.study_id}").text,
        "report": json.dumps(report),
        "audit entries": json.dumps([e.to_json() for e in orchestrator_entries(fed)]),
        "privacy table": fed.operator.request("GET", f"/api/v1/studies/{final.study_id}/privacy").text,
    }
    wait_for(lambda: any((fed.state_dir / "reports").glob(f"{final.study_id}.*")))
    for path in (fed.state_dir / "reports").glob(f"{final.study_id}.*"):
        shown[f"report file {path.name}"] = path.read_text()
    fed.stop_orchestrator()  # its log flushed, its database checkpointed
    try:
        shown["orchestrator log"] = (fed.logs / "orchestrator.log").read_text()
        for path in fed.state_dir.glob("orchestrator.sqlite*"):
            shown[f"database {path.name}"] = path.read_bytes().decode("latin-1")
    finally:
        fed.start_orchestrator()
    for where, text in shown.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} reached the {where}"
    # the site's ledger: the reservation was released, nothing charged
    statement = fed.budget_ledger("ward").statement("cohort")
    assert statement.spent_epsilon == 0.0
    assert fed.budget_ledger("ward").pending("cohort") == []
    # the site's own log has what its staff need
    site_log = (fed.logs / "agent-ward.log").read_text()
    assert str(files["ward"]) in site_log
    assert "'p0000'" in site_log


# --- finding 12: private homes -----------------------------------------------------------------------------


def test_a_site_home_and_its_keys_and_database_are_private_to_the_site(fed, parse_error_study):
    home = fed.site_home("clinic").root
    assert mode(home) == 0o700
    for name in ("identity.key", "site.json", "ca.pem", "site.sqlite"):
        assert mode(home / name) == 0o600, name
    wal = [p for p in home.glob("site.sqlite-*")]
    assert wal, "the agent holds its database open in WAL mode"
    for path in wal:
        assert mode(path) == 0o600, path.name
    for path in home.iterdir():
        assert not mode(path) & 0o077, path.name


def test_the_orchestrator_home_its_keys_and_database_are_private(fed, parse_error_study):
    home = fed.home.root
    assert mode(home) == 0o700
    assert mode(fed.state_dir) == 0o700
    for name in ("ca.key", "tls.key", "signing.key", "admin.credential"):
        assert mode(home / name) == 0o600, name
    databases = list(fed.state_dir.glob("orchestrator.sqlite*"))
    assert fed.state_dir / "orchestrator.sqlite" in databases
    for path in databases:
        assert mode(path) == 0o600, path.name


def test_a_loosened_site_home_is_tightened_when_its_agent_starts(fed, files):
    home = fed.site_home("clinic").root
    fed.stop_agent("clinic")
    os.chmod(home, 0o755)
    os.chmod(home / "site.sqlite", 0o644)
    os.chmod(home / "site.json", 0o664)
    fed.start_agent("clinic", {"cohort": uris(files)["clinic"]})
    log = fed.logs / "agent-clinic.log"
    wait_for(lambda: "tightened" in log.read_text() or fed.agents["clinic"].poll() is not None, 60)
    fed.wait_for_sites(["clinic"])
    assert mode(home) == 0o700
    assert mode(home / "site.sqlite") == 0o600
    assert mode(home / "site.json") == 0o600
    warnings = [
        line for line in (fed.logs / "agent-clinic.log").read_text().splitlines() if "tightened" in line
    ]
    assert len(warnings) == 1, warnings
    assert "site.sqlite 644" in warnings[0]


# --- finding 17: consent governs every use -----------------------------------------------------------------


@pytest.fixture(scope="module")
def clinic_consent(fed, files, tmp_path_factory) -> tuple[set[str], set[str]]:
    """Every 5th patient denies the purpose, held-out and training patients alike; the rest permit."""
    full = open_dataset(uris(files)["clinic"])
    assert full.patient_ids_test is not None
    everyone = [*full.patient_ids_train, *(full.patient_ids_test)]
    denying = {p for i, p in enumerate(sorted(everyone)) if i % 5 == 0}
    assert denying & set(full.patient_ids_test)
    assert denying & set(full.patient_ids_train)
    csv = tmp_path_factory.mktemp("consent") / "clinic.csv"
    csv.write_text(
        "patient_id,purpose,decision,valid_from,valid_until,withdrawn_at\n"
        + "".join(f"{p},{PURPOSE},{'deny' if p in denying else 'permit'},2020-01-01,,\n" for p in everyone)
    )
    result = cli("site", "consent", "import", csv, "--home", fed.site_home("clinic").root)
    assert result.exit_code == 0, result.output
    return set(everyone), denying


def clinic_spec(name: str) -> StudySpec:
    return StudySpec(
        name=name,
        dataset="cohort",
        recipe=logreg_recipe(3, learning_rate=0.1, batch_size=8),
        rounds=2,
        train_sites=["clinic"],
        min_sites=1,
        round_deadline_s=60.0,
        seed=3,
    )


def run_clinic_study(fed: LocalFederation, name: str):
    spec = clinic_spec(name)
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=180)
    assert final.status is StudyStatus.COMPLETED, final.reason
    return spec, final


def expected_rows(files, excluded: set[str]):
    full = open_dataset(uris(files)["clinic"])
    assert full.patient_ids_test is not None
    keep_train = np.array([p not in excluded for p in full.patient_ids_train])
    keep_test = np.array([p not in excluded for p in full.patient_ids_test])
    return full, keep_train, keep_test


def assert_study_used_exactly(fed, files, spec, final, excluded: set[str]) -> None:
    full, keep_train, keep_test = expected_rows(files, excluded)
    assert not keep_test.all()  # some held-out patients are excluded, or the test shows nothing
    for r in final.rounds:
        (task,) = r.tasks
        assert task.metrics is not None
        if r.kind is TaskKind.TRAIN:
            assert task.metrics.num_samples == int(keep_train.sum())
        assert task.metrics.num_eval_samples == int(keep_test.sum()), r.kind
    # and bit for bit what an in-memory run computes on exactly those rows
    reference = run_study_in_memory(spec, {"clinic": full.select(keep_train, keep_test)})
    model, _ = decode_tensors(fed.model_bytes(final.study_id))
    for name, value in reference.params.items():
        np.testing.assert_array_equal(model[name], value)
    (evaluation,) = final.rounds[-1].tasks
    assert evaluation.metrics.accuracy == reference.evaluation["clinic"].accuracy


def test_evaluation_and_held_out_metrics_use_only_consenting_patients(fed, files, clinic_consent):
    _, denying = clinic_consent
    spec, final = run_clinic_study(fed, "clinic-consent")
    assert_study_used_exactly(fed, files, spec, final, denying)


def test_a_withdrawal_is_excluded_from_the_next_studys_training_and_evaluation(fed, files, clinic_consent):
    _, denying = clinic_consent
    full = open_dataset(uris(files)["clinic"])
    assert full.patient_ids_test is not None
    train_patient = next(p for p in full.patient_ids_train if p not in denying)
    test_patient = next(p for p in full.patient_ids_test if p not in denying)
    run_clinic_study(fed, "before-withdrawal")
    home = fed.site_home("clinic").root
    for patient in (train_patient, test_patient):
        result = cli("site", "consent", "withdraw", patient, "--purpose", PURPOSE, "--home", home)
        assert result.exit_code == 0, result.output
        notice = json.loads(result.stdout.splitlines()[0])
        assert notice["snapshot_hashes"], "the patient was in the earlier study's snapshot"
    spec, final = run_clinic_study(fed, "after-withdrawal")
    assert_study_used_exactly(fed, files, spec, final, denying | {train_patient, test_patient})
    shown = json.dumps(fed.report(final.study_id)) + json.dumps(
        [e.to_json() for e in orchestrator_entries(fed)]
    )
    for patient in (train_patient, test_patient):
        assert re.search(rf"\b{patient}\b", shown) is None
