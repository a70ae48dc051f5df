"""A malicious orchestrator against a site agent's HTTP client: answers that never end, are enormous
(declared or actual), carry a giant header, never come, or redirect to another host; and poll answers
the agent cannot parse. The agent must bound what it reads and how long it waits, send nothing to
another host, and keep polling. Each test runs the real ``OrchestratorClient`` against a small local
HTTP server in a thread that plays the lie and counts what it managed to send (or, for the parse-only
lies, an ``httpx.MockTransport``).

The payload-level lies (hostile tensors, crafted ids, recipe params) are in
test_malicious_orchestrator_payloads.py."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from site_fixtures import make_home

from fedhealth.agent import AgentSettings, OrchestratorClient, RetryPolicy, SiteAgent
from fedhealth.core import ServiceUnavailableError, encode_tensors, sha256_hex
from fedhealth.crypto import IdentityKey
from fedhealth.protocol import StudySpec, Task, TaskKind
from fedhealth.runtime import initial_model
from support import run_until_polled, synthetic_recipe

SITE = "site-a"
MiB = 1 << 20
SENT_CAP = 64 * MiB  # what the lying server sends at most on one connection
READ_BOUND = 16 * MiB  # far above the test's model (a few hundred bytes) plus socket buffers

# --- a lying orchestrator on a local socket ---------------------------------------------------------------

Behaviour = Callable[[socket.socket, "Orchestrator"], int]  # writes an answer, returns the bytes it sent


@dataclass
class Orchestrator:
    """A local HTTP/1.1 server: logs the agent in, then answers each path prefix with a behaviour."""

    routes: dict[str, Behaviour]
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # bytes sent per lying answer
    stop: threading.Event = field(default_factory=threading.Event)
    url: str = ""


def _read_request(sock: socket.socket) -> tuple[str, str, dict[str, str], bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {
        k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
    }
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return method, target, headers, body


def send_json(sock: socket.socket, status: int, body: object) -> int:
    payload = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    sock.sendall(head + payload)
    return len(head) + len(payload)


def _login(sock: socket.socket, target: str) -> bool:
    soon = datetime.now(UTC) + timedelta(hours=1)
    if target.endswith("/agent/challenge"):
        send_json(sock, 200, {"challenge": "ab" * 16, "expires_at": soon.isoformat()})
        return True
    if target.endswith("/agent/token"):
        send_json(sock, 200, {"access_token": "secret-token", "expires_at": soon.isoformat(), "role": "site"})
        return True
    return False


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, Behaviour]], Orchestrator]]:
    servers: list[tuple[socketserver.ThreadingTCPServer, Orchestrator]] = []

    def start(routes: dict[str, Behaviour]) -> Orchestrator:
        orch = Orchestrator(routes=routes)

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(20)
                try:
                    request = _read_request(sock)
                    if request is None:
                        return
                    method, target, headers, _ = request
                    orch.requests.append((method, target, headers))
                    if _login(sock, target):
                        return
                    for prefix, behaviour in orch.routes.items():
                        if target.split("?")[0].startswith(prefix):
                            orch.sent.append(behaviour(sock, orch))
                            return
                    send_json(sock, 404, {"error": "not_found"})
                except OSError:
                    pass

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        orch.url = f"http://127.0.0.1:{server.server_address[1]}"
        servers.append((server, orch))
        return orch

    yield start
    for server, orch in servers:
        orch.stop.set()
        server.shutdown()
        server.server_close()


def zeros_forever(*, declared: bool) -> Behaviour:
    """An answer of 2^40 bytes (declared in Content-Length, or chunked without a length): zeros as fast as the
    agent reads them, up to SENT_CAP."""

    def behaviour(sock: socket.socket, orch: Orchestrator) -> int:
        framing = f"Content-Length: {1 << 40}" if declared else "Transfer-Encoding: chunked"
        sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode())
        block = b" " * MiB
        chunk = block if declared else f"{len(block):x}\r\n".encode() + block + b"\r\n"
        sent = 0
        try:
            while sent < SENT_CAP and not orch.stop.is_set():
                sock.sendall(chunk)
                sent += len(block)
        except OSError:
            pass  # the agent hung up: what it refused to read
        return sent

    return behaviour


def trickle(*, seconds: float, every: float = 0.2) -> Behaviour:
    """A 1 MiB answer that sends one byte every ``every`` seconds, for ``seconds`` (then hangs up)."""

    def behaviour(sock: socket.socket, orch: Orchestrator) -> int:
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n"
        )
        sent, until = 0, time.monotonic() + seconds
        try:
            while time.monotonic() < until and not orch.stop.wait(every):
                sock.sendall(b"\0")
                sent += 1
        except OSError:
            pass
        return sent

    return behaviour


def giant_header(*, many: bool) -> Behaviour:
    """A status line, then one header line of SENT_CAP bytes (or SENT_CAP bytes of short header lines)."""

    def behaviour(sock: socket.socket, orch: Orchestrator) -> int:
        sock.sendall(b"HTTP/1.1 200 OK\r\n" + (b"" if many else b"X-Pad: "))
        block = b"X-A: b\r\n" * (MiB // 8) if many else b"a" * MiB
        sent = 0
        try:
            while sent < SENT_CAP and not orch.stop.is_set():
                sock.sendall(block)
                sent += len(block)
        except OSError:
            pass
        return sent

    return behaviour


def silence(sock: socket.socket, orch: Orchestrator) -> int:
    """Read the request, answer nothing, hold the connection open."""
    orch.stop.wait(30)
    return 0


def redirect_to(location: Callable[[], str], status: int = 307) -> Behaviour:
    def behaviour(sock: socket.socket, orch: Orchestrator) -> int:
        head = (
            f"HTTP/1.1 {status} Moved\r\nLocation: {location()}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode())
        return 0

    return behaviour


def failure_sink(sock: socket.socket, orch: Orchestrator) -> int:
    return send_json(sock, 200, {"ok": True})


# --- the agent and its task -------------------------------------------------------------------------------

RECIPE = synthetic_recipe(100)
MODEL = encode_tensors(initial_model(RECIPE, 0))


def client_of(orch: Orchestrator, *, max_elapsed_s: float | None = 1.0) -> OrchestratorClient:
    return OrchestratorClient(
        orch.url,
        SITE,
        IdentityKey.generate(),
        insecure=True,
        retry=RetryPolicy(base_s=0.05, max_s=0.2, max_elapsed_s=max_elapsed_s),
    )


def download_task(deadline_s: float) -> Task:
    """A data-free training task whose model must be downloaded (not inline), due in ``deadline_s``."""
    spec = StudySpec(name="s", dataset="none", recipe=RECIPE, rounds=1, train_sites=[SITE])
    return Task(
        task_id="t-1",
        study_id="st-1",
        round=1,
        kind=TaskKind.TRAIN,
        dataset="none",
        recipe=RECIPE,
        model_digest=sha256_hex(MODEL),
        seed=0,
        deadline=datetime.now(UTC) + timedelta(seconds=deadline_s),
        spec=spec,
    )


def agent_of(orch: Orchestrator) -> SiteAgent:
    client = client_of(orch, max_elapsed_s=None)
    settings = AgentSettings(
        orchestrator_url=orch.url, site=SITE, identity=IdentityKey.generate(), insecure=True
    )
    return SiteAgent(settings, client=client)


def posted(orch: Orchestrator, suffix: str) -> list[str]:
    return [target for method, target, _ in orch.requests if method == "POST" and target.endswith(suffix)]


# --- (1) enormous answers: memory and disk ------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("declared", [True, False], ids=["declared-2^40", "chunked-endless"])
def test_an_enormous_model_answer_is_not_read_beyond_the_models_size(serve, declared):
    orch = serve(
        {"/api/v1/agent/models/": zeros_forever(declared=declared), "/api/v1/agent/tasks/": failure_sink}
    )
    site = agent_of(orch)
    try:
        site.handle(download_task(deadline_s=3))
    finally:
        site.client.close()
    assert any("/api/v1/agent/models/" in target for _, target, _ in orch.requests), "not requested"
    assert max(orch.sent, default=0) < READ_BOUND, (
        f"the agent read {max(orch.sent) // MiB} MiB of a {len(MODEL)}-byte model"
    )
    assert posted(orch, "/result") == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("declared", [True, False], ids=["declared-2^40", "chunked-endless"])
def test_an_enormous_poll_answer_is_not_read_whole(serve, declared):
    orch = serve({"/api/v1/agent/tasks/next": zeros_forever(declared=declared)})
    client = client_of(orch, max_elapsed_s=1.0)
    try:
        with pytest.raises(Exception):  # noqa: B017 - refused somehow; what matters is how much was read
            client.next_task(0.1)
    finally:
        client.close()
    assert any("/api/v1/agent/tasks/next" in target for _, target, _ in orch.requests)
    assert max(orch.sent, default=0) < READ_BOUND, (
        f"the agent read {max(orch.sent) // MiB} MiB of one poll answer"
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("many", [False, True], ids=["one-64MiB-header", "8M-header-lines"])
def test_a_giant_response_header_is_refused_after_a_bounded_read_and_the_poll_is_retried(serve, many):
    orch = serve({"/api/v1/agent/tasks/next": giant_header(many=many)})
    client = client_of(orch, max_elapsed_s=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailableError):
            client.next_task(0.1)
    finally:
        client.close()
    assert time.monotonic() - started < 10
    assert len(orch.sent) >= 2  # retried, not given up on the first answer
    assert max(orch.sent) < READ_BOUND


# --- (4) answers that never end or never come ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_model_download_that_never_ends_is_abandoned_by_the_tasks_deadline(serve):
    orch = serve({"/api/v1/agent/models/": trickle(seconds=14), "/api/v1/agent/tasks/": failure_sink})
    site = agent_of(orch)
    started = time.monotonic()
    try:
        site.handle(download_task(deadline_s=2))
    finally:
        site.client.close()
    took = time.monotonic() - started
    assert took < 8, f"the agent spent {took:.1f} s on a download due in 2 s"
    assert posted(orch, "/result") == []


@pytest.mark.timeout(60)
def test_a_poll_that_is_never_answered_times_out_and_is_retried(serve):
    orch = serve({"/api/v1/agent/tasks/next": silence})
    client = client_of(orch, max_elapsed_s=1.0)
    client.LONG_POLL_GRACE_S = 2.0  # 15 s in the agent; the same rule, sooner
    started = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailableError, match="ReadTimeout"):
            client.next_task(0.2)  # read timeout: the long-poll wait + the grace
    finally:
        client.close()
    assert time.monotonic() - started < 6


# --- (5) a redirect to another host ----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_to_another_host_is_not_followed_and_the_token_stays_home(serve, status):
    elsewhere = serve({"/": failure_sink})
    orch = serve(
        {
            "/api/v1/agent/tasks/next": redirect_to(
                lambda: f"{elsewhere.url}/api/v1/agent/tasks/next", status
            ),
            "/api/v1/agent/models/": redirect_to(lambda: f"{elsewhere.url}/model.bin", status),
            "/api/v1/agent/tasks/": failure_sink,
        }
    )
    client = client_of(orch, max_elapsed_s=1.0)
    try:
        with pytest.raises(Exception):  # noqa: B017 - an answer that is no task; see the survival test
            client.next_task(0.1)
    finally:
        client.close()
    site = agent_of(orch)
    try:
        site.handle(download_task(deadline_s=5))
    finally:
        site.client.close()
    assert elsewhere.requests == []
    assert len(posted(orch, "/t-1/failure")) == 1  # the empty 3xx body fails its digest: invalid_task
    assert posted(orch, "/result") == []


# --- answers the agent cannot parse: it must go on polling --------------------------------------------------


def _task_json() -> dict[str, object]:
    return json.loads(download_task(deadline_s=60).model_dump_json())


BAD_POLLS: dict[str, Callable[[], httpx.Response]] = {
    "html": lambda: httpx.Response(200, content=b"<html>maintenance</html>"),
    "truncated-json": lambda: httpx.Response(200, content=b'{"task": {"task_id": '),
    "unknown-field": lambda: httpx.Response(200, json={"task": {**_task_json(), "run_this": "rm -rf /"}}),
    "wrong-type": lambda: httpx.Response(200, json={"task": {**_task_json(), "round": "one"}}),
    "json-null": lambda: httpx.Response(200, content=b"null"),
    "redirect": lambda: httpx.Response(302, headers={"Location": "https://elsewhere.test/"}),
}


def scripted_orchestrator(bad: Callable[[], httpx.Response], *, approvals_bad: bool = False):
    polls: list[int] = []
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/challenge"):
            return httpx.Response(200, json={"challenge": "ab" * 16, "expires_at": soon})
        if path.endswith("/token"):
            return httpx.Response(200, json={"access_token": "t", "expires_at": soon, "role": "site"})
        if path.endswith("/approvals"):
            return bad() if approvals_bad else httpx.Response(200, json={"specs": []})
        if path.endswith("/tasks/next"):
            polls.append(1)
            return (
                bad() if not approvals_bad and len(polls) == 1 else httpx.Response(200, json={"task": None})
            )
        return httpx.Response(404, json={"error": "not_found"})

    return handler, polls


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", sorted(BAD_POLLS))
def test_the_agent_goes_on_polling_after_a_poll_answer_it_cannot_parse(bad):
    handler, polls = scripted_orchestrator(BAD_POLLS[bad])
    key = IdentityKey.generate()
    client = OrchestratorClient(
        "https://orchestrator.test",
        SITE,
        key,
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(base_s=0.01, max_s=0.05),
    )
    settings = AgentSettings(
        orchestrator_url="https://orchestrator.test", site=SITE, identity=key, poll_wait_s=0.01
    )
    site = SiteAgent(settings, client=client)
    try:
        raised = run_until_polled(site, polls)
    finally:
        client.close()
    assert raised is None, f"the agent stopped: {type(raised).__name__}: {raised}"
    assert len(polls) >= 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", ["html", "truncated-json", "json-null"])
def test_the_agent_goes_on_polling_after_an_approvals_answer_it_cannot_parse(tmp_path, bad):
    handler, polls = scripted_orchestrator(BAD_POLLS[bad], approvals_bad=True)
    home = make_home(tmp_path / "site", SITE)
    client = OrchestratorClient(
        "https://orchestrator.test",
        SITE,
        home.identity(),
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(base_s=0.01, max_s=0.05),
    )
    settings = AgentSettings(
        orchestrator_url="https://orchestrator.test",
        site=SITE,
        identity=home.identity(),
        poll_wait_s=0.01,
        home=home.root,
    )
    site = SiteAgent(settings, client=client)
    try:
        raised = run_until_polled(site, polls, times=1)
    finally:
        if site._approvals is not None:
            site._approvals.close()
        client.close()
    assert raised is None, f"the agent stopped: {type(raised).__name__}: {raised}"
    assert len(polls) >= 1


def test_the_control_a_well_formed_empty_poll_keeps_the_agent_polling():
    handler, polls = scripted_orchestrator(lambda: httpx.Response(200, json={"task": None}))
    key = IdentityKey.generate()
    client = OrchestratorClient(
        "https://orchestrator.test", SITE, key, transport=httpx.MockTransport(handler)
    )
    settings = AgentSettings(
        orchestrator_url="https://orchestrator.test", site=SITE, identity=key, poll_wait_s=0.01
    )
    site = SiteAgent(settings, client=client)
    try:
        assert run_until_polled(site, polls) is None
    finally:
        client.close()
    assert len(polls) >= 3


# --- (1b) a collective session's answers -------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("declared", [True, False], ids=["declared-2^40", "chunked-endless"])
def test_an_enormous_collective_answer_fails_the_session_without_being_read(serve, declared, monkeypatch):
    # the relay answers a secure sum: the site would allocate the declared length, or read without end
    from fedhealth.agent import _collective
    from fedhealth.agent._collective import SessionChannel
    from fedhealth.secagg import SessionFailedError

    monkeypatch.setattr(_collective, "MAX_RESULT_BYTES", 4 * MiB)  # the bound, scaled to the test
    orch = serve({"/api/v1/agent/tasks/t-1/collective/": zeros_forever(declared=declared)})
    client = client_of(orch, max_elapsed_s=1.0)
    channel = SessionChannel(client, task_id="t-1", attempt="a1")
    try:
        with pytest.raises(SessionFailedError, match="relay"):
            channel.call(1, b"\0" * 64, wait=0.1, deadline=time.monotonic() + 5)
    finally:
        channel.close()
        client.close()
    assert any("/collective/1" in target for _, target, _ in orch.requests)
    assert max(orch.sent, default=0) < READ_BOUND


def trickled_head(*, seconds: float, every: float = 0.1) -> Behaviour:
    """A status line, then one byte of a header every ``every`` seconds for ``seconds`` (then hangs up)."""

    def behaviour(sock: socket.socket, orch: Orchestrator) -> int:
        sock.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        sent, until = 0, time.monotonic() + seconds
        try:
            while time.monotonic() < until and not orch.stop.wait(every):
                sock.sendall(b"a")
                sent += 1
        except OSError:
            pass  # the site hung up
        return sent

    return behaviour


@pytest.mark.timeout(60)
@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_collective_answer_that_trickles_is_cut_off_when_due_and_the_call_gives_up_at_its_deadline(
    serve, part, monkeypatch
):
    # each read gets a byte well inside the socket's timeout: only a deadline for the whole answer ends it
    from fedhealth.agent import _collective
    from fedhealth.agent._collective import SessionChannel

    monkeypatch.setattr(_collective._CallWatch, "TICK_S", 0.1)
    lying = trickled_head(seconds=30) if part == "headers" else trickle(seconds=30, every=0.1)
    orch = serve({"/api/v1/agent/tasks/t-1/collective/": lying})
    client = client_of(orch, max_elapsed_s=1.0)
    channel = SessionChannel(client, task_id="t-1", attempt="a1")
    started = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailableError, match="still arriving"):
            channel.call(1, b"\0" * 64, wait=0.1, deadline=time.monotonic() + 2)
    finally:
        channel.close()
        client.close()
    assert time.monotonic() - started < 5, "the call outlived its deadline"
    assert any("/collective/1" in target for _, target, _ in orch.requests)
