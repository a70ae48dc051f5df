"""Another local account on the operator's or the steward's machine, and a hostile file (docs/security.md,
"Operators" and "Clients and transport"; README.md's operator sections; docs/python-api.md): what
tests/cli/test_operator_credential_attacks.py (TLS, hostile answers, ``user add --out``),
tests/agent/test_local_account_attacks.py and tests/agent/test_private_homes.py (the homes) do not try.

- Credential files: the API key file an operator command reads is refused, as the site's own key files are
  (``IdentityKey.load``), when others can read it, when another account owns it, when a symbolic link was
  planted at its path, or when it is not a regular file (a FIFO would hang the command).
- Output files: ``study download`` (model and report), ``study init --out`` and ``model predict --out``
  never write through a symbolic link planted at the output path, write 0600 under any umask (a report
  and per-patient predictions stay with the operator), and ``study download`` refuses a file that exists
  unless ``--force``.
- ``study status --watch`` waits out a 429 (its Retry-After bounded) and goes on.
- Spec files: a JSON key given twice (the reader sees one value, the hash covers the other), nesting 10^5
  deep, a file of many megabytes and a FIFO are each one clear refusal.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedhealth.cli import _study as study_module
from fedhealth.client import ClientError, OperatorClient, SpecFileError, load_spec, spec_template
from fedhealth.core import ConfigError, encode_tensors
from fedhealth.crypto import create_ca
from fedhealth.protocol import OperatorCredential, StudyInfo
from support import breast_spec, cli, file_mode, finishes_within, one_error, opened_for_writing_later

API_KEY = "fhk_" + "k" * 43
# nothing listens there: a command that got past the credential check would fail to connect instead
URL = "https://127.0.0.1:9"
FEDERATION_CA = create_ca("the federation").cert_pem.decode()
MODEL = encode_tensors({"weight": np.ones(3, dtype=np.float32), "bias": np.zeros(1, dtype=np.float32)})


def write_credential(path: Path, file_mode: int = 0o600) -> Path:
    path.write_text(
        OperatorCredential(
            orchestrator=URL, ca_pem=FEDERATION_CA, user="admin", api_key=API_KEY
        ).model_dump_json()
    )
    os.chmod(path, file_mode)
    return path


def study_info(status: str) -> StudyInfo:
    return StudyInfo.model_validate(
        {
            "study_id": "st_1",
            "spec": breast_spec(["north"]).model_dump(mode="json"),
            "status": status,
            "reason": None,
            "created_at": "2026-01-01T00:00:00+00:00",
            "ended_at": None,
            "completed_rounds": 0,
            "current_round": None,
            "model_digest": None,
        }
    )


@pytest.fixture
def orchestrator_in_memory(monkeypatch):
    """The operator client's answers without a network: a completed study, its model and its report."""
    monkeypatch.setattr(OperatorClient, "study", lambda self, study_id: study_info("completed"))
    monkeypatch.setattr(OperatorClient, "model_bytes", lambda self, study_id: MODEL)
    monkeypatch.setattr(OperatorClient, "report", lambda self, study_id: {"study": "st_1", "auc": 0.9})


# --- (1) the credential file an operator command reads -----------------------------------------------------


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o644])
def test_a_credential_that_others_can_read_is_refused_like_a_site_key(tmp_path, loose):
    credential = write_credential(tmp_path / "admin.credential", loose)
    with pytest.raises(ConfigError, match="readable by other users") as refused:
        OperatorClient.from_credential(credential)
    assert "chmod 600" in str(refused.value)
    assert API_KEY not in str(refused.value)
    line = one_error(cli("study", "list", "--credential", credential))
    assert "readable by other users" in line


def test_the_control_a_private_credential_of_ones_own_is_accepted(tmp_path):
    credential = write_credential(tmp_path / "admin.credential")
    with OperatorClient.from_credential(credential) as client:
        assert client.user == "admin"


def test_a_credential_owned_by_another_account_is_refused(tmp_path, monkeypatch):
    credential = write_credential(tmp_path / "admin.credential")
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    with pytest.raises(ConfigError, match="not to this user"):
        OperatorClient.from_credential(credential)
    line = one_error(cli("study", "list", "--credential", credential))
    assert "not to this user" in line


def test_a_symbolic_link_planted_at_the_credential_path_is_not_followed(tmp_path):
    # another account's credential (here: any file this one can read), linked where the operator looks
    planted = write_credential(tmp_path / "attacker.credential")
    link = tmp_path / "admin.credential"
    link.symlink_to(planted)
    with pytest.raises(ConfigError, match="symbolic link"):
        OperatorClient.from_credential(link)
    line = one_error(cli("study", "list", "--credential", link))
    assert "symbolic link" in line


