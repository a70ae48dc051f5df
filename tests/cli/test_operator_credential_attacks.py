"""An attacker against the operator side (researchers, admins, auditors with the ``fedhealth`` CLI and
``fedhealth.client``): docs/security.md, "The federation's own PKI" and "Clients and transport".

- TLS: an operator trusts only the federation CA. With none to pin (``ca_pem=None`` in Python, a credential
  file whose ``ca_pem`` is empty) the client must refuse an ``https://`` orchestrator rather than fall back to
  the system's authorities, any of which could mis-issue a certificate for the orchestrator's name and would
  then receive the API key.
- Hostile answers: a redirect is not followed (the API key stays with the orchestrator) and is a refusal; a
  refusal whose body is a JSON list, a string or brackets nested 10^5 deep is a ``ClientError``; an answer
  that declares or sends more than its bound, or trickles past its deadline, is abandoned; a 429 with a
  Retry-After of any size never parks ``wait_for_study``.
- Files: a credential written by ``user add --out`` is 0600 under umask 0 and replaces a planted symbolic link
  rather than writing through it.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from fedhealth.cli import app
from fedhealth.client import ClientError, OperatorClient
from fedhealth.client import _operator as operator_module
from fedhealth.core import ConfigError
from fedhealth.crypto import PemPair, client_tls_for_url, create_ca, issue_server_certificate
from fedhealth.protocol import OperatorCredential, UserCreated
from support import breast_spec

API_KEY = "fhk_" + "k" * 43
TOKEN = "operator-access-token"
URL = "https://orchestrator.test"
FEDERATION_CA = create_ca("the federation").cert_pem.decode()
SOON = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

Answer = Callable[[httpx.Request], httpx.Response]


# --- an orchestrator in memory ------------------------------------------------------------------------------


def scripted(answer: Answer, seen: list[httpx.Request]) -> httpx.MockTransport:
    """Logs the operator in, then answers every other request with ``answer``; records every request."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/api/v1/auth/token":
            return httpx.Response(200, json={"access_token": TOKEN, "expires_at": SOON, "role": "admin"})
        return answer(request)

    return httpx.MockTransport(handler)


def client_over(transport: httpx.BaseTransport, **kwargs: Any) -> OperatorClient:
    return OperatorClient(
        URL, user="admin", api_key=API_KEY, ca_pem=FEDERATION_CA, transport=transport, **kwargs
    )


def study(status: str) -> dict[str, object]:
    return {
        "study_id": "st_1",
        "spec": breast_spec(["north"]).model_dump(mode="json"),
        "status": status,
        "reason": None,
        "created_at": datetime.now(UTC).isoformat(),
        "ended_at": None,
        "completed_rounds": 0,
        "current_round": None,
        "model_digest": None,
    }


# --- a TLS server on loopback that records every byte it is sent -------------------------------------------


