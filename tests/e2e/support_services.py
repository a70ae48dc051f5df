"""Helpers for the end-to-end tests of the orchestrator's identity, authorization and limits: callers that
hold keys, certificates or tokens a real agent would not, raw requests, the orchestrator process's memory,
and listeners that record what a client sends them."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fedhealth.client import OperatorClient
from fedhealth.core import canonical_json
from fedhealth.crypto import IdentityKey, PemPair, create_ca, issue_server_certificate, pinned_tls_context
from fedhealth.protocol import (
    ResultManifest,
    SiteMetrics,
    StudySpec,
    Task,
    TaskPoll,
    agent_login_message,
)
from fedhealth.runtime import encode_update, param_specs
from fedhealth.sim import LocalFederation
from support import synthetic_recipe


def tls_verify(fed: LocalFederation, client_cert: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
    return pinned_tls_context(fed.home.ca_cert.read_bytes(), client_cert=client_cert)


class KeyHolder:
    """Whoever holds ``key`` (a site's real key, or an attacker's) and, under mutual TLS, a client
    certificate: logs in as ``site`` over the real HTTPS API and calls the agent API with that token."""

    def __init__(
        self,
        fed: LocalFederation,
        site: str,
        key: IdentityKey,
        *,
        client_cert: tuple[bytes, bytes] | None = None,
    ) -> None:
        assert fed.url is not None
        self.site = site
        self.key = key
        self.http = httpx.Client(base_url=fed.url, verify=tls_verify(fed, client_cert), timeout=30.0)

    def login(self) -> httpx.Response:
        challenge = self.http.post("/api/v1/agent/challenge", json={"site": self.site})
        if challenge.status_code != 200:
            return challenge
        value = challenge.json()["challenge"]
        signature = self.key.sign(canonical_json(agent_login_message(self.site, value))).hex()
        return self.http.post(
            "/api/v1/agent/token", json={"site": self.site, "challenge": value, "signature": signature}
        )

    def token_headers(self) -> dict[str, str]:
        response = self.login()
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    def poll(self, headers: dict[str, str], wait: float = 0.0) -> httpx.Response:
        return self.http.get(
            "/api/v1/agent/tasks/next", params={"wait": wait}, headers=headers, timeout=wait + 15
        )

    def close(self) -> None:
        self.http.close()


def enroll_raw(
    fed: LocalFederation, site: str, token: str, key: IdentityKey | None = None, url: str | None = None
) -> httpx.Response:
    """An enrollment request as anyone holding ``token`` could send it (no home is written)."""
    key = key or IdentityKey.generate()
    with httpx.Client(verify=tls_verify(fed), timeout=30.0) as http:
        return http.post(
            f"{url or fed.enroll_url or fed.url}/api/v1/enroll",
            json={"site": site, "token": token, "public_key": key.public().raw.hex()},
        )


def operator(fed: LocalFederation, user: str, role: str) -> OperatorClient:
    """A new operator account with ``role``, and its client."""
    api_key = fed.operator.add_user(user, role).api_key
    assert fed.url is not None
    return OperatorClient(fed.url, user=user, api_key=api_key, ca_pem=fed.home.ca_cert.read_text())


def audit_entries(fed: LocalFederation) -> list[dict[str, Any]]:
    """The orchestrator's audit log as exported to an auditor (header line dropped)."""
    text = fed.operator.request("GET", "/api/v1/governance/audit").text
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in rows if "seq" in r and "type" in r]


def audit_text(fed: LocalFederation) -> str:
    return fed.operator.request("GET", "/api/v1/governance/audit").text


def synthetic_spec(name: str, sites: list[str], *, seed: int = 1, rounds: int = 2, **extra: Any) -> StudySpec:
    """A cheap study (no data) whose rounds the test's own sites answer."""
    fields: dict[str, Any] = {
        "name": name,
        "dataset": "none",
        "recipe": synthetic_recipe(64),
        "rounds": rounds,
        "train_sites": sites,
        "min_sites": 1,
        "round_deadline_s": 120.0,
        "seed": seed,
    }
    fields.update(extra)
    return StudySpec.model_validate(fields)