def test_a_fifo_planted_at_the_credential_path_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "admin.credential"
    os.mkfifo(fifo, 0o600)
    timer = opened_for_writing_later(fifo)
    try:
        raised = finishes_within(2.0, lambda: OperatorClient.from_credential(fifo))
    finally:
        timer.cancel()
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(raised, ConfigError), raised
    assert "not a regular file" in str(raised)


def test_a_credential_of_many_megabytes_is_refused_before_it_is_read(tmp_path):
    credential = write_credential(tmp_path / "admin.credential")
    with credential.open("r+b") as f:
        f.truncate(512 << 20)  # sparse: costs no disk, but reading it would cost 512 MiB of memory
    with pytest.raises(ConfigError, match="too large"):
        OperatorClient.from_credential(credential)


# --- (2) files the operator's commands write ----------------------------------------------------------------


@pytest.mark.parametrize("option", ["--model", "--report"])
def test_study_download_does_not_write_through_a_symbolic_link_planted_at_its_output(
    tmp_path, orchestrator_in_memory, option
):
    credential = write_credential(tmp_path / "admin.credential")
    victim = tmp_path / "operators-own-file"
    victim.write_text("precious")
    out = tmp_path / "shared" / "model-or-report"
    out.parent.mkdir()
    out.symlink_to(victim)
    refused = cli("study", "download", "st_1", option, out, "--credential", credential)
    assert "exists" in one_error(refused)
    assert victim.read_text() == "precious"
    forced = cli("study", "download", "st_1", option, out, "--force", "--credential", credential)
    assert forced.exit_code == 0, forced.output
    assert victim.read_text() == "precious"
    assert not out.is_symlink()
    assert file_mode(out) == 0o600


@pytest.mark.parametrize("option", ["--model", "--report"])
def test_study_download_does_not_create_the_target_of_a_dangling_link(
    tmp_path, orchestrator_in_memory, option
):
    credential = write_credential(tmp_path / "admin.credential")
    target = tmp_path / "operators-home" / ".bashrc"  # not there yet: a plain open would create it
    target.parent.mkdir()
    out = tmp_path / "model-or-report"
    out.symlink_to(target)
    one_error(cli("study", "download", "st_1", option, out, "--credential", credential))
    assert not target.exists()


def test_study_download_refuses_an_existing_file_unless_forced(tmp_path, orchestrator_in_memory):
    credential = write_credential(tmp_path / "admin.credential")
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier model")
    line = one_error(cli("study", "download", "st_1", "--model", out, "--credential", credential))
    assert "--force" in line
    assert out.read_bytes() == b"an earlier model"
    forced = cli("study", "download", "st_1", "--model", out, "--force", "--credential", credential)
    assert forced.exit_code == 0, forced.output
    assert out.read_bytes() == MODEL
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_downloaded_model_and_report_are_private_under_a_permissive_umask(
    tmp_path, orchestrator_in_memory, permissive_umask
):
    credential = write_credential(tmp_path / "admin.credential")
    model, report = tmp_path / "model.safetensors", tmp_path / "report.json"
    result = cli(
        "study", "download", "st_1", "--model", model, "--report", report, "--credential", credential
    )
    assert result.exit_code == 0, result.output
    assert model.read_bytes() == MODEL
    assert json.loads(report.read_text()) == {"auc": 0.9, "study": "st_1"}
    assert (file_mode(model), file_mode(report)) == (0o600, 0o600)


def test_the_python_apis_download_model_does_not_write_through_a_planted_link(tmp_path, monkeypatch):
    monkeypatch.setattr(OperatorClient, "model_bytes", lambda self, study_id: MODEL)
    victim = tmp_path / "operators-own-file"
    victim.write_text("precious")
    out = tmp_path / "model.safetensors"
    out.symlink_to(victim)
    credential = write_credential(tmp_path / "admin.credential")
    with OperatorClient.from_credential(credential) as client, contextlib.suppress(FileExistsError):
        client.download_model("st_1", out)
    assert victim.read_text() == "precious"


def test_model_predict_out_does_not_write_through_a_planted_link_and_is_private(tmp_path, permissive_umask):
    model = tmp_path / "model.safetensors"
    model.write_bytes(MODEL)
    rows = tmp_path / "new-patients.csv"
    rows.write_text("patient_id,a,b,c\np-1,1,2,3\np-2,2,3,1\n")
    victim = tmp_path / "operators-own-file"
    victim.write_text("precious")
    out = tmp_path / "predictions.csv"
    out.symlink_to(victim)
    result = cli("model", "predict", "--model", model, "--csv", rows, "--id", "patient_id", "--out", out)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"
    assert not out.is_symlink()
    assert "p-1" in out.read_text()  # patient ids: for the operator's eyes only
    assert file_mode(out) == 0o600


