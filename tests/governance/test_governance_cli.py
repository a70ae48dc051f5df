"""The governance command groups through typer's CliRunner: exit codes 0 / 1 / 2, one-line messages."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from fedhealth.cli._governance import approval_app, audit_app, consent_app, model_app, provenance_app
from fedhealth.cli._steward import approvals_app
from fedhealth.core import ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.governance import (
    ApprovalRegistry,
    AuditEventType,
    AuditLog,
    ConsentRegistry,
    ModelProvenance,
    ProvenanceStore,
    create_governance_tables,
    spec_hash,
)

runner = CliRunner()
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SPEC = {"name": "sepsis-risk", "owner": "alice", "dataset": "icu-2024", "rounds": 3}


@pytest.fixture
def key(tmp_path: Path) -> tuple[IdentityKey, Path]:
    identity = IdentityKey.generate()
    path = tmp_path / "site.key"
    identity.save(path)
    return identity, path


@pytest.fixture
def db(tmp_path: Path, key) -> Path:
    path = tmp_path / "site.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    create_governance_tables(engine)
    clock = ManualClock(T0)
    log = AuditLog(engine, key[0], "site:a", clock)
    for i in range(5):
        log.append(AuditEventType.CONFIGURATION_CHANGED, {"i": i})
        clock.advance(1)
    engine.dispose()
    return path


def sql(path: Path, statement: str, **params: object) -> None:
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text(statement), params)
    engine.dispose()


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def test_verify_passes_on_an_untouched_log(db, key):
    result = runner.invoke(audit_app, ["verify", "--db", str(db), "--key", key[0].public().raw.hex()])
    assert result.exit_code == 0, result.output
    assert one_line(result.stdout).startswith("ok: 5 entries")


def test_verify_without_pinned_keys_says_it_trusts_the_stored_ones(db):
    result = runner.invoke(audit_app, ["verify", "--db", str(db)])
    assert result.exit_code == 0
    assert "integrity only" in result.stderr


@pytest.mark.parametrize(
    ("statement", "words"),
    [
        (
            "UPDATE gov_audit_entries SET payload = replace(payload, '3', '7') WHERE seq = 4",
            "entry 4: hash_mismatch",
        ),
        ("DELETE FROM gov_audit_entries WHERE seq = 3", "entry 3: gap"),
        (
            "UPDATE gov_audit_entries SET signature = "
            "(SELECT signature FROM gov_audit_entries WHERE seq = 1) WHERE seq = 3",
            "entry 3: bad_signature",
        ),
    ],
    ids=["edited", "deleted", "signature"],
)
def test_verify_exits_1_and_names_the_tampered_entry(db, key, statement, words):
    sql(db, statement)
    result = runner.invoke(audit_app, ["verify", "--db", str(db), "--key", key[0].public().raw.hex()])
    assert result.exit_code == 1
    assert words in one_line(result.stdout)


def test_verify_exits_1_when_a_log_no_longer_matches_an_anchored_head(db, key):
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        digest = conn.execute(text("SELECT entry_hash FROM gov_audit_entries WHERE seq = 4")).scalar_one()
    engine.dispose()
    sql(db, "DELETE FROM gov_audit_entries WHERE seq >= 4")
    result = runner.invoke(audit_app, ["verify", "--db", str(db), "--anchor", f"4:{digest}"])
    assert result.exit_code == 1
    assert "entry 4: anchor_missing" in result.stdout


def test_export_then_verify_the_file_offline_with_a_key_file(db, key, tmp_path):
    out = tmp_path / "audit.jsonl"
    exported = runner.invoke(audit_app, ["export", "--db", str(db), "--out", str(out)])
    assert exported.exit_code == 0
    assert "exported 5 entries" in exported.stdout
    key_file = tmp_path / "site.pub"
    key_file.write_text(key[0].public().raw.hex() + "\n")
    result = runner.invoke(audit_app, ["verify", "--file", str(out), "--key", str(key_file)])
    assert result.exit_code == 0, result.output
    stranger = IdentityKey.generate().public().raw.hex()
    result = runner.invoke(audit_app, ["verify", "--file", str(out), "--key", stranger])
    assert result.exit_code == 1
    assert "entry 1: unknown_signer" in result.stdout


def test_a_tampered_export_file_fails_verification(db, key, tmp_path):
    out = tmp_path / "audit.jsonl"
    runner.invoke(audit_app, ["export", "--db", str(db), "--out", str(out)])
    lines = out.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["actor"] = "someone-else"
    lines[2] = json.dumps(entry)
    out.write_text("\n".join(lines) + "\n")
    result = runner.invoke(audit_app, ["verify", "--file", str(out), "--key", key[0].public().raw.hex()])
    assert result.exit_code == 1
    assert "entry 2: hash_mismatch" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["verify"],
        ["verify", "--db", "x", "--file", "y"],
        ["verify", "--db", "/nonexistent/site.sqlite"],
        ["verify", "--db", "{db}", "--key", "not-a-key"],
        ["verify", "--db", "{db}", "--anchor", "four:abc"],
        ["export", "--db", "/nonexistent/site.sqlite", "--out", "x.jsonl"],
    ],
    ids=["no-source", "two-sources", "no-db", "bad-key", "bad-anchor", "export-no-db"],
)
def test_usage_errors_exit_2_with_one_line(db, args):
    result = runner.invoke(audit_app, [a.replace("{db}", str(db)) for a in args])
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith("error: ")


def test_verifying_an_empty_log_names_the_logs_the_database_holds(db):
    result = runner.invoke(audit_app, ["verify", "--db", str(db), "--log", "other"])
    assert result.exit_code == 2
    assert "['main']" in one_line(result.stderr)
    assert runner.invoke(audit_app, ["verify", "--db", str(db), "--log", "main"]).exit_code == 0


def test_a_missing_export_file_is_a_runtime_error_in_one_line():
    result = runner.invoke(audit_app, ["verify", "--file", "/nonexistent/audit.jsonl"])
    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert line.startswith("error: ")
    assert "/nonexistent/audit.jsonl" in line


def test_a_database_without_governance_tables_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty.sqlite"
    create_engine(f"sqlite:///{empty}").connect().close()
    result = runner.invoke(audit_app, ["verify", "--db", str(empty)])
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("error: database:")


def test_a_steward_approves_and_rejects_by_hash_prefix_and_lists(db, key):
    engine = create_engine(f"sqlite:///{db}")
    log = AuditLog(engine, key[0], "site:a")
    ApprovalRegistry(engine, log).submit(SPEC)
    digest = spec_hash(SPEC)
    common = ["--db", str(db), "--identity", str(key[1]), "--steward", "dana"]
    shown = runner.invoke(approvals_app, ["show", digest[:10], *common])  # a steward approves what they read
    assert shown.exit_code == 0, shown.output
    result = runner.invoke(approval_app, ["approve", digest[:10], "--reason", "IRB-2026-114", *common])
    assert result.exit_code == 0
    assert digest in result.stdout
    assert ApprovalRegistry(engine, log).check(SPEC).allowed
    listed = runner.invoke(approval_app, ["list", "--db", str(db)])
    assert "approved" in listed.stdout
    assert "IRB-2026-114" in listed.stdout
    result = runner.invoke(approval_app, ["reject", digest, "--reason", "revoked", *common])
    assert result.exit_code == 0
    assert not ApprovalRegistry(engine, log).check(SPEC).allowed
    assert runner.invoke(audit_app, ["verify", "--db", str(db)]).exit_code == 0
    engine.dispose()


def test_approving_an_unknown_hash_fails_and_without_a_reason_is_a_usage_error(db, key):
    common = ["--db", str(db), "--identity", str(key[1])]
    result = runner.invoke(approval_app, ["approve", "ab" * 32, "--reason", "x", *common])
    assert result.exit_code == 1
    assert "error:" in result.stderr
    result = runner.invoke(approval_app, ["approve", "ab" * 32, *common])
    assert result.exit_code == 2


def test_consent_import_and_withdraw_from_the_command_line(db, key, tmp_path):
    csv = tmp_path / "consent.csv"
    csv.write_text("patient_id,purpose,decision\np1,HRESCH,permit\np2,HRESCH,permit\n")
    common = ["--db", str(db), "--identity", str(key[1])]
    result = runner.invoke(consent_app, ["import", str(csv), *common])
    assert result.exit_code == 0
    assert "2 added" in result.stdout
    engine = create_engine(f"sqlite:///{db}")
    snapshot = ConsentRegistry(engine, AuditLog(engine, key[0], "site:a")).filter(["p1", "p2"], "HRESCH", T0)
    result = runner.invoke(consent_app, ["withdraw", "p1", "--purpose", "HRESCH", *common])
    assert result.exit_code == 0
    notice = json.loads(result.stdout)
    assert notice["snapshot_hashes"] == [snapshot.snapshot_hash]
    assert "p1" not in result.stdout
    engine.dispose()


def test_consent_import_of_fhir_json_and_a_bad_csv(db, key, tmp_path):
    common = ["--db", str(db), "--identity", str(key[1])]
    fhir = tmp_path / "consent.json"
    fhir.write_text(
        json.dumps(
            {
                "resourceType": "Consent",
                "id": "c1",
                "status": "active",
                "scope": {"coding": [{"code": "research"}]},
                "category": [{"coding": [{"code": "57016-8"}]}],
                "patient": {"reference": "Patient/p9"},
                "provision": {"type": "permit", "purpose": [{"code": "HRESCH"}]},
            }
        )
    )
    assert runner.invoke(consent_app, ["import", str(fhir), *common]).exit_code == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,purpose,decision\np1,HRESCH,yes\n")
    result = runner.invoke(consent_app, ["import", str(bad), *common])
    assert result.exit_code == 1
    assert "bad.csv line 2: decision" in one_line(result.stderr)
    other = tmp_path / "consent.xml"
    other.write_text("<x/>")
    assert runner.invoke(consent_app, ["import", str(other), *common]).exit_code == 2


@pytest.fixture
def provenance_db(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "orchestrator.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    create_governance_tables(engine)
    store = ProvenanceStore(engine)
    parent = None
    for round_ in range(3):
        digest = hashlib.sha256(f"m{round_}".encode()).hexdigest()
        sites = {"a": hashlib.sha256(f"s{round_}".encode()).hexdigest()} if round_ else {}
        store.record(
            ModelProvenance(
                model_digest=digest,
                parent_digest=parent,
                study_id="st-1",
                round=round_,
                n_sites=len(sites),
                dataset_fingerprints={s: "fp" for s in sites},
                consent_snapshots=sites,
                spec_hash=spec_hash(SPEC),
                software_version="0.1.0",
                dp_params={"delta": 1e-5},
                epsilon_spent={s: 0.4 * round_ for s in sites},
                created_at=T0,
            )
        )
        parent = digest
    store.record_metrics(parent, "a", {"auc": 0.8})
    store.flag_withdrawal([hashlib.sha256(b"s1").hexdigest()], site="a", notice_id="wd_1")
    engine.dispose()
    return path, parent


def test_provenance_show_prints_the_lineage_as_text_and_prov_json(provenance_db):
    path, digest = provenance_db
    result = runner.invoke(provenance_app, ["show", digest[:12], "--db", str(path)])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(digest[:16])
    assert "FLAGGED" in lines[0]
    result = runner.invoke(provenance_app, ["show", digest, "--db", str(path), "--format", "prov-json"])
    doc = json.loads(result.stdout)
    assert f"fh:model/{digest}" in doc["entity"]
    assert len(doc["wasDerivedFrom"]) == 2


def test_model_card_is_written_with_every_section(provenance_db, tmp_path):
    path, digest = provenance_db
    out = tmp_path / "card.md"
    result = runner.invoke(model_app, ["card", digest, "--db", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    card = out.read_text()
    for section in ("Intended use", "Data", "Per-site metrics", "Privacy guarantee", "Consent statement"):
        assert f"## {section}" in card
    assert "**Flagged:**" in card


def test_an_unknown_model_is_a_one_line_error(provenance_db):
    path, _ = provenance_db
    result = runner.invoke(model_app, ["card", "ffffffffffff", "--db", str(path)])
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("error: no recorded model")


def test_model_card_carries_a_membership_benchmark_result_and_names_a_bad_one(provenance_db, tmp_path):
    path, digest = provenance_db
    result_file = tmp_path / "membership.json"
    row = {
        "dataset": "breastmnist",
        "setting": "FedAvg (no DP)",
        "target_epsilon": None,
        "epsilon": None,
        "delta": None,
        "attack": "lira-online",
        "auc": 0.61,
        "tpr_at_fpr": 0.04,
        "fpr": 0.01,
        "members": 50,
        "non_members": 50,
        "models": 6,
        "rounds": 20,
    }
    result_file.write_text(
        json.dumps(
            {"kind": "fedhealth-membership-benchmark", "measured_at": "2026-12-06", "measurements": [row]}
        )
    )
    out = tmp_path / "card.md"
    args = ["card", digest, "--db", str(path), "--out", str(out), "--membership", str(result_file)]
    result = runner.invoke(model_app, args)
    assert result.exit_code == 0, result.output
    row = "| breastmnist | FedAvg (no DP) | 6 x 20 | ∞ (no DP) | lira-online | 0.610 | 0.040 |"
    assert row in out.read_text()
    result_file.write_text("{not json")
    result = runner.invoke(model_app, args)
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("error: --membership: membership.json is not JSON")
    result_file.write_text(json.dumps({"kind": "fedhealth-membership-benchmark", "measurements": []}))
    result = runner.invoke(model_app, args)
    assert result.exit_code == 1
    assert "measurements must be a non-empty list" in one_line(result.stderr)


def test_a_steward_listing_approvals_in_a_home_without_its_ca_gets_a_warning_and_the_list(tmp_path):
    """A home whose ca.pem was lost cannot reach the orchestrator (no CA to pin, the system's authorities
    are not trusted): `site approvals` says so in a warning line and still lists what the site holds."""
    from fedhealth.agent import SiteHome

    home = SiteHome(tmp_path / "site")
    home.root.mkdir(mode=0o700)
    IdentityKey.generate().save(home.identity_path)
    home.settings_path.write_text(json.dumps({"site": "solo", "orchestrator": "https://127.0.0.1:1"}))
    result = runner.invoke(approvals_app, ["--home", str(home.root)])
    assert result.exit_code == 0, result.output
    assert "warning: could not fetch the specs awaiting this site (no federation CA to pin" in result.output