@contextmanager
def impostor(leaf: PemPair) -> Iterator[tuple[int, bytearray]]:
    """A TLS server with certificate ``leaf``: yields its port and every byte it received after the
    handshake (it answers 500 to whatever arrives)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        cert.write_bytes(leaf.cert_pem)
        key.write_bytes(leaf.key_pem)
        context.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)  # accept() wakes to see that the test is over
    received = bytearray()
    closed = threading.Event()

    def serve() -> None:
        while not closed.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            sock: socket.socket = conn
            with contextlib.suppress(OSError, ssl.SSLError):
                sock = context.wrap_socket(conn, server_side=True)
                request = bytearray()
                while chunk := sock.recv(65536):
                    received.extend(chunk)
                    request.extend(chunk)
                    head, found, body = bytes(request).partition(b"\r\n\r\n")
                    length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                    if found and len(body) >= (int(length.group(1)) if length else 0):
                        # the whole request read: closing with bytes unread would reset the answer away
                        sock.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                        break
            with contextlib.suppress(OSError):
                sock.close()
            with contextlib.suppress(OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        closed.set()
        listener.close()
        thread.join(5)


def credential_file(path: Path, *, orchestrator: str, ca_pem: str) -> Path:
    path.write_text(
        OperatorCredential(
            orchestrator=orchestrator, ca_pem=ca_pem, user="admin", api_key=API_KEY
        ).model_dump_json()
    )
    os.chmod(path, 0o600)
    return path


def _operator_lists_sites(url: str, ca_pem: str | None) -> None:
    client = OperatorClient(url, user="admin", api_key=API_KEY, ca_pem=ca_pem)
    try:
        client.sites()
    finally:
        client.close()


# --- (1) TLS: the federation CA, and only it --------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("who", ["python-none", "python-empty", "cli-empty-ca", "tls-for-url"])
def test_with_no_federation_ca_pinned_no_operator_request_reaches_a_server_the_system_trusts(
    tmp_path, monkeypatch, who
):
    # a public CA that mis-issued a certificate for the orchestrator's address, trusted by the system
    public_ca = create_ca("a public authority")
    system_store = tmp_path / "system-ca.pem"
    system_store.write_bytes(public_ca.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(system_store))
    with impostor(issue_server_certificate(public_ca, ["127.0.0.1"])) as (port, received):
        url = f"https://127.0.0.1:{port}"
        if who == "cli-empty-ca":
            path = credential_file(tmp_path / "admin.credential", orchestrator=url, ca_pem="")
            result = CliRunner().invoke(app, ["site", "list", "--credential", str(path)])
            assert result.exit_code == 1, result.output
            assert "no federation CA" in result.output
            assert "Traceback" not in result.output
        elif who == "tls-for-url":  # any other caller of the one place the transport is decided
            verify = client_tls_for_url(url, None)
            with httpx.Client(verify=verify) as http, pytest.raises(httpx.ConnectError):
                http.post(f"{url}/api/v1/auth/token", json={"user": "admin", "api_key": API_KEY})
        else:
            with pytest.raises(ConfigError, match="no federation CA"):
                _operator_lists_sites(url, None if who == "python-none" else "")
    assert API_KEY.encode() not in bytes(received)
    assert bytes(received) == b"", "a request (the operator's login with its API key) reached the impostor"


@pytest.mark.timeout(30)
def test_the_control_an_operator_client_pinned_to_the_federation_ca_does_reach_its_orchestrator(tmp_path):
    federation = create_ca("the federation")
    with impostor(issue_server_certificate(federation, ["127.0.0.1"])) as (port, received):
        client = OperatorClient(
            f"https://127.0.0.1:{port}", user="admin", api_key=API_KEY, ca_pem=federation.cert_pem.decode()
        )
        try:
            with pytest.raises(ClientError) as answered:
                client.sites()
        finally:
            client.close()
    assert answered.value.status == 500
    assert b"POST /api/v1/auth/token" in bytes(received)


# --- (2) hostile answers ----------------------------------------------------------------------------------


def test_a_redirect_is_not_followed_and_the_api_key_stays_with_the_orchestrator():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(307, headers={"Location": "https://collector.example/api/v1/auth/token"})

    client = client_over(httpx.MockTransport(handler))
    try:
        with pytest.raises(ClientError) as refused:
            client.sites()
    finally:
        client.close()
    assert refused.value.status == 307
    assert [r.url.host for r in seen] == ["orchestrator.test"]


NESTED = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "body",
    ['["a", "list"]', '"a string"', "42", "null", NESTED, '{"error": ["not", "text"], "detail": 1}', "{", ""],
    ids=["list", "string", "number", "null", "nested-1e5", "error-not-text", "broken", "empty"],
)
def test_a_refusal_whose_body_is_not_a_json_object_is_a_client_error(body):
    seen: list[httpx.Request] = []
    answer = httpx.Response(403, content=body.encode(), headers={"Content-Type": "application/json"})
    client = client_over(scripted(lambda request: answer, seen))
    try:
        with pytest.raises(ClientError) as refused:
            client.sites()
    finally:
        client.close()
    assert refused.value.status == 403
    assert len(str(refused.value)) < 1000


def test_a_login_refusal_whose_body_is_not_a_json_object_is_a_client_error():
    client = client_over(httpx.MockTransport(lambda request: httpx.Response(401, json=["no"])))
    try:
        with pytest.raises(ClientError) as refused:
            client.sites()
    finally:
        client.close()
    assert refused.value.status == 401


def test_an_answer_declaring_more_than_its_bound_is_refused_before_its_body_is_read(monkeypatch):
    monkeypatch.setattr(OperatorClient, "MAX_ANSWER_BYTES", 1 << 20)
    pulled: list[int] = []

    def body() -> Iterator[bytes]:
        for _ in range(64):
            pulled.append(1)
            yield b" " * (1 << 20)

    seen: list[httpx.Request] = []
    client = client_over(
        scripted(
            lambda r: httpx.Response(200, headers={"Content-Length": str(64 << 20)}, content=body()), seen
        )
    )
    try:
        with pytest.raises(ClientError, match="over"):
            client.sites()
    finally:
        client.close()
    assert pulled == []


@pytest.mark.parametrize("call", ["sites", "model"])
def test_an_answer_without_end_is_abandoned_at_its_bound(monkeypatch, call):
    monkeypatch.setattr(OperatorClient, "MAX_ANSWER_BYTES", 1 << 20)
    monkeypatch.setattr(OperatorClient, "MAX_MODEL_BYTES", 2 << 20)
    pulled: list[int] = []

    def endless() -> Iterator[bytes]:
        for _ in range(64):  # 64 MiB stands for "without end"; a bounded client stops after 2 or 3
            pulled.append(1)
            yield b" " * (1 << 20)

    seen: list[httpx.Request] = []
    client = client_over(scripted(lambda r: httpx.Response(200, content=endless()), seen))
    try:
        with pytest.raises(ClientError, match="over"):
            client.sites() if call == "sites" else client.model_bytes("st_1")
    finally:
        client.close()
    assert len(pulled) <= 3


@pytest.mark.timeout(30)
def test_an_answer_that_trickles_is_abandoned_at_its_deadline():
    def trickle() -> Iterator[bytes]:
        until = time.monotonic() + 10
        while time.monotonic() < until:
            time.sleep(0.05)
            yield b" "

    seen: list[httpx.Request] = []
    client = client_over(
        scripted(lambda r: httpx.Response(200, content=trickle()), seen), answer_deadline_s=0.5
    )
    started = time.monotonic()
    try:
        with pytest.raises(ClientError, match="deadline"):
            client.sites()
    finally:
        client.close()
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("retry_after", ["1000000000", "9" * 400, "0", "soon"])
def test_a_retry_after_of_any_size_never_parks_wait_for_study(monkeypatch, retry_after):
    slept: list[float] = []
    monkeypatch.setattr(operator_module.time, "sleep", slept.append)
    answers = [httpx.Response(429, headers={"Retry-After": retry_after}, json={"error": "slow down"})] * 3
    answers.append(httpx.Response(200, json=study("completed")))
    seen: list[httpx.Request] = []
    client = client_over(scripted(lambda r: answers.pop(0), seen))
    try:
        info = client.wait_for_study("st_1", timeout=60, interval=0.5)
    finally:
        client.close()
    assert info.status.value == "completed"
    assert len(slept) == 3
    assert all(0.5 <= s <= OperatorClient.MAX_PAUSE_S for s in slept), slept


# --- (3) credential files ---------------------------------------------------------------------------------


def test_a_new_users_credential_is_private_under_umask_0_and_replaces_a_planted_symlink(
    tmp_path, monkeypatch
):
    admin = credential_file(tmp_path / "admin.credential", orchestrator=URL, ca_pem=FEDERATION_CA)
    attackers = tmp_path / "attacker-owned.txt"
    attackers.write_text("")
    os.chmod(attackers, 0o666)
    out = tmp_path / "rita.credential"
    out.symlink_to(attackers)  # planted where the admin will write rita's credential
    created = UserCreated(name="rita", role="researcher", api_key="fhk_" + "r" * 43)
    monkeypatch.setattr(OperatorClient, "add_user", lambda self, name, role: created)
    old = os.umask(0)
    try:
        result = CliRunner().invoke(
            app,
            ["user", "add", "rita", "--role", "researcher", "--out", str(out), "--credential", str(admin)],
        )
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert created.api_key not in result.output
    assert attackers.read_text() == ""
    assert not out.is_symlink()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert OperatorCredential.model_validate_json(out.read_text()).api_key == created.api_key


# --- the transport: a deadline for the whole answer, and no proxy from the environment ----------------------


@contextmanager
def plain_server(answer: Callable[[socket.socket], None]) -> Iterator[tuple[int, bytearray]]:
    """A plain-HTTP server on loopback: reads each request's head, then lets ``answer`` write to the socket;
    yields its port and every byte it received."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    received = bytearray()
    closed = threading.Event()

    def serve() -> None:
        while not closed.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.settimeout(5)
                while b"\r\n\r\n" not in received and (chunk := conn.recv(65536)):
                    received.extend(chunk)
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        closed.set()
        listener.close()
        thread.join(10)


