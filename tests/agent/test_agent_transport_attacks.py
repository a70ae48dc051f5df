"""A malicious or impersonated orchestrator, or a network attacker, against the site agent's connection and
its credentials (docs/security.md, "The federation's own PKI", "Clients and transport", "Limits and
retries"): what test_malicious_orchestrator_transport.py and the e2e transport tests do not already try.

- TLS: with no federation CA pinned (``ca.pem`` gone from the home) the agent and enrollment must refuse an
  ``https://`` orchestrator rather than fall back to the system's authorities, which a mis-issuing public
  CA would pass; a federation certificate for another name, or a site's own client certificate posing as
  the orchestrator, gets no request either.
- Retry-After: a value of a billion seconds, or one too large for a float, never pauses the agent longer
  than its retry policy's longest pause, nor past the call's own deadline; a storm of ``429 Retry-After: 0``
  still backs off.
- Error answers: a refusal whose body is a JSON list, a string, or nested 10^5 deep is an
  ``OrchestratorRefused``, never an ``AttributeError`` or ``RecursionError`` that ends ``site run``.
- Time: a login answer that trickles is abandoned at a deadline; so is an answer whose status line and
  headers trickle (every socket read of the agent's transport keeps the answer's deadline).
- Crafted task ids and digests never send the token to another host; enrollment follows no redirect.
- Files: an identity key path planted as a symbolic link is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from fedhealth.agent import (
    AgentSettings,
    OrchestratorClient,
    OrchestratorRefused,
    RetryPolicy,
    SiteAgent,
    TlsVerificationError,
    enroll_site,
)
from fedhealth.agent import _client as client_module
from fedhealth.core import ConfigError, FedHealthError, ServiceUnavailableError
from fedhealth.crypto import (
    IdentityKey,
    PemPair,
    create_ca,
    issue_client_certificate,
    issue_server_certificate,
)
from support import run_until_polled

SITE = "site-a"
URL = "https://orchestrator.test"
SOON = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
TOKEN = "secret-access-token"
ENROLLMENT_TOKEN = "fhe_" + "e" * 43

Answer = Callable[[httpx.Request], httpx.Response]


# --- an orchestrator in memory (httpx.MockTransport)


def scripted(answer: Answer, seen: list[httpx.Request] | None = None) -> httpx.MockTransport:
    """Logs the agent in, then answers every other request with ``answer``; records every request."""

    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if request.url.path.endswith("/agent/challenge"):
            return httpx.Response(200, json={"challenge": "ab" * 16, "expires_at": SOON})
        if request.url.path.endswith("/agent/token"):
            return httpx.Response(200, json={"access_token": TOKEN, "expires_at": SOON, "role": "site"})
        return answer(request)

    return httpx.MockTransport(handler)


def client_over(transport: httpx.BaseTransport, **policy: float | None) -> OrchestratorClient:
    return OrchestratorClient(
        URL, SITE, IdentityKey.generate(), transport=transport, retry=RetryPolicy(**policy)
    )


def then_empty(first: list[httpx.Response]) -> Answer:
    """Answer with each of ``first`` in turn, then with an empty poll."""
    queue = list(first)
    return lambda request: queue.pop(0) if queue else httpx.Response(200, json={"task": None})


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every pause the client takes, recorded instead of slept."""
    taken: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", taken.append)
    return taken


# --- an orchestrator on a local socket (answers that take time) ---------------------------------------------

Behaviour = Callable[[str, socket.socket, threading.Event], None]


@contextmanager
def lying_server(behaviour: Behaviour, *, tls: PemPair | None = None) -> Iterator[tuple[int, bytearray]]:
    """A local server that reads each request and hands its target to ``behaviour``; yields its port and
    every byte it received (after TLS, if any)."""
    received = bytearray()
    stop = threading.Event()
    context = None
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
            cert.write_bytes(tls.cert_pem)
            key.write_bytes(tls.key_pem)
            context.load_cert_chain(str(cert), str(key))

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(10)
            try:
                if context is not None:
                    sock = context.wrap_socket(sock, server_side=True)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                received.extend(data)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line[15:])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length:")
                    ),
                    0,
                )
                while len(body) < length and (chunk := sock.recv(65536)):
                    body += chunk
                    received.extend(chunk)
                behaviour(head.split(b" ", 2)[1].decode(), sock, stop)
            except (OSError, ssl.SSLError):
                pass
            finally:
                sock.close()

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server.server_address[1], received
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def json_answer(sock: socket.socket, body: object) -> None:
    payload = json.dumps(body).encode()
    sock.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )


