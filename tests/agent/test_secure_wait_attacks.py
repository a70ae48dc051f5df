"""A malicious orchestrator that controls time inside a secure round and a collective session.

The site's waits there come from what the orchestrator sends: the task's ``deadline`` (how long the site
long-polls a SecAgg+ stage, or a collective call, and how long it retries them) and a 429's ``Retry-After``
(how long it pauses). The steward approved the spec, so its ``round_deadline_s`` (and ``stage_timeout_s``,
which only the orchestrator's stage and call timers use) bound an honest round; a deadline in the year 9999
must not hold the site for longer than two of those round periods, and no header may crash the site's
session, or its poll loop, with a ValueError.

Nothing here sleeps for time to pass: the site's clock is a fake one that the scripted orchestrator moves on
by each long poll's ``wait``, and the tests assert the waits and deadlines the site computed."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import numpy as np
import pytest

import fedhealth.agent._client as client_module
import fedhealth.agent._collective as collective_module
import fedhealth.agent._secure as secure_module
from fedhealth.agent import OrchestratorClient, RetryPolicy
from fedhealth.agent._client import SecureRoundGone
from fedhealth.agent._collective import HttpCollectives, SessionChannel, check_collective_session
from fedhealth.agent._secure import PeerPins, UnmaskRecord, check_secure_round, run_secure_exchange
from fedhealth.crypto import IdentityKey
from fedhealth.orchestrator._secure import round_config
from fedhealth.protocol import (
    CollectiveSessionInfo,
    RecipeSpec,
    SecureAggregationSpec,
    SecureRoundInfo,
    StudySpec,
    Task,
    TaskKind,
)
from fedhealth.secagg import KeyReuseGuard, SessionFailedError, SessionFailure
from support import synthetic_recipe

SITES = ["site-a", "site-b", "site-c", "site-d"]
ME = "site-b"
KEYS = {s: IdentityKey.generate() for s in SITES}
ROUND_S = 60.0  # the approved round period (round_deadline_s)
POLL_S = 25.0  # the site's own long-poll wait (AgentSettings.poll_wait_s)
FAR_WEST = timezone(-timedelta(hours=23, minutes=59))
YEAR_9999 = [datetime.max.replace(tzinfo=UTC), datetime.max.replace(tzinfo=FAR_WEST)]
YEAR_9999_IDS = ["9999-12-31Z", "9999-12-31-23:59"]
GIVE_UP_AFTER = 1000  # calls: far more than two round periods of long polls; the old code never stopped


class Clock:
    """The site's wall clock, moved on only by the scripted orchestrator (each long poll takes its wait)."""

    def __init__(self) -> None:
        self.start = datetime.now(UTC)
        self.elapsed = 0.0

    def advance(self, seconds: float) -> None:
        self.elapsed += seconds

    def install(self, monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
        clock = self

        class FakeDatetime(datetime):
            @classmethod
            def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
                return clock.start + timedelta(seconds=clock.elapsed)

        monkeypatch.setattr(module, "datetime", FakeDatetime)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    c.install(monkeypatch, secure_module)
    c.install(monkeypatch, collective_module)
    return c


def _wire(t: Task) -> Task:
    """The task as the agent's client parses it from the orchestrator's answer."""
    return Task.model_validate_json(t.model_dump_json())


# --- a secure round (SecAgg+ stages) -----------------------------------------------------------------------


def _secure_task(deadline: datetime) -> Task:
    spec = StudySpec(
        name="secure-wait",
        dataset="none",
        recipe=synthetic_recipe(10),
        rounds=2,
        train_sites=SITES,
        min_sites=2,
        round_deadline_s=ROUND_S,
        secure_aggregation=SecureAggregationSpec(site_keys={s: KEYS[s].public().fingerprint for s in SITES}),
    )
    config = round_config(spec, TaskKind.TRAIN, study_id="study-1", number=1, attempt="a1", sites=SITES)
    return _wire(
        Task(
            task_id="t-1",
            study_id="study-1",
            round=1,
            kind=TaskKind.TRAIN,
            dataset="none",
            recipe=spec.recipe,
            model_digest="0" * 64,
            seed=0,
            deadline=deadline,
            spec=spec,
            secure_round=SecureRoundInfo(
                config=config.to_json(),
                peer_keys={s: KEYS[s].public().raw.hex() for s in SITES},
                attempt="a1",
            ),
        )
    )


class StallingStages:
    """An orchestrator that takes each stage's message and never closes the stage: every long poll runs its
    whole ``wait`` (on the fake clock) and answers 204. Keeps the wait and retry budget of every request."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.requests: list[tuple[str, str, float, float | None]] = []  # (what, stage, wait, max_elapsed_s)

    def _took(self, what: str, stage: str, wait: float, max_elapsed_s: float | None) -> None:
        self.requests.append((what, stage, wait, max_elapsed_s))
        if len(self.requests) > GIVE_UP_AFTER:
            raise AssertionError(f"the site long-polled {GIVE_UP_AFTER} times ({self.clock.elapsed:.0f} s)")
        self.clock.advance(wait)

    def secagg_send(
        self,
        task_id: str,
        stage: str,
        body: bytes,
        *,
        wait: float = 0.0,
        attestation: object = None,
        max_elapsed_s: float | None = None,
    ) -> bytes | None:
        self._took("send", stage, wait, max_elapsed_s)
        return None

    def secagg_receive(
        self, task_id: str, stage: str, *, wait: float, max_elapsed_s: float | None = None
    ) -> bytes | None:
        self._took("receive", stage, wait, max_elapsed_s)
        return None


def _stall_secure_round(task: Task, clock: Clock) -> StallingStages:
    checked = check_secure_round(task, ME, KEYS[ME], PeerPins(None))
    assert checked is not None
    orchestrator = StallingStages(clock)
    with pytest.raises(SecureRoundGone, match="deadline passed"):
        run_secure_exchange(
            orchestrator,  # type: ignore[arg-type]
            task,
            checked,
            site=ME,
            identity=KEYS[ME],
            guard=KeyReuseGuard(),
            record=UnmaskRecord(None),
            vector=np.zeros(checked.config.vector_length, dtype=np.uint64),
            poll_wait_s=POLL_S,
        )
    return orchestrator


@pytest.mark.parametrize("deadline", YEAR_9999, ids=YEAR_9999_IDS)
def test_a_secure_stage_never_closed_under_a_deadline_in_the_year_9999_is_left_after_two_round_periods(
    clock, deadline
):
    orchestrator = _stall_secure_round(_secure_task(deadline), clock)
    # the site waited after its advertise_keys message, and gave the round up at two approved round periods
    assert {stage for _, stage, _, _ in orchestrator.requests} == {"advertise_keys"}
    assert clock.elapsed <= 2 * ROUND_S + POLL_S
    # no single request (its long poll, its retries) was allowed more than that either
    for _, _, wait, max_elapsed_s in orchestrator.requests:
        assert wait <= POLL_S
        assert max_elapsed_s is not None
        assert max_elapsed_s <= 2 * ROUND_S


def test_the_control_an_honest_deadline_inside_two_round_periods_is_kept_as_it_is(clock):
    task = _secure_task(clock.start + timedelta(seconds=40))
    orchestrator = _stall_secure_round(task, clock)
    # the cap shortens nothing an honest orchestrator sends: the site waited until its deadline, no longer
    assert 40 <= clock.elapsed <= 40 + POLL_S
    assert orchestrator.requests[0][3] == pytest.approx(40.0)


def test_a_secure_round_whose_deadline_is_at_the_dawn_of_time_is_left_not_a_crash(clock):
    task = _secure_task(datetime.min.replace(tzinfo=timezone(timedelta(hours=23, minutes=59))))
    orchestrator = _stall_secure_round(task, clock)
    assert len(orchestrator.requests) <= 2
    assert clock.elapsed <= 2.0


# --- a collective session (relayed calls) ----------------------------------------------------------------


def _collective_task(deadline: datetime) -> Task:
    spec = StudySpec(
        name="collective-wait",
        dataset="none",
        recipe=RecipeSpec(name="collective-probe", params={"size": 8}),
        rounds=1,
        train_sites=SITES,
        round_deadline_s=ROUND_S,
        secure_aggregation=SecureAggregationSpec(site_keys={s: KEYS[s].public().fingerprint for s in SITES}),
    )
    return _wire(
        Task(
            task_id="t-c",
            study_id="study-c",
            round=1,
            kind=TaskKind.COLLECTIVE,
            dataset="none",
            recipe=spec.recipe,
            model_digest="0" * 64,
            seed=0,
            deadline=deadline,
            spec=spec,
            collective=CollectiveSessionInfo(
                sites=SITES, peer_keys={s: KEYS[s].public().raw.hex() for s in SITES}, attempt="attempt-1"
            ),
        )
    )


class StallingRelay:
    """Stands in for the session's channel: every call long-polls its whole ``wait`` (on the fake clock) and
    is never answered. Keeps each call's wait and how far off its deadline (``time.monotonic()``) was."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[tuple[int, float, float]] = []  # (index, wait, seconds to the call's deadline)

    def call(
        self,
        index: int,
        body: bytes | memoryview | None,
        *,
        wait: float,
        deadline: float,
        headers: dict[str, str] | None = None,
    ) -> memoryview | None:
        self.calls.append((index, wait, deadline - time.monotonic()))
        if len(self.calls) > GIVE_UP_AFTER:
            raise AssertionError(f"the site long-polled {GIVE_UP_AFTER} times ({self.clock.elapsed:.0f} s)")
        self.clock.advance(wait)
        return None

    def close(self) -> None:
        pass


