"""The command line against a running orchestrator: 422 answers in words, TLS failures explained, ``--json``
on lists and status, ``study status --watch`` exit codes, and ``orchestrator serve`` on a port other than
the one ``init`` recorded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from typer.testing import CliRunner

import fedhealth
from fedhealth.cli import app
from fedhealth.crypto import create_ca
from fedhealth.learning import default_registry
from fedhealth.protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    OperatorCredential,
    PeerVersion,
    ProtocolMismatch,
    StudyStatus,
    version_headers,
)
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, breast_spec

pytestmark = pytest.mark.e2e
runner = CliRunner()


def cli(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def one_error(result: Any, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("cli"), log_level="warning") as fed:
        fed.start_orchestrator()
        fed.add_site("north")
        fed.start_agent(
            "north", {"breast-cancer": BREAST_SITES["hospital-a"]}, extra_args=["--poll-wait", "2"]
        )
        fed.wait_for_sites(["north"])
        yield fed


def admin(fed: LocalFederation) -> list[object]:
    return ["--credential", fed.home.admin_credential, "--orchestrator", fed.url]


def test_a_422_names_the_field_and_its_rule_in_words(fed):
    line = one_error(cli("site", "add", "Not A Name", *admin(fed)), 1)
    assert "field name: must be lowercase letters, digits, '-', '_' or '.'" in line
    assert "^[" not in line  # never the regular expression, with or without its brackets


def test_a_certificate_from_another_ca_is_a_tls_error_in_one_line(fed, tmp_path):
    real = OperatorCredential.model_validate_json(fed.home.admin_credential.read_text())
    other = real.model_copy(update={"ca_pem": create_ca("another federation").cert_pem.decode()})
    path = tmp_path / "wrong-ca.credential"
    path.write_text(other.model_dump_json())
    path.chmod(0o600)  # a credential others can read is refused
    line = one_error(cli("site", "list", "--credential", path, "--orchestrator", fed.url), 1)
    assert "TLS verification failed" in line
    assert "pinned federation CA" in line


def test_lists_and_status_print_json(fed):
    sites = json.loads(cli("site", "list", *admin(fed), "--json").stdout)
    assert {s["name"] for s in sites} == {"north"}
    users = json.loads(cli("user", "list", *admin(fed), "--json").stdout)
    assert [u["name"] for u in users] == ["admin"]
    study = fed.create_study(breast_spec(["north"], rounds=1, name="json-status"))
    fed.wait_for_study(study.study_id, timeout=120)
    status = json.loads(cli("study", "status", study.study_id, *admin(fed), "--json").stdout)
    assert status["status"] == "completed"
    assert status["approvals"] == {"north": "approved"}
    listed = json.loads(cli("study", "list", *admin(fed), "--json").stdout)
    assert study.study_id in [s["study_id"] for s in listed]


def test_study_status_watch_exits_0_for_a_completed_study_and_1_for_a_failed_one(fed):
    done = fed.create_study(breast_spec(["north"], rounds=1, name="watched"))
    result = cli("study", "status", done.study_id, *admin(fed), "--watch", "--interval", "0.2")
    assert result.exit_code == 0, result.output
    assert "completed" in result.stdout
    failing = fed.operator.create_study(
        breast_spec(["north"], rounds=1, name="never-approved"), approval_wait_s=1
    )
    result = cli("study", "status", failing.study_id, *admin(fed), "--watch", "--interval", "0.2")
    line = one_error(result, 1)
    assert line == f"error: study {failing.study_id} failed: approval deadline passed: not approved by north"
    assert fed.study(failing.study_id).status is StudyStatus.FAILED


def test_serving_on_another_port_than_init_recorded_updates_the_credential(tmp_path):
    home = tmp_path / "orch"
    assert cli("orchestrator", "init", home, "--host", "127.0.0.1").exit_code == 0  # records port 8443
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedhealth",
            "orchestrator",
            "serve",
            "--home",
            str(home),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        credential = home / "admin.credential"
        while True:
            listed = cli(
                "site", "list", "--credential", credential
            )  # no --orchestrator: the credential's URL
            if listed.exit_code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert listed.exit_code == 0, listed.output
        assert OperatorCredential.model_validate_json(credential.read_text()).orchestrator == (
            f"https://127.0.0.1:{port}"
        )
        assert json.loads((home / "orchestrator.json").read_text())["url"] == f"https://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    notes = [line for line in stderr.decode().splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: serving on port {port}, not the 8443 recorded at init: the recorded URL and admin.credential "
        f"now say https://127.0.0.1:{port}"
    ]


def test_site_check_against_a_running_orchestrator_sends_figures_the_operator_sees(fed):
    home = fed.site_home("north").root
    uri = BREAST_SITES["hospital-a"]
    assert cli("site", "dataset", "add", "bc", uri, "--home", home).exit_code == 0
    result = cli("site", "check", "--home", home, "--orchestrator", fed.url, "--transfer-mb", "2", "--json")
    assert result.exit_code == 0, result.output
    local = json.loads(result.stdout)
    assert local["sent"] is True
    checks = {c["name"]: c for c in local["readiness"]["checks"]}
    expected = [
        "orchestrator.dns",
        "orchestrator.tls",
        "orchestrator.login",
        "clock.skew",
        "network.latency",
        "network.download",
        "network.upload",
        *(f"compute.{name}" for name in default_registry().names()),
        "disk.free",
        "memory.available",
        "dataset:bc",
    ]
    assert list(checks) == expected
    assert {"compute.logreg", "compute.synthetic"} <= set(checks)  # the built-in recipes are always installed
    assert all(checks[name]["status"] == "ok" for name in expected if name != "memory.available")
    assert abs(checks["clock.skew"]["value"]) < 5  # one machine, one clock
    assert checks["network.download"]["unit"] == "MB/s"
    assert checks["dataset:bc"]["value"] > 0
    # the operator sees the same figures, and nothing that names a local file or column
    seen = cli("site", "readiness", *admin(fed), "--json")
    (north,) = [r for r in json.loads(seen.stdout) if r["site"] == "north"]
    assert north["readiness"]["ready"] is True
    assert north["readiness"]["checks"] == local["readiness"]["checks"]
    assert str(home) not in seen.stdout
    assert "breast-cancer/0" not in seen.stdout
    listed = cli("site", "list", *admin(fed))
    assert "\tready" in listed.stdout


def test_site_check_names_the_dataset_that_fails_and_exits_1(fed, tmp_path):
    home = fed.site_home("north").root
    data = tmp_path / "broken.csv"
    data.write_text("patient_id,x,target\nP1,1,0\nP2,2,1\nP3,3,0\n")
    assert (
        cli(
            "site",
            "dataset",
            "add",
            "broken",
            data,
            "--label",
            "target",
            "--id",
            "patient_id",
            "--home",
            home,
        ).exit_code
        == 0
    )
    data.unlink()
    result = cli("site", "check", "--home", home, "--orchestrator", fed.url, "--transfer-mb", "1")
    assert result.exit_code == 1
    assert "dataset:broken" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: this site is not ready: 1 check(s) failed (dataset:broken) (see the table above)"
    ]
    assert cli("site", "dataset", "remove", "broken", "--home", home).exit_code == 0


# --- versions on the wire ----------------------------------------------------------------------------------


def test_the_operator_sees_the_version_each_site_runs(fed):
    sites = json.loads(cli("site", "list", *admin(fed), "--json").stdout)
    (north,) = sites
    assert north["software_version"] == fedhealth.__version__
    assert north["protocol_version"] == PROTOCOL_VERSION
    assert f"fedhealth {fedhealth.__version__}" in cli("site", "list", *admin(fed)).stdout


def test_every_answer_states_the_orchestrators_versions(fed):
    answer = fed.http.get("/healthz")
    assert PeerVersion.from_headers(answer.headers) == PeerVersion(
        protocol=PROTOCOL_VERSION, min_protocol=MIN_PROTOCOL_VERSION, software=fedhealth.__version__
    )


@pytest.mark.parametrize(
    ("stated", "sentence"),
    [
        (
            {"X-Fedhealth-Protocol": "0", "X-Fedhealth-Protocol-Min": "0"},
            f"orchestrator speaks protocol {PROTOCOL_VERSION}, this agent 0: upgrade fedhealth at this site",
        ),
        (
            {"X-Fedhealth-Protocol": "9", "X-Fedhealth-Protocol-Min": "8"},
            f"orchestrator speaks protocol {PROTOCOL_VERSION}, this agent 9 (oldest 8): "
            "upgrade the orchestrator, or run an older fedhealth at this site",
        ),
    ],
    ids=["too-old", "too-new"],
)
def test_an_agent_outside_the_orchestrators_protocols_is_refused_in_one_sentence(fed, stated, sentence):
    answer = fed.http.post("/api/v1/agent/challenge", json={"site": "north"}, headers=stated)
    assert answer.status_code == 426
    assert answer.json()["error"] == sentence


def test_a_real_agent_too_new_for_the_orchestrator_stops_with_that_sentence(fed, monkeypatch):
    from fedhealth.agent import OrchestratorClient, SiteAgent
    from fedhealth.agent import _client as client_module

    newer = PeerVersion(protocol=PROTOCOL_VERSION + 2, min_protocol=PROTOCOL_VERSION + 1, software="99.0")
    monkeypatch.setattr(client_module, "ours", lambda software: newer)
    monkeypatch.setattr(
        client_module,
        "version_headers",
        lambda software: version_headers("99.0", protocol=newer.protocol, min_protocol=newer.min_protocol),
    )
    home = fed.site_home("north")
    client = OrchestratorClient(fed.url, "north", home.identity(), ca_pem=home.ca_pem())
    with pytest.raises(ProtocolMismatch) as stopped:
        SiteAgent(_settings(fed), client=client).run()
    assert str(stopped.value) == (
        f"orchestrator speaks protocol {PROTOCOL_VERSION}, this agent {PROTOCOL_VERSION + 2} "
        f"(oldest {PROTOCOL_VERSION + 1}): upgrade the orchestrator, or run an older fedhealth at this site"
    )
    client.close()


def _settings(fed: LocalFederation) -> Any:
    from fedhealth.agent import AgentSettings

    home = fed.site_home("north")
    return AgentSettings(
        orchestrator_url=fed.url, site="north", identity=home.identity(), ca_pem=home.ca_pem()
    )