def log_in(target: str, sock: socket.socket) -> bool:
    if target.endswith("/agent/challenge"):
        json_answer(sock, {"challenge": "ab" * 16, "expires_at": SOON})
        return True
    if target.endswith("/agent/token"):
        json_answer(sock, {"access_token": TOKEN, "expires_at": SOON, "role": "site"})
        return True
    return False


def trickled(head: bytes, seconds: float) -> Callable[[socket.socket, threading.Event], None]:
    """Send ``head``, then one byte every 50 ms for ``seconds``, then hang up."""

    def send(sock: socket.socket, stop: threading.Event) -> None:
        sock.sendall(head)
        until = time.monotonic() + seconds
        while time.monotonic() < until and not stop.wait(0.05):
            sock.sendall(b"a")

    return send


# --- (1) TLS: the federation CA, and only it


def _agent_polls(url: str, ca_pem: bytes | None) -> None:
    client = OrchestratorClient(
        url, SITE, IdentityKey.generate(), ca_pem=ca_pem, retry=RetryPolicy(max_elapsed_s=0.3)
    )
    try:
        client.next_task(0)
    finally:
        client.close()


def _site_enrolls(url: str, ca_pem: bytes | None, home: Path) -> None:
    enroll_site(home, name=SITE, orchestrator=url, token=ENROLLMENT_TOKEN, ca_pem=ca_pem)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("who", ["agent", "enrollment"])
def test_with_no_federation_ca_pinned_nothing_is_sent_to_a_server_the_system_trusts(
    tmp_path, monkeypatch, who
):
    # a public CA that mis-issued a certificate for the orchestrator's address, trusted by the system
    public_ca = create_ca("a public authority")
    system_store = tmp_path / "system-ca.pem"
    system_store.write_bytes(public_ca.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(system_store))
    impostor = issue_server_certificate(public_ca, ["127.0.0.1"])
    with lying_server(lambda target, sock, stop: None, tls=impostor) as (port, received):
        url = f"https://127.0.0.1:{port}"
        call = (
            (lambda: _agent_polls(url, None))  # HOME/ca.pem was lost: ca_pem() is None
            if who == "agent"
            else (lambda: _site_enrolls(url, None, tmp_path / "home"))
        )
        with pytest.raises((ConfigError, TlsVerificationError)):
            call()
    assert bytes(received) == b"", "a request (the site's name, its login or its token) reached the impostor"
    assert not (tmp_path / "home" / "identity.key").exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("who", ["agent", "enrollment"])
def test_a_federation_certificate_for_another_name_gets_no_request(tmp_path, who):
    federation = create_ca("the federation")
    other_name = issue_server_certificate(federation, ["other-host.example"])
    with lying_server(lambda target, sock, stop: None, tls=other_name) as (port, received):
        url = f"https://127.0.0.1:{port}"
        call = (
            (lambda: _agent_polls(url, federation.cert_pem))
            if who == "agent"
            else (lambda: _site_enrolls(url, federation.cert_pem, tmp_path / "home"))
        )
        with pytest.raises(TlsVerificationError, match="mismatch"):
            call()
    assert bytes(received) == b""


@pytest.mark.timeout(30)
def test_a_sites_client_certificate_cannot_pose_as_the_orchestrator():
    # a site whose name is the orchestrator's host name holds a federation certificate naming it (its CN);
    # it is a client certificate, so a client refuses it as a server's
    federation = create_ca("the federation")
    site_cert = issue_client_certificate(federation, "localhost")
    with (
        lying_server(lambda target, sock, stop: None, tls=site_cert) as (port, received),
        pytest.raises(TlsVerificationError, match="purpose"),
    ):
        _agent_polls(f"https://localhost:{port}", federation.cert_pem)
    assert bytes(received) == b""