def _stall_session(task: Task, clock: Clock) -> StallingRelay:
    checked = check_collective_session(task, ME, KEYS[ME], PeerPins(None))
    # a client of the network kind (no test transport); it never connects: the relay below stands in
    client = OrchestratorClient("http://127.0.0.1:9", ME, KEYS[ME], insecure=True)
    relay = StallingRelay(clock)
    try:
        session = HttpCollectives(client, task, checked, site=ME, identity=KEYS[ME], poll_wait_s=POLL_S)
        session._channel = relay  # type: ignore[assignment]
        with pytest.raises(SessionFailedError) as failed:
            session.open()
        assert failed.value.reason is SessionFailure.ABORTED
        session.release()
    finally:
        client.close()
    return relay


@pytest.mark.parametrize("deadline", YEAR_9999, ids=YEAR_9999_IDS)
def test_a_collective_call_never_answered_under_a_deadline_in_the_year_9999_is_left_after_two_round_periods(
    clock, deadline
):
    relay = _stall_session(_collective_task(deadline), clock)
    assert relay.calls, "the site never made its set-up call"
    # the set-up call was long-polled until two approved round periods had passed, then the session ended
    assert clock.elapsed <= 2 * ROUND_S + POLL_S
    for _, wait, to_deadline in relay.calls:
        assert wait <= POLL_S
        # the call's own deadline (it bounds the call's retries and its answer) is as near
        assert to_deadline <= 2 * ROUND_S + 1.0


