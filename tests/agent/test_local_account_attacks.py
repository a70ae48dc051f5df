"""Another local account on a site's or the orchestrator's machine (docs/security.md, "The federation's own
PKI", "Sites" and the threat row "local user at a site or at the orchestrator's host"; docs/governance.md,
"Who can read them"; docs/dashboard.md, "The site dashboard"): what tests/agent/test_private_homes.py and
tests/e2e/test_site_protections.py do not already try.

- `site enroll` writes every file of the new home 0600 (the mutual-TLS client key too) in a 0700 folder
  under a permissive umask, before any service has started to tighten it;
- `orchestrator init` leaves nothing in the home readable by others, `orchestrator.json` and the public
  files included, under a permissive umask; a SQLite database at a URL of its own is created 0600 too;
- an orchestrator home owned by another account is refused;
- `site dashboard` writes its ready file (the sign-in link) 0600 under a permissive umask, listens on the
  loopback interface only and keeps its sign-in token out of its process arguments;
- secrets written through a temporary name are not diverted by a file planted beside them;
- an enrollment token is not readable from the enrolling process's arguments (from a file or standard
  input).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from site_fixtures import make_home

from fedhealth.agent import enroll_site
from fedhealth.core import ConfigError
from fedhealth.crypto import create_ca, write_private
from fedhealth.orchestrator import OrchestratorHome, init_home
from support import file_mode

_OTHERS = 0o077


def _everything_under(root: Path) -> list[Path]:
    return [Path(folder) / name for folder, dirs, files in os.walk(root) for name in (*dirs, *files)]


def test_site_enroll_writes_every_file_of_the_home_private_under_a_permissive_umask(
    tmp_path, permissive_umask
):
    ca = create_ca("test federation")

    def orchestrator(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/enroll"
        body = json.loads(request.content)
        assert "BEGIN CERTIFICATE REQUEST" in body["tls_csr"]  # the CSR, never the TLS key
        return httpx.Response(
            200,
            json={
                "site": body["site"],
                "enrolled_at": "2026-12-01T12:00:00+00:00",
                "tls_certificate": "-----BEGIN CERTIFICATE-----\nissued\n-----END CERTIFICATE-----\n",
            },
        )

    home = enroll_site(
        tmp_path / "site",
        name="hospital-a",
        orchestrator="https://orchestrator.test",
        token="fhe_" + "e" * 43,
        ca_pem=ca.cert_pem,
        transport=httpx.MockTransport(orchestrator),
    )
    assert file_mode(home.root) == 0o700
    written = sorted(p.name for p in home.root.iterdir())
    assert written == ["ca.pem", "identity.key", "site.json", "tls-client.key", "tls-client.pem"]
    for path in home.root.iterdir():
        assert file_mode(path) == 0o600, f"{path.name} is {file_mode(path):o}"
    assert home.client_cert() is not None


def test_orchestrator_init_leaves_nothing_readable_by_others_under_a_permissive_umask(
    tmp_path, permissive_umask
):
    root = tmp_path / "orch"
    init_home(root, hosts=["localhost"], url="https://localhost:1")
    home = OrchestratorHome(root)
    found = _everything_under(root)
    for path in (home.settings_path, home.ca_cert, home.tls_cert, home.state_dir / "orchestrator.sqlite"):
        assert path in found, path.name
    loose = {str(p.relative_to(root)): f"{file_mode(p):o}" for p in [root, *found] if file_mode(p) & _OTHERS}
    assert loose == {}


def test_an_orchestrator_database_at_a_sqlite_url_of_its_own_is_created_private(tmp_path):
    old = os.umask(0o022)  # the usual default of an operator's shell
    try:
        (tmp_path / "data").mkdir()
        database = tmp_path / "data" / "federation.sqlite"
        init_home(
            tmp_path / "orch",
            hosts=["localhost"],
            url="https://localhost:1",
            database_url=f"sqlite:///{database}",
        )
    finally:
        os.umask(old)
    assert "database_url" in json.loads(OrchestratorHome(tmp_path / "orch").settings_path.read_text())
    assert file_mode(database) == 0o600, f"{file_mode(database):o}"


def test_an_orchestrator_home_owned_by_another_account_is_refused(tmp_path, monkeypatch):
    init_home(tmp_path / "orch", hosts=["localhost"], url="https://localhost:1")
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    with pytest.raises(ConfigError, match="not to this user") as refused:
        OrchestratorHome(tmp_path / "orch").secure()
    assert "\n" not in str(refused.value)


def _listening_addresses(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) of the sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                found.append(address)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux's /proc")
def test_the_site_dashboard_listens_on_loopback_only_and_writes_its_sign_in_link_private(tmp_path):
    home = make_home(tmp_path / "site")
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "fedhealth", "site", "dashboard", "--home", str(home.root), "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--steward", "dana", "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: os.umask(0o000),  # started from a shell with the worst umask
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.05)
        assert file_mode(ready) == 0o600
        info = json.loads(ready.read_text())
        assert info["url"].startswith("http://127.0.0.1:")
        port = int(info["url"].rsplit(":", 1)[1])
        assert _listening_addresses(port) == ["0100007F"]  # 127.0.0.1, no other interface
        token = info["login_url"].split("token=", 1)[1]
        assert len(token) >= 40
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert token.encode() not in cmdline  # `ps` shows no other account the sign-in token
        with httpx.Client(timeout=10) as browser:
            assert browser.get(info["login_url"], follow_redirects=False).status_code == 303
        with httpx.Client(timeout=10) as other:
            assert other.get(info["login_url"], follow_redirects=False).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_secret_written_to_a_shared_folder_is_not_diverted_by_a_planted_temporary_file(tmp_path):
    shared = tmp_path / "handover"  # e.g. a group-writable folder where credentials are handed over
    shared.mkdir()
    attackers = tmp_path / "attacker-owned.txt"
    attackers.write_text("")
    os.chmod(attackers, 0o666)
    (shared / "rita.credential.tmp").symlink_to(attackers)  # planted before the admin runs the command
    write_private(shared / "rita.credential", b'{"api_key": "fhk_secret"}')
    assert "fhk_secret" not in attackers.read_text()
    assert not (shared / "rita.credential").is_symlink()
    assert file_mode(shared / "rita.credential") == 0o600


@pytest.mark.skipif(not os.path.exists("/proc/self/cmdline"), reason="needs Linux's /proc")
@pytest.mark.parametrize("channel", ["file", "stdin"])
def test_an_enrollment_token_is_not_readable_from_the_enrolling_process_arguments(tmp_path, channel):
    token = "fhe_" + "s" * 43
    token_file = tmp_path / "hospital-a.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(create_ca("test federation").cert_pem)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedhealth",
            "site",
            "enroll",
            "--orchestrator",
            "https://127.0.0.1:9",  # nothing listens: the process lives long enough to be looked at
            *(["--token-file", str(token_file)] if channel == "file" else []),
            "--ca",
            str(ca),
            "--name",
            "hospital-a",
            "--home",
            str(tmp_path / "site"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    if channel == "stdin":
        proc.stdin.write(token.encode() + b"\n")  # as `fedhealth site enroll ... < hospital-a.token`
    proc.stdin.close()
    try:
        seen = b""
        deadline = time.monotonic() + 10
        while not seen and proc.poll() is None and time.monotonic() < deadline:
            # what another account's `ps` shows (empty for a moment while the kernel is still in exec)
            seen = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    finally:
        proc.wait(timeout=60)
    assert b"fedhealth" in seen  # the enrolling process itself was looked at
    assert token.encode() not in seen
    assert proc.stderr is not None
    error = proc.stderr.read().decode()
    proc.stderr.close()
    # it took the token and went on to the orchestrator (which does not listen here)
    assert "enrollment token" not in error, error
    assert "127.0.0.1:9" in error or "connect" in error.lower(), error


def test_the_database_url_can_come_from_the_environment_instead_of_the_arguments(tmp_path):
    # a PostgreSQL URL may carry a password: other accounts read /proc/PID/cmdline, not /proc/PID/environ
    from typer.testing import CliRunner

    from fedhealth.cli import app

    database = tmp_path / "elsewhere.sqlite"
    url = f"sqlite:///{database}"
    home = tmp_path / "orch"
    result = CliRunner().invoke(
        app,
        ["orchestrator", "init", str(home), "--host", "127.0.0.1"],
        env={"FEDHEALTH_DATABASE_URL": url},
    )
    assert result.exit_code == 0, result.output
    assert json.loads(OrchestratorHome(home).settings_path.read_text())["database_url"] == url
    assert file_mode(database) == 0o600  # created private, and the schema and admin user went there
    assert database.stat().st_size > 0