@pytest.mark.timeout(30)
def test_the_control_the_federations_certificate_for_the_orchestrators_name_is_accepted():
    federation = create_ca("the federation")
    genuine = issue_server_certificate(federation, ["127.0.0.1"])

    def behaviour(target: str, sock: socket.socket, stop: threading.Event) -> None:
        if not log_in(target, sock):
            json_answer(sock, {"task": None})

    with lying_server(behaviour, tls=genuine) as (port, received):
        client = OrchestratorClient(
            f"https://127.0.0.1:{port}", SITE, IdentityKey.generate(), ca_pem=federation.cert_pem
        )
        try:
            assert client.next_task(0) is None
        finally:
            client.close()
    assert f"Bearer {TOKEN}".encode() in bytes(received)


# --- (2) Retry-After and 429 storms


@pytest.mark.parametrize("retry_after", ["1000000000", "9" * 400, "86400.5"])
def test_a_retry_after_of_any_size_never_pauses_the_agent_longer_than_its_retry_policy(sleeps, retry_after):
    limited = httpx.Response(429, headers={"Retry-After": retry_after}, json={"error": "slow down"})
    client = client_over(scripted(then_empty([limited, limited])), base_s=0.05, max_s=2.0)
    try:
        assert client.next_task(0) is None
    finally:
        client.close()
    assert len(sleeps) == 2
    assert max(sleeps) <= 2.0


@pytest.mark.timeout(30)
def test_a_retry_after_never_outlasts_the_calls_own_deadline():
    limited = lambda request: httpx.Response(429, headers={"Retry-After": "4"}, json={"error": "slow"})  # noqa: E731
    client = client_over(scripted(limited), base_s=0.05, max_s=30.0, max_elapsed_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailableError, match="unreachable"):
            client.next_task(0)
    finally:
        client.close()
    assert time.monotonic() - started < 2.0


def test_a_storm_of_429_retry_after_zero_still_backs_off(sleeps):
    storm = [httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "slow"}) for _ in range(30)]
    client = client_over(scripted(then_empty(storm)), base_s=0.05, max_s=0.2)
    try:
        assert client.next_task(0) is None
    finally:
        client.close()
    assert len(sleeps) == 30
    # full jitter over [0, 0.2] after the first two: about 2.9 s expected; zero would hammer the orchestrator
    assert sum(sleeps) > 0.5
    assert max(sleeps) <= 0.2


# --- (3) error answers that are not what they say

HOSTILE_ERROR_BODIES = {
    "json-list": b'["error", "detail"]',
    "json-string": b'"error"',
    "json-number": b"42",
    "json-null": b"null",
    "array-nested-1e5": b"[" * 100_000 + b"]" * 100_000,
    "object-nested-1e5": b'{"error":' * 100_000 + b"1" + b"}" * 100_000,
}


@pytest.mark.parametrize("name", sorted(HOSTILE_ERROR_BODIES))
def test_a_refusal_whose_body_is_not_a_json_object_is_still_a_refusal(name):
    body = HOSTILE_ERROR_BODIES[name]
    refusal = httpx.Response(409, content=body, headers={"Content-Type": "application/json"})
    client = client_over(scripted(lambda request: refusal))
    try:
        with pytest.raises(OrchestratorRefused) as refused:
            client.next_task(0)
    finally:
        client.close()
    assert refused.value.status == 409
    assert len(str(refused.value)) < 3000  # error and detail are cut: a refusal is logged whole


