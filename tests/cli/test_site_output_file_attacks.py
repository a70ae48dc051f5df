"""Another local account on a shared hospital host, against the files the site's and the steward's commands
write (docs/security.md, "Operators"): what tests/cli/test_operator_local_file_attacks.py (the operator's
downloads, ``model predict --out``, ``study init --out``) does not try.

- ``audit export --out`` (and the Python API ``export_stored_log`` / ``write_jsonl``): an audit log names
  stewards, consent decisions and salted patient references. It is written 0600 under any umask, never
  through a symbolic link planted at the path (into another account's file, or over one of the steward's
  own), and a FIFO planted there is replaced, not opened (opening it would block the command).
- ``model card --out`` and ``stats run --out``: released aggregate content, but still never written through
  a planted link (``stats run --out`` is a report like ``study download --report``: 0600).
- ``onboarding pack --out``: promises never to overwrite a file; a dangling link at one of the kit's names
  must not create the link's target.
- ``model export --out`` (``write_package``): a package folder that is a symbolic link, or that another
  account owns, is refused: that account could swap the package's files after the export (or, with
  ``--force``, the link would redirect the replacement onto the operator's other package).
- ``demo --out``: an output folder that is a link or another account's is refused (the demo sites' keys go
  under it); ``benchmark privacy/membership --plot`` and ``--out``: never written through a planted link.

Every refusal is one ``error:`` line. Root runs these tests: "another account" is uid 1000 (``os.chown``).
"""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
from rich.console import Console
from sqlalchemy import create_engine

import fedhealth.client as client_module
from fedhealth.client import OperatorClient
from fedhealth.core import ManualClock, encode_tensors
from fedhealth.crypto import IdentityKey, create_ca
from fedhealth.governance import (
    ModelProvenance,
    ProvenanceStore,
    create_governance_tables,
    export_stored_log,
    read_stored_log,
    spec_hash,
    write_jsonl,
)
from fedhealth.learning import LOGREG_RECIPE, LogRegParams, PackageError, logreg_init, write_package
from fedhealth.protocol import OperatorCredential, StudyStatus
from support import cli, file_mode, one_error, package_origin

OTHER_UID = 1000  # the other local account
PATIENT = "p-4711"  # a patient id in the consent file: never in a message
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
API_KEY = "fhk_" + "k" * 43
URL = "https://127.0.0.1:9"  # nothing listens there


def attackers_file(path: Path) -> Path:
    """A world-writable file another account owns and reads: where it would like our data to land."""
    path.write_text("")
    os.chown(path, OTHER_UID, OTHER_UID)
    os.chmod(path, 0o666)
    return path