def poll_task(http: httpx.Client, headers: dict[str, str], wait: float = 20.0) -> Task:
    response = http.get("/api/v1/agent/tasks/next", params={"wait": wait}, headers=headers, timeout=wait + 15)
    assert response.status_code == 200, response.text
    task = TaskPoll.model_validate_json(response.content).task
    assert task is not None, "no task arrived"
    return task


def valid_update(task: Task, fill: float = 0.01) -> bytes:
    """A well-formed update for ``task`` (every parameter moved by ``fill``)."""
    delta = {s.name: np.full(s.shape, fill, dtype=np.float32) for s in param_specs(task.recipe)}
    return encode_update(delta, ResultManifest(task_id=task.task_id, metrics=SiteMetrics(num_samples=10)))


def round_model(client: OperatorClient, study_id: str, number: int, timeout: float = 60.0) -> str:
    """Wait until round ``number`` of the study completed; the model it released."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.study(study_id)
        done = [r for r in info.rounds if r.number == number and r.status.value == "completed"]
        if done and done[0].model_digest:
            return done[0].model_digest
        assert time.monotonic() < deadline, f"round {number} of {study_id} did not complete: {info}"
        time.sleep(0.05)


# --- the orchestrator process's memory ---------------------------------------------------------------------


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak so far) of a process, in kB, from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


class RssSampler:
    """Samples a process's VmRSS every few milliseconds in a thread; ``peak_kb`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = memory_kb(pid)["VmRSS"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, memory_kb(self.pid)["VmRSS"])
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- raw requests and recording listeners ------------------------------------------------------------------


def headers_only(
    fed: LocalFederation, method: str, path: str, headers: dict[str, str], *, timeout: float = 5.0
) -> int | None:
    """Send a request line and headers (declaring a body with Content-Length) but never the body; return the
    status the server answers with, or None if it answers nothing within ``timeout`` (it waits for the
    body: whatever it checks, it checks after reading it)."""
    assert fed.url is not None
    host, port = fed.url.rsplit("//", 1)[1].rsplit(":", 1)
    context = tls_verify(fed)
    with (
        socket.create_connection((host, int(port)), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        tls.settimeout(timeout)
        try:
            head = tls.recv(4096)
        except (TimeoutError, ssl.SSLError, OSError):
            return None
    if not head.startswith(b"HTTP/1.1 "):
        return None
    return int(head.split(b" ", 2)[1])


class RecordingListener:
    """A server on loopback that records every byte clients send it (answering each connection with a 500):
    stands for whoever sits on the network path. With ``tls``, it presents a certificate of its own CA."""

    def __init__(self, *, tls: PemPair | None = None) -> None:
        self.received = bytearray()
        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        self._context: ssl.SSLContext | None = None
        self.ca: PemPair | None = None
        if tls is not None:
            self.ca = tls
            leaf = issue_server_certificate(tls, ["127.0.0.1", "localhost"])
            self._context = _server_context(leaf)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            with contextlib.suppress(OSError, ssl.SSLError):
                if self._context is not None:
                    conn = self._context.wrap_socket(conn, server_side=True)
                conn.settimeout(2.0)
                with contextlib.suppress(OSError, ssl.SSLError):
                    while chunk := conn.recv(65536):
                        self.received.extend(chunk)
                        if b"\r\n\r\n" in self.received:
                            conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                            break
            with contextlib.suppress(OSError):
                conn.close()

    def url(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._sock.close()


def _server_context(leaf: PemPair) -> ssl.SSLContext:
    import tempfile

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        cert.write_bytes(leaf.cert_pem)
        key.write_bytes(leaf.key_pem)
        context.load_cert_chain(str(cert), str(key))
    return context


@contextmanager
def recording_listener(*, tls: bool = False) -> Iterator[RecordingListener]:
    listener = RecordingListener(tls=create_ca("someone on the path") if tls else None)
    try:
        yield listener
    finally:
        listener.close()