@pytest.mark.timeout(30)
def test_the_agent_goes_on_polling_after_a_refusal_nested_a_hundred_thousand_deep():
    polls: list[int] = []
    nested = HOSTILE_ERROR_BODIES["array-nested-1e5"]

    def answer(request: httpx.Request) -> httpx.Response:
        polls.append(1)
        if len(polls) == 1:
            return httpx.Response(409, content=nested, headers={"Content-Type": "application/json"})
        return httpx.Response(200, json={"task": None})

    key = IdentityKey.generate()
    quick = RetryPolicy(base_s=0.01, max_s=0.05)
    client = OrchestratorClient(URL, SITE, key, transport=scripted(answer), retry=quick)
    site = SiteAgent(
        AgentSettings(orchestrator_url=URL, site=SITE, identity=key, poll_wait_s=0.01, retry=quick),
        client=client,
    )
    raised = run_until_polled(site, polls)
    client.close()
    assert raised is None, f"the agent stopped: {type(raised).__name__}"
    assert len(polls) >= 3


# --- (4) answers that arrive a byte at a time


@pytest.mark.timeout(30)
def test_a_login_answer_that_trickles_is_abandoned_at_its_deadline():
    challenge = trickled(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n", 4.0
    )

    def behaviour(target: str, sock: socket.socket, stop: threading.Event) -> None:
        if target.endswith("/agent/challenge"):
            challenge(sock, stop)
        else:
            log_in(target, sock) or json_answer(sock, {"task": None})

    with lying_server(behaviour) as (port, _):
        client = OrchestratorClient(
            f"http://127.0.0.1:{port}",
            SITE,
            IdentityKey.generate(),
            insecure=True,
            retry=RetryPolicy(base_s=0.05, max_s=0.1, max_elapsed_s=0.5),
        )
        client.LOGIN_ANSWER_S = 1.0  # 30 s in service
        started = time.monotonic()
        try:
            with pytest.raises(ServiceUnavailableError):
                client.next_task(0)
        finally:
            client.close()
        assert time.monotonic() - started < 3.0


@pytest.mark.timeout(30)
def test_a_poll_answer_whose_headers_trickle_is_abandoned_at_the_polls_deadline():
    headers = trickled(b"HTTP/1.1 200 OK\r\nX-Slow: ", 3.0)

    def behaviour(target: str, sock: socket.socket, stop: threading.Event) -> None:
        log_in(target, sock) or headers(sock, stop)

    with lying_server(behaviour) as (port, _):
        client = OrchestratorClient(
            f"http://127.0.0.1:{port}",
            SITE,
            IdentityKey.generate(),
            insecure=True,
            retry=RetryPolicy(base_s=0.05, max_s=0.1, max_elapsed_s=0.5),
        )
        client.LONG_POLL_GRACE_S = 0.5  # a poll's answer is due by its wait and this margin
        started = time.monotonic()
        try:
            with pytest.raises(ServiceUnavailableError):
                client.next_task(0)
        finally:
            client.close()
        assert time.monotonic() - started < 2.0


@pytest.mark.timeout(30)
def test_site_check_s_latency_probe_is_not_held_by_headers_that_trickle(monkeypatch):
    from fedhealth.agent import _check
    from fedhealth.protocol import CheckStatus

    monkeypatch.setattr(_check, "LATENCY_ANSWER_S", 0.5)
    headers = trickled(b"HTTP/1.1 200 OK\r\nX-Slow: ", 4.0)
    with lying_server(lambda target, sock, stop: headers(sock, stop)) as (port, _):
        client = OrchestratorClient(f"http://127.0.0.1:{port}", SITE, IdentityKey.generate(), insecure=True)
        result = _check.SiteCheck(site=SITE)
        started = time.monotonic()
        try:
            _check._latency(result, client)
        finally:
            client.close()
    assert time.monotonic() - started < 3, "one trickled /healthz answer held the site check"
    assert [(c.name, c.status) for c in result.checks] == [("network.latency", CheckStatus.FAIL)]


@pytest.mark.timeout(30)
def test_a_proxy_named_in_the_environment_never_carries_the_sites_login(monkeypatch):
    closed = socket.create_server(("127.0.0.1", 0))  # an orchestrator address nothing answers at
    port = closed.getsockname()[1]
    closed.close()
    with lying_server(lambda target, sock, stop: None) as (proxy_port, through_proxy):
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy_port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        client = OrchestratorClient(
            f"http://127.0.0.1:{port}",
            SITE,
            IdentityKey.generate(),
            insecure=True,
            retry=RetryPolicy(base_s=0.05, max_s=0.1, max_elapsed_s=0.3),
        )
        try:
            with pytest.raises(ServiceUnavailableError):
                client.next_task(0)
        finally:
            client.close()
    assert bytes(through_proxy) == b"", "the site's login went through a proxy the environment named"