def test_study_init_does_not_create_the_target_of_a_dangling_link(tmp_path):
    target = tmp_path / "operators-home" / ".profile"
    target.parent.mkdir()
    out = tmp_path / "study.toml"
    out.symlink_to(target)
    line = one_error(cli("study", "init", "--recipe", "logreg", "--dataset", "d", "--out", out))
    assert "exists" in line
    assert not target.exists()
    forced = cli("study", "init", "--recipe", "logreg", "--dataset", "d", "--out", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert not target.exists()
    assert not out.is_symlink()
    assert "dataset" in out.read_text()


# --- (3) study status --watch and the orchestrator's rate limit --------------------------------------------


class FakeTime:
    """The CLI's clock: sleeping advances it at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("retry_after", ["1000000000", "3", "0", "soon"])
def test_study_status_watch_waits_out_a_429_and_goes_on(tmp_path, monkeypatch, as_json, retry_after):
    credential = write_credential(tmp_path / "admin.credential")
    answers: list[Any] = [
        study_info("running"),
        ClientError(429, "rate limited", retry_after=retry_after),
        ClientError(429, "rate limited", retry_after=retry_after),
        study_info("completed"),
    ]

    def study(self: OperatorClient, study_id: str) -> StudyInfo:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(OperatorClient, "study", study)
    clock = FakeTime()
    monkeypatch.setattr(study_module, "time", clock)
    args = ["study", "status", "st_1", "--watch", "--interval", "0.5", "--credential", credential]
    result = cli(*args, *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.output
    assert answers == []
    assert all(0.5 <= s <= OperatorClient.MAX_PAUSE_S for s in clock.slept), clock.slept


def test_study_status_watch_under_endless_429s_gives_up_at_its_timeout(tmp_path, monkeypatch):
    credential = write_credential(tmp_path / "admin.credential")
    calls = 0

    def study(self: OperatorClient, study_id: str) -> StudyInfo:
        nonlocal calls
        calls += 1
        if calls == 1:
            return study_info("running")
        raise ClientError(429, "rate limited", retry_after="1000000000")

    monkeypatch.setattr(OperatorClient, "study", study)
    clock = FakeTime()
    monkeypatch.setattr(study_module, "time", clock)
    args = ["study", "status", "st_1", "--watch", "--json", "--timeout", "30", "--credential", credential]
    line = one_error(cli(*args))
    assert "30" in line
    assert clock.now <= 30 + 2  # the timeout and at most one --interval (2 s) after it
    assert calls < 20


# --- (4) spec files: what the steward reads is what is hashed ----------------------------------------------


def _spec_json() -> dict[str, Any]:
    return breast_spec(["north", "south"]).model_dump(mode="json")


def test_a_json_spec_naming_a_field_twice_is_refused(tmp_path):
    text = json.dumps(_spec_json())
    # the reader's eye stops at the first "rounds"; json.loads keeps the last one
    doubled = text.replace('"rounds": ', '"rounds": 1, "rounds": ', 1)
    path = tmp_path / "study.json"
    path.write_text(doubled)
    with pytest.raises(SpecFileError, match="rounds") as refused:
        load_spec(path)
    assert "twice" in str(refused.value)
    line = one_error(cli("study", "hash", path))
    assert "twice" in line


def test_a_json_spec_naming_a_nested_field_twice_is_refused(tmp_path):
    body = _spec_json()
    text = json.dumps(body).replace('"recipe": {', '"recipe": {"name": "other", ', 1)
    path = tmp_path / "study.json"
    path.write_text(text)
    with pytest.raises(SpecFileError, match="twice"):
        load_spec(path)


def test_a_toml_spec_naming_a_field_twice_is_refused(tmp_path):
    text = spec_template(recipe="logreg", dataset="d", sites=["north"], features=3)
    path = tmp_path / "study.toml"
    path.write_text("rounds = 99\n" + text)  # the template sets rounds further down
    with pytest.raises(SpecFileError, match="not valid TOML"):
        load_spec(path)


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_a_spec_nested_a_hundred_thousand_deep_is_one_clear_refusal(tmp_path, suffix):
    depth = 100_000
    text = "[" * depth + "]" * depth if suffix == ".json" else "a = " + "[" * depth + "]" * depth + "\n"
    path = tmp_path / f"study{suffix}"
    path.write_text(text)
    with pytest.raises(SpecFileError):
        load_spec(path)
    one_error(cli("study", "hash", path))


def test_a_spec_file_of_many_megabytes_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(spec_template(recipe="logreg", dataset="d", sites=["north"], features=3))
    with path.open("r+b") as f:
        f.truncate(512 << 20)  # sparse: reading it would cost 512 MiB of memory
    with pytest.raises(SpecFileError, match="larger than"):
        load_spec(path)


def test_a_fifo_given_as_a_spec_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "study.toml"
    os.mkfifo(fifo, 0o600)
    timer = opened_for_writing_later(fifo)
    try:
        raised = finishes_within(2.0, lambda: load_spec(fifo))
    finally:
        timer.cancel()
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(raised, SpecFileError), raised
    assert "not a regular file" in str(raised)