@pytest.mark.timeout(30)
def test_an_answer_whose_status_line_and_headers_trickle_is_abandoned_at_the_deadline():
    def trickle_headers(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        until = time.monotonic() + 6
        while time.monotonic() < until:  # one byte well inside any per-read timeout
            conn.sendall(b"a")
            time.sleep(0.05)

    with plain_server(trickle_headers) as (port, _):
        client = OperatorClient(
            f"http://127.0.0.1:{port}",
            user="admin",
            api_key="fh_key",
            ca_pem=None,
            insecure=True,
            answer_deadline_s=0.5,
        )
        started = time.monotonic()
        try:
            with pytest.raises(httpx.TimeoutException, match="deadline"):
                client.sites()
        finally:
            client.close()
        assert time.monotonic() - started < 3


@pytest.mark.timeout(30)
def test_a_proxy_named_in_the_environment_never_sees_the_api_key(monkeypatch):
    def refuse(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}")

    with plain_server(refuse) as (proxy_port, through_proxy), plain_server(refuse) as (port, direct):
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy_port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        client = OperatorClient(
            f"http://127.0.0.1:{port}", user="admin", api_key="fh_secret_key", ca_pem=None, insecure=True
        )
        try:
            with pytest.raises(ClientError):
                client.sites()
        finally:
            client.close()
    assert b"POST /api/v1/auth/token" in direct  # the control: the login went where it was told
    assert bytes(through_proxy) == b"", "the operator's login went through a proxy the environment named"