# --- (5) where the token goes

CRAFTED_IDS = [
    "@evil.example",
    "//evil.example/x",
    "http://evil.example/",
    "..%2F..%2F%2Fevil.example",
    "x#@evil",
]


@pytest.mark.parametrize("crafted", CRAFTED_IDS)
def test_a_crafted_task_id_or_digest_never_sends_the_token_to_another_host(crafted):
    seen: list[httpx.Request] = []
    client = client_over(
        scripted(lambda request: httpx.Response(200, json={"ok": True}), seen), max_elapsed_s=0.2
    )
    try:
        for call in (
            lambda: client.get_model(crafted),
            lambda: client.upload_result(crafted, b"x"),
            lambda: client.secagg_receive(crafted, crafted, wait=0),
        ):
            # an answer that is not what the call expects: what matters is where the request went
            with contextlib.suppress(FedHealthError, ValueError):
                call()
    finally:
        client.close()
    assert seen
    assert {request.url.host for request in seen} == {"orchestrator.test"}
    assert {request.url.scheme for request in seen} == {"https"}


@pytest.mark.timeout(30)
def test_enrollment_follows_no_redirect_and_the_token_stays_with_the_orchestrator(tmp_path):
    with lying_server(lambda target, sock, stop: json_answer(sock, {"ok": True})) as (elsewhere, taken):

        def redirect(target: str, sock: socket.socket, stop: threading.Event) -> None:
            location = f"http://127.0.0.1:{elsewhere}/api/v1/enroll"
            sock.sendall(f"HTTP/1.1 307 Moved\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode())

        with lying_server(redirect) as (port, _), pytest.raises(FedHealthError):
            enroll_site(
                tmp_path / "home",
                name=SITE,
                orchestrator=f"http://127.0.0.1:{port}",
                token=ENROLLMENT_TOKEN,
                ca_pem=None,
                insecure=True,
            )
    assert bytes(taken) == b""
    assert not (tmp_path / "home" / "identity.key").exists()


# --- (6) the site's key files


def test_an_identity_key_path_planted_as_a_symbolic_link_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.parent.mkdir()
    victim.write_bytes(b"someone else's file")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "identity.key").symlink_to(victim)
    (home / "ca.pem").symlink_to(victim)

    def enrolled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"site": SITE, "enrolled_at": datetime.now(UTC).isoformat()})

    enroll_site(
        home,
        name=SITE,
        orchestrator="http://orchestrator.test",
        token=ENROLLMENT_TOKEN,
        ca_pem=create_ca("the federation").cert_pem,
        transport=httpx.MockTransport(enrolled),
        insecure=True,
    )
    assert victim.read_bytes() == b"someone else's file"
    for name in ("identity.key", "ca.pem"):
        info = os.lstat(home / name)
        assert stat.S_ISREG(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
    IdentityKey.load(home / "identity.key")


@pytest.mark.parametrize(
    "body",
    [b"[1, 2]", b'"refused"', b"null", b"42", b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe not json"],
    ids=["list", "string", "null", "number", "nested-100000-deep", "not-utf8"],
)
def test_a_collective_calls_error_body_of_any_shape_is_read_as_text_not_a_crash(body):
    """The collective channel reads its error answers itself (not through the agent's client): whatever
    the orchestrator puts in one, the site gets an error and a detail, never an exception of another kind."""
    from fedhealth.agent._collective import _error_of

    error, detail = _error_of(body)
    assert isinstance(error, str)
    assert len(error) <= 500
    assert detail is None
    assert _error_of(b'{"error": "the session is gone", "detail": {"call": 3}}') == (
        "the session is gone",
        {"call": 3},
    )
