"""What a site attests about the data a task used (issue 10, finding 7): keyed commitments, not bare hashes.

The attack: someone who knows every record but one (whether patient X is in the training set, whether X
withdrew) recomputes the unsalted sha256 for each guess and compares it with the attestation. Against keyed
commitments neither guess matches; the site can still open them to an auditor.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
from site_fixtures import SITE, agent, approve, make_home, task
from typer.testing import CliRunner

from fedhealth.agent._governance import SiteGovernance
from fedhealth.cli import app
from fedhealth.core import CryptoError, InputError
from fedhealth.data import open_dataset
from fedhealth.governance import (
    AuditEventType,
    CommitmentKind,
    Opening,
    Revelation,
    commit,
    consent_snapshot_hash,
    read_stored_log,
    verify_opening,
)
from fedhealth.protocol import StudySpec
from support import logreg_recipe

runner = CliRunner()
PURPOSE = "research"


@pytest.fixture
def trained(tmp_path):
    """One training task at a site whose consent registry has every patient permitting but ``bc-x``."""
    home = make_home(tmp_path / "site")
    uri = "builtin://breast-cancer/0?sites=4&seed=0"
    full = open_dataset(uri)
    assert full.patient_ids_train is not None
    assert full.patient_ids_test is not None
    everyone = [*full.patient_ids_train, *full.patient_ids_test]
    target = full.patient_ids_train[3]
    csv = tmp_path / "consent.csv"
    csv.write_text(
        "patient_id,purpose,decision\n"
        + "".join(f"{p},{PURPOSE},{'deny' if p == target else 'permit'}\n" for p in everyone)
    )
    assert (
        runner.invoke(app, ["site", "consent", "import", str(csv), "--home", str(home.root)]).exit_code == 0
    )
    spec = StudySpec(name="s", dataset="bc", recipe=logreg_recipe(30), rounds=2, train_sites=[SITE], seed=1)
    approve(home, spec)
    a, client = agent(home, {"bc": uri})
    a.handle(task(spec, task_id="tk-1"))
    a.handle(task(spec, task_id="tk-2", round=2))
    assert client.failures == []
    return home, full, everyone, target, [r.attestation for r in client.results]


def guesses(full, everyone, target):
    """The attacker's two candidate worlds: the target's row used, or left out (withdrew / denied)."""
    keep = np.array([p != target for p in full.patient_ids_train])
    without = full.select(keep, np.ones(full.num_test, dtype=np.bool_))
    today = datetime.now(UTC).date()
    return {
        "fingerprint": {full.fingerprint, without.fingerprint},
        "snapshot": {
            consent_snapshot_hash(everyone, PURPOSE, today),
            consent_snapshot_hash([p for p in everyone if p != target], PURPOSE, today),
        },
    }


def test_an_attacker_knowing_every_record_but_one_cannot_test_either_guess(trained):
    home, full, everyone, target, attestations = trained
    candidates = guesses(full, everyone, target)
    for attestation in attestations:
        assert attestation is not None
        assert attestation.dataset_fingerprint not in candidates["fingerprint"]
        assert attestation.consent_snapshot not in candidates["snapshot"]
    # and the two rounds on identical data give unrelated commitments (no linking across rounds)
    assert attestations[0].consent_snapshot != attestations[1].consent_snapshot
    assert attestations[0].dataset_fingerprint != attestations[1].dataset_fingerprint
    # the control: the site's own log holds the bare hash, and it is one of the attacker's guesses
    with SiteGovernance(home) as governance:
        revelation = governance.commitments.reveal("st-1", to="auditor")
    snapshots = {o.digest for o in revelation.openings if o.kind is CommitmentKind.CONSENT_SNAPSHOT}
    assert snapshots <= candidates["snapshot"]
    assert len(snapshots) == 1


def test_the_site_opens_its_commitments_to_an_auditor_and_logs_the_disclosure(trained, tmp_path):
    home, _, _, _, attestations = trained
    out = tmp_path / "opened.json"
    result = runner.invoke(
        app,
        [
            "site",
            "reveal-commitment-key",
            "st-1",
            "--to",
            "auditor-ines",
            "--home",
            str(home.root),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    attested = [a.dataset_fingerprint for a in attestations] + [a.consent_snapshot for a in attestations]
    args = ["audit", "verify-commitments", str(out)]
    for value in attested:
        args += ["--commitment", str(value)]
    verified = runner.invoke(app, args)
    assert verified.exit_code == 0, verified.output
    assert "4 opening(s) of study st-1 verified" in verified.stdout
    entries = read_stored_log(SiteGovernance(home).engine).entries
    [revealed] = [e for e in entries if e.type == AuditEventType.COMMITMENT_KEY_REVEALED]
    assert revealed.payload["to"] == "auditor-ines"
    assert json.loads(out.read_text())["key"] not in json.dumps(revealed.payload)  # the key is not logged


def test_an_opening_to_another_digest_or_under_another_key_is_refused(trained, tmp_path):
    home, _, _, _, _ = trained
    with SiteGovernance(home) as governance:
        revelation = governance.commitments.reveal("st-1", to="auditor")
    revelation.verify()
    opening = revelation.openings[0]
    forged = Opening(**{**opening.to_json(), "kind": opening.kind, "digest": "0" * 64})  # type: ignore[arg-type]
    with pytest.raises(CryptoError, match="does not open"):
        verify_opening(revelation.key, forged)
    with pytest.raises(CryptoError):
        verify_opening(b"\x01" * 32, opening)
    bad = tmp_path / "bad.json"
    body = revelation.to_json()
    body["openings"][0]["digest"] = "f" * 64
    bad.write_text(json.dumps(body))
    assert runner.invoke(app, ["audit", "verify-commitments", str(bad)]).exit_code == 1
    unknown = runner.invoke(
        app, ["audit", "verify-commitments", str(tmp_path / "bad.json"), "--commitment", "a" * 64]
    )
    assert unknown.exit_code == 1
    assert Revelation.from_json(revelation.to_json()) == revelation


def test_a_commitment_binds_kind_study_and_task():
    key = bytes(range(32))
    base = {"kind": CommitmentKind.CONSENT_SNAPSHOT, "study_id": "s", "task_id": "t", "digest": "ab" * 32}
    value = commit(key, **base)  # type: ignore[arg-type]
    for change in (
        {"kind": CommitmentKind.DATASET_FINGERPRINT},
        {"study_id": "s2"},
        {"task_id": "t2"},
        {"digest": "cd" * 32},
    ):
        assert commit(key, **{**base, **change}) != value  # type: ignore[arg-type]
    with pytest.raises(InputError):
        commit(b"short", **base)  # type: ignore[arg-type]


def test_revealing_a_study_the_site_never_committed_to_is_refused(tmp_path):
    home = make_home(tmp_path / "site")
    result = runner.invoke(
        app, ["site", "reveal-commitment-key", "st-none", "--to", "x", "--home", str(home.root)]
    )
    assert result.exit_code == 1  # a runtime refusal (usage errors exit 2)
    assert "committed to nothing" in result.output