def test_the_control_an_honest_session_deadline_is_kept_as_it_is(clock):
    relay = _stall_session(_collective_task(clock.start + timedelta(seconds=40)), clock)
    assert 40 <= clock.elapsed <= 40 + POLL_S
    assert relay.calls[0][2] == pytest.approx(40.0, abs=1.0)


def test_a_collective_session_whose_deadline_is_at_the_dawn_of_time_ends_before_any_call(clock):
    task = _collective_task(datetime.min.replace(tzinfo=timezone(timedelta(hours=23, minutes=59))))
    relay = _stall_session(task, clock)
    assert relay.calls == []


# --- Retry-After: a pause the orchestrator asks for ---------------------------------------------------------

# Each of these passes str.isdigit() but is no number float() reads ("²": U+00B2, one latin-1 byte), or is
# far too long, or is no number at all: none may pause the site past its retry policy, nor raise.
HOSTILE_RETRY_AFTER = ["²", "1²", "³.5", "1000000000", "9" * 400, "-5", "nan", "inf", "1e999", ""]


@pytest.mark.parametrize("retry_after", HOSTILE_RETRY_AFTER)
def test_a_secure_stage_rate_limited_with_any_retry_after_is_retried_within_the_policy(
    monkeypatch, retry_after
):
    pauses: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", pauses.append)
    answers = [
        httpx.Response(429, headers=[(b"Retry-After", retry_after.encode("latin-1"))], json={"error": "slow"})
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        if request.url.path.endswith("/agent/challenge"):
            return httpx.Response(200, json={"challenge": "ab" * 16, "expires_at": soon})
        if request.url.path.endswith("/agent/token"):
            return httpx.Response(200, json={"access_token": "t", "expires_at": soon, "role": "site"})
        return answers.pop(0) if answers else httpx.Response(200, content=b"the share bundle")

    client = OrchestratorClient(
        "https://orchestrator.test",
        ME,
        KEYS[ME],
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(base_s=0.05, max_s=2.0),
    )
    try:
        got = client.secagg_receive("t-1", "advertise_keys", wait=1.0, max_elapsed_s=30.0)
    finally:
        client.close()
    assert got == b"the share bundle"
    assert len(pauses) == 1
    assert 0 <= pauses[0] <= 2.0


@pytest.mark.parametrize("retry_after", ["²", "1²"])
def test_a_poll_rate_limited_with_a_retry_after_that_is_no_ascii_number_keeps_the_agent_polling(
    monkeypatch, retry_after
):
    # the client's retry is the one a secure stage and a collective call use; on the poll, a ValueError out
    # of it ended `site run`
    pauses: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", pauses.append)
    answers = [
        httpx.Response(429, headers=[(b"Retry-After", retry_after.encode("latin-1"))], json={"error": "slow"})
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        if request.url.path.endswith("/agent/challenge"):
            return httpx.Response(200, json={"challenge": "ab" * 16, "expires_at": soon})
        if request.url.path.endswith("/agent/token"):
            return httpx.Response(200, json={"access_token": "t", "expires_at": soon, "role": "site"})
        return answers.pop(0) if answers else httpx.Response(200, json={"task": None})

    client = OrchestratorClient(
        "https://orchestrator.test",
        ME,
        KEYS[ME],
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(base_s=0.05, max_s=2.0),
    )
    try:
        assert client.next_task(0) is None
    finally:
        client.close()
    assert len(pauses) == 1
    assert pauses[0] <= 2.0


def test_a_secure_stages_answer_with_a_header_byte_over_0x7f_is_read_not_a_crash():
    # any header: the client re-built each answer from the headers' decoded text, which ASCII cannot encode
    def handler(request: httpx.Request) -> httpx.Response:
        soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        if request.url.path.endswith("/agent/challenge"):
            return httpx.Response(200, json={"challenge": "ab" * 16, "expires_at": soon})
        if request.url.path.endswith("/agent/token"):
            return httpx.Response(200, json={"access_token": "t", "expires_at": soon, "role": "site"})
        return httpx.Response(200, headers=[(b"X-Relay", b"caf\xe9")], content=b"the share bundle")

    client = OrchestratorClient(
        "https://orchestrator.test", ME, KEYS[ME], transport=httpx.MockTransport(handler)
    )
    try:
        got = client.secagg_receive("t-1", "advertise_keys", wait=1.0, max_elapsed_s=30.0)
    finally:
        client.close()
    assert got == b"the share bundle"


# --- a collective call's relay on a local socket ----------------------------------------------------------


def _read_head(sock: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return ""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    length = next(
        (
            int(line.split(":", 1)[1])
            for line in text.split("\r\n")
            if line.lower().startswith("content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return text.split(" ", 2)[1] if " " in text else ""


def _answer(sock: socket.socket, status: int, headers: bytes, body: bytes) -> None:
    length = b"" if b"content-length" in headers.lower() else f"Content-Length: {len(body)}\r\n".encode()
    sock.sendall(f"HTTP/1.1 {status} X\r\nConnection: close\r\n".encode() + length + headers + b"\r\n" + body)


@pytest.fixture
def relay_answering() -> Iterator[Any]:
    """A local relay: logs the site in, then answers collective calls with the given raw answers in turn
    (each a status, extra header lines and a body), then with the result ``b"sum"``."""
    servers: list[socketserver.ThreadingTCPServer] = []

    def start(script: list[tuple[int, bytes, bytes]]) -> tuple[str, list[str]]:
        seen: list[str] = []
        soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(10)
                try:
                    target = _read_head(sock)
                    seen.append(target)
                    json_head = b"Content-Type: application/json\r\n"
                    if target.endswith("/agent/challenge"):
                        body = f'{{"challenge": "{"ab" * 16}", "expires_at": "{soon}"}}'.encode()
                        _answer(sock, 200, json_head, body)
                    elif target.endswith("/agent/token"):
                        body = f'{{"access_token": "t", "expires_at": "{soon}", "role": "site"}}'.encode()
                        _answer(sock, 200, json_head, body)
                    elif script:
                        _answer(sock, *script.pop(0))
                    else:
                        _answer(sock, 200, b"", b"sum")
                except OSError:
                    pass

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("answer", "calls"),
    [
        # "²" as the one latin-1 byte http.client reads it from: str.isdigit() says yes, float() raises
        ((429, b"Retry-After: \xb2\r\n", b'{"error": "slow down"}'), 2),
        ((429, b"Retry-After: 1000000000\r\n", b'{"error": "slow down"}'), 2),
        # the result itself, its length declared as "²": read to the end of the answer (the relay closes)
        ((200, b"Content-Length: \xb2\r\n", b"sum"), 1),
    ],
    ids=["retry-after-superscript-two", "retry-after-1e9", "content-length-superscript-two"],
)
def test_a_collective_call_with_a_header_that_is_no_ascii_number_is_retried_not_a_crash(
    relay_answering, answer, calls
):
    url, seen = relay_answering([answer])
    client = OrchestratorClient(url, ME, KEYS[ME], insecure=True, retry=RetryPolicy(base_s=0.01, max_s=0.1))
    pauses: list[float] = []
    backoff = client.rate_limit_backoff

    def recorded(attempt: int, retry_after: str) -> float:
        pauses.append(backoff(attempt, retry_after))
        return pauses[-1]

    client.rate_limit_backoff = recorded  # type: ignore[method-assign]
    channel = SessionChannel(client, task_id="t-c", attempt="attempt-1")
    try:
        result = channel.call(1, b"\0" * 8, wait=0.1, deadline=time.monotonic() + 20)
    finally:
        channel.close()
        client.close()
    assert result is not None
    assert bytes(result) == b"sum"
    assert sum("/collective/1" in target for target in seen) == calls  # the lie, then any retry
    assert all(p <= 0.1 for p in pauses)