def plant_link(out: Path, target: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.symlink_to(target)
    return out


def assert_replaced_not_opened(out: Path, reader: int) -> None:
    """The FIFO at ``out`` was replaced by a regular file; nothing was written into the pipe. (The test holds
    the pipe's read end open, so a writer that opened the FIFO would not block: it would write into it.)"""
    try:
        leaked = os.read(reader, 1 << 16)
    except BlockingIOError:
        leaked = b""
    finally:
        os.close(reader)
    assert leaked == b"", "the command wrote into a FIFO planted at its output"
    assert stat.S_ISREG(out.lstat().st_mode)


def plant_fifo(out: Path) -> int:
    os.mkfifo(out, 0o666)
    return os.open(out, os.O_RDONLY | os.O_NONBLOCK)


# --- a site's audit log, with consent records in it ---------------------------------------------------------


@pytest.fixture
def site_db(tmp_path: Path) -> tuple[Path, Path]:
    """A site database whose audit log records a consent import; (database, identity key file)."""
    key_path = tmp_path / "site.key"
    IdentityKey.generate().save(key_path)
    db = tmp_path / "site.sqlite"
    engine = create_engine(f"sqlite:///{db}")
    create_governance_tables(engine)
    engine.dispose()
    consent = tmp_path / "consent.csv"
    consent.write_text(f"patient_id,purpose,decision\n{PATIENT},HRESCH,permit\np-2,HRESCH,deny\n")
    imported = cli(
        "site", "consent", "import", consent, "--db", db, "--identity", key_path, "--site", "north"
    )
    assert imported.exit_code == 0, imported.output
    return db, key_path


def test_audit_export_is_private_under_a_permissive_umask(site_db, tmp_path, permissive_umask):
    db, _ = site_db
    out = tmp_path / "audit.jsonl"
    result = cli("audit", "export", "--db", db, "--out", out)
    assert result.exit_code == 0, result.output
    assert "consent" in out.read_text()
    assert file_mode(out) == 0o600


def test_audit_export_does_not_write_into_a_file_another_account_linked_at_its_path(site_db, tmp_path):
    db, _ = site_db
    (tmp_path / "attacker").mkdir()
    theirs = attackers_file(tmp_path / "attacker" / "loot.jsonl")
    out = plant_link(tmp_path / "shared" / "audit.jsonl", theirs)
    result = cli("audit", "export", "--db", db, "--out", out)
    assert result.exit_code == 0, result.output
    assert theirs.read_text() == ""  # the other account got nothing
    assert not out.is_symlink()
    assert file_mode(out) == 0o600
    assert "consent" in out.read_text()


def test_audit_export_does_not_clobber_the_stewards_file_through_a_planted_link(site_db, tmp_path):
    db, _ = site_db
    victim = tmp_path / "stewards-own-file"
    victim.write_text("precious")
    out = plant_link(tmp_path / "shared" / "audit.jsonl", victim)
    result = cli("audit", "export", "--db", db, "--out", out)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("writer", ["export_stored_log", "write_jsonl"])
def test_the_python_apis_audit_writers_are_private_and_replace_a_planted_link(
    site_db, tmp_path, permissive_umask, writer
):
    db, _ = site_db
    victim = tmp_path / "stewards-own-file"
    victim.write_text("precious")
    out = plant_link(tmp_path / "audit.jsonl", victim)
    engine = create_engine(f"sqlite:///{db}")
    try:
        if writer == "export_stored_log":
            export_stored_log(engine, out)
        else:
            write_jsonl(read_stored_log(engine).entries, out, log_id="main", keys={})
    finally:
        engine.dispose()
    assert victim.read_text() == "precious"
    assert not out.is_symlink()
    assert file_mode(out) == 0o600


def test_audit_export_replaces_a_fifo_planted_at_its_path_instead_of_writing_into_it(site_db, tmp_path):
    db, _ = site_db
    out = tmp_path / "audit.jsonl"
    reader = plant_fifo(out)
    result = cli("audit", "export", "--db", db, "--out", out)
    assert result.exit_code == 0, result.output
    assert_replaced_not_opened(out, reader)


def test_audit_export_into_a_missing_folder_is_one_line_naming_no_patient(site_db, tmp_path):
    db, _ = site_db
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    line = one_error(cli("audit", "export", "--db", db, "--out", blocker / "audit.jsonl"))
    assert PATIENT not in line


# --- model cards -------------------------------------------------------------------------------------------


@pytest.fixture
def provenance_db(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "orch.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    create_governance_tables(engine)
    store = ProvenanceStore(engine)
    digest = "ab" * 32
    store.record(
        ModelProvenance(
            model_digest=digest,
            parent_digest=None,
            study_id="st-1",
            round=1,
            n_sites=1,
            dataset_fingerprints={"a": "fp"},
            consent_snapshots={"a": "cd" * 32},
            spec_hash=spec_hash({"name": "s"}),
            software_version="0.1.0",
            dp_params={"delta": 1e-5},
            epsilon_spent={"a": 0.4},
            created_at=T0,
        )
    )
    engine.dispose()
    return path, digest


def test_model_card_out_does_not_write_through_a_planted_link(provenance_db, tmp_path):
    db, digest = provenance_db
    victim = tmp_path / "stewards-own-file"
    victim.write_text("precious")
    out = plant_link(tmp_path / "shared" / "card.md", victim)
    result = cli("model", "card", digest[:16], "--db", db, "--out", out)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"
    assert not out.is_symlink()
    assert "## Intended use" in out.read_text()


def test_model_card_out_replaces_a_fifo_planted_at_its_path(provenance_db, tmp_path):
    db, digest = provenance_db
    out = tmp_path / "card.md"
    reader = plant_fifo(out)
    result = cli("model", "card", digest[:16], "--db", db, "--out", out)
    assert result.exit_code == 0, result.output
    assert_replaced_not_opened(out, reader)


# --- stats run --out ---------------------------------------------------------------------------------------


def test_stats_run_out_does_not_write_through_a_planted_link_and_is_private(
    tmp_path, monkeypatch, permissive_umask
):
    credential = tmp_path / "admin.credential"
    credential.write_text(
        OperatorCredential(
            orchestrator=URL,
            ca_pem=create_ca("the federation").cert_pem.decode(),
            user="admin",
            api_key=API_KEY,
        ).model_dump_json()
    )
    os.chmod(credential, 0o600)
    report = {"kind": "federated-statistics", "strata": [], "min_cell_count": 5, "sites": ["north"]}
    info = SimpleNamespace(
        study_id="st_1",
        spec_hash="0" * 64,
        status=StudyStatus.COMPLETED,
        reason=None,
        rounds=[SimpleNamespace(metrics=report)],
    )
    monkeypatch.setattr(client_module, "load_spec", lambda path: SimpleNamespace(owner="admin"))
    monkeypatch.setattr(client_module, "load_signing_key", lambda path: IdentityKey.generate())
    monkeypatch.setattr(OperatorClient, "submit_study", lambda self, spec, key, approval_wait_s=None: info)
    monkeypatch.setattr(OperatorClient, "wait_for_study", lambda self, study_id, timeout, interval: info)
    victim = tmp_path / "operators-own-file"
    victim.write_text("precious")
    out = plant_link(tmp_path / "shared" / "stats.json", victim)
    result = cli("stats", "run", tmp_path / "study.toml", "--out", out, "--credential", credential)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"
    assert not out.is_symlink()
    assert json.loads(out.read_text())["kind"] == "federated-statistics"
    assert file_mode(out) == 0o600


# --- onboarding pack ----------------------------------------------------------------------------------------


@pytest.fixture
def orchestrator_home(tmp_path: Path) -> Path:
    from fedhealth.orchestrator import OrchestratorHome, Store, init_home, make_engine, upgrade_database

    root = tmp_path / "orch"
    init_home(root, hosts=["localhost"], url="https://localhost:8443")
    engine = make_engine(OrchestratorHome(root).database_url())
    upgrade_database(engine)
    Store(engine).create_site("alpha", ManualClock(T0).now())
    engine.dispose()
    return root


def test_onboarding_pack_does_not_create_the_target_of_a_dangling_link_at_a_kit_file(
    orchestrator_home, tmp_path
):
    from fedhealth.dashboard import PACK_FILES

    out = tmp_path / "kit"
    out.mkdir()
    target = tmp_path / "stewards-home" / ".profile"  # not there yet: a plain open would create it
    target.parent.mkdir()
    plant_link(out / sorted(PACK_FILES)[0], target)
    line = one_error(cli("onboarding", "pack", "--site", "alpha", "--out", out, "--home", orchestrator_home))
    assert "already holds" in line
    assert not target.exists()


# --- model export -------------------------------------------------------------------------------------------


def _write_logreg_package(out: Path, *, force: bool = False) -> None:
    params = LogRegParams.model_validate({"n_features": 2, "feature_names": ["a", "b"]})
    export = LOGREG_RECIPE.export(params, {k: np.full_like(v, 0.5) for k, v in logreg_init(2, 0).items()})
    weights = encode_tensors(export.tensors)
    spec = {
        "name": "s",
        "recipe": {"name": "logreg", "version": "1", "params": params.model_dump(mode="json")},
    }
    write_package(out, export=export, weights=weights, origin=package_origin(spec, weights), force=force)


@pytest.mark.parametrize("force", [False, True])
def test_model_export_refuses_a_package_folder_that_is_a_planted_link(tmp_path, force):
    elsewhere = tmp_path / "operators-other-package"
    elsewhere.mkdir()
    if force:
        (elsewhere / "model.safetensors").write_bytes(b"the operator's other model")
    out = plant_link(tmp_path / "shared" / "package", elsewhere)
    with pytest.raises(PackageError, match="symbolic link"):
        _write_logreg_package(out, force=force)
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    assert before == ({"model.safetensors": b"the operator's other model"} if force else {})


def test_model_export_refuses_an_empty_package_folder_another_account_owns(tmp_path):
    out = tmp_path / "shared" / "package"
    out.mkdir(parents=True)
    os.chown(out, OTHER_UID, OTHER_UID)  # it could replace the files after they are written
    with pytest.raises(PackageError, match="not to this user"):
        _write_logreg_package(out)
    assert list(out.iterdir()) == []


def test_the_control_model_export_into_a_new_folder_of_ones_own_succeeds(tmp_path):
    out = tmp_path / "package"
    _write_logreg_package(out)
    assert (out / "metadata.json").is_file()


# --- fedhealth demo -----------------------------------------------------------------------------------------


def _failed_study() -> Any:
    from fedhealth.protocol import StudyInfo
    from support import breast_spec

    return StudyInfo.model_validate(
        {
            "study_id": "st_1",
            "spec": breast_spec(["north"]).model_dump(mode="json"),
            "status": "failed",
            "reason": "a fake federation",
            "created_at": "2026-01-01T00:00:00+00:00",
            "ended_at": None,
            "completed_rounds": 0,
            "current_round": None,
            "model_digest": None,
        }
    )


class FakeFederation:
    """``LocalFederation`` without processes: what ``run_demo`` asks of it, answered at once."""

    states: ClassVar[list[tuple[Path, bool]]] = []

    def __init__(self, state: Path, log_level: str = "warning") -> None:
        FakeFederation.states.append((state, state.is_symlink()))
        self.logs = state / "logs"
        self.home = SimpleNamespace(root=state / "orchestrator")

    def start_orchestrator(self) -> str:
        return URL

    def add_site(self, site: str) -> None: ...
    def start_agent(self, site: str, datasets: Any) -> None: ...
    def wait_for_sites(self, sites: Any) -> None: ...
    def stop_all(self) -> None: ...

    def approve(self, site: str, spec: Any, reason: str) -> str:
        return "ab" * 32

    def create_study(self, spec: Any, approve: bool) -> Any:
        return _failed_study()

    def wait_for_study(self, study_id: str, timeout: float, on_progress: Any) -> Any:
        return _failed_study()

    def report(self, study_id: str) -> dict[str, Any]:
        return {"study": study_id}

    def model_bytes(self, study_id: str) -> bytes:
        return b"the demo's model"

    def site_home(self, site: str) -> Any:
        return SimpleNamespace(root=Path("/nonexistent") / site)


def test_demo_outputs_are_not_written_through_links_planted_in_its_output_folder(tmp_path, monkeypatch):
    import io

    import fedhealth.cli._governance as governance_module
    import fedhealth.orchestrator as orchestrator_module
    import fedhealth.sim as sim_module
    from fedhealth.cli._demo import run_demo

    monkeypatch.setattr(sim_module, "LocalFederation", FakeFederation)
    monkeypatch.setattr(orchestrator_module, "report_markdown", lambda report: "# report\n")
    monkeypatch.setattr(governance_module, "print_governance_summary", lambda *args: True)
    FakeFederation.states = []
    out = tmp_path / "demo-output"  # the default is ./demo-output: a shared working folder is enough
    victims = {}
    for name in ("model.safetensors", "report.md", "report.json"):
        victims[name] = tmp_path / f"victims-{name}"
        victims[name].write_text("precious")
        plant_link(out / name, victims[name])
    attackers_folder = tmp_path / "attacker"
    attackers_folder.mkdir()
    plant_link(out / "state", attackers_folder)  # the federation's keys and databases would go there
    code = run_demo(out=out, console=Console(file=io.StringIO()), secure=False)
    assert code == 1  # the fake study failed
    assert {name: v.read_text() for name, v in victims.items()} == dict.fromkeys(victims, "precious")
    assert (out / "model.safetensors").read_bytes() == b"the demo's model"
    assert not any(p.is_symlink() for p in out.iterdir())
    assert FakeFederation.states == [(out / "state", False)]


@pytest.mark.parametrize("owner", ["a-link", "another-account"])
def test_demo_refuses_an_output_folder_that_is_a_link_or_another_accounts(tmp_path, monkeypatch, owner):
    """``fedhealth demo --out`` puts the demo sites' identity keys and databases under ``state/``: an output
    folder that is itself a link (into another account's folder) or that another account owns is refused
    in one line before anything is written or started. Before, it was used as given."""
    import fedhealth.sim as sim_module

    monkeypatch.setattr(sim_module, "LocalFederation", FakeFederation)
    FakeFederation.states = []
    attackers_folder = tmp_path / "attacker"
    attackers_folder.mkdir()
    os.chown(attackers_folder, OTHER_UID, OTHER_UID)
    os.chmod(attackers_folder, 0o777)
    out = (
        attackers_folder
        if owner == "another-account"
        else plant_link(tmp_path / "demo-output", attackers_folder)
    )
    line = one_error(cli("demo", "--out", out, "--no-secure"))
    assert "demo's output folder" in line
    assert ("symbolic link" if owner == "a-link" else "belongs to uid 1000") in line
    assert FakeFederation.states == []  # no federation was started
    assert list(attackers_folder.iterdir()) == []


def test_the_benchmark_plots_are_not_written_through_a_planted_link(tmp_path):
    """``benchmark privacy --plot`` and ``benchmark membership --plot`` (default paths under docs/, often a
    shared checkout) wrote their PNG with matplotlib, through whatever link was planted at the path."""
    from fedhealth.sim import PrivacyResult, plot_privacy

    victim = attackers_file(tmp_path / "victim.txt")
    victim.write_text("precious")
    out = plant_link(tmp_path / "docs" / "privacy.png", victim)
    result = PrivacyResult(
        target_epsilon=None,
        delta=None,
        noise_multiplier=0.0,
        accuracies=(0.7, 0.72),
        per_center=(0.7, 0.72, 0.71, 0.69),
        site_epsilons={},
        bit_identical=True,
    )
    plot_privacy([result], out)
    assert victim.read_text() == "precious"
    assert not out.is_symlink()
    assert out.read_bytes().startswith(b"\x89PNG")
