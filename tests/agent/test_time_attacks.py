"""An attacker who controls time against a site agent: a malicious orchestrator choosing the timestamps it
sends (a task's deadline, an access token's expiry), and a site whose clock is far off the orchestrator's.

The agent must answer each with one line (a failure code, or a poll answer that is no task) and go on: no
traceback out of ``handle()`` or ``run()``, no hang, no training past what the steward's approved round
period allows. Clocks here are the orchestrator's timestamps written into the messages; nothing sleeps to
make time pass, and nothing asserts how long a step took."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from site_fixtures import RecordingClient, agent, approve, make_home, task

import fedhealth.agent._agent as agent_module
from fedhealth.agent import AgentSettings, OrchestratorClient, RetryPolicy, SiteAgent
from fedhealth.client import ClientError, OperatorClient
from fedhealth.crypto import IdentityKey
from fedhealth.protocol import FailureCode, StudySpec, Task
from support import logreg_recipe, run_until

SITE = "hospital-a"
FAR_WEST = timezone(-timedelta(hours=23, minutes=59))
FAR_EAST = timezone(timedelta(hours=23, minutes=59))


def _csv(path: Path, rows: int = 60) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 2))
    lines = [f"p{i},{a:.4f},{b:.4f},{int(a + b > 0)}" for i, (a, b) in enumerate(x)]
    path.write_text("patient_id,age,marker,label\n" + "\n".join(lines) + "\n")
    return path


def _spec(epochs: int = 1, batch_size: int = 10, round_deadline_s: float = 60.0) -> StudySpec:
    return StudySpec(
        name=f"time-{epochs}-{round_deadline_s}",
        dataset="cohort",
        recipe=logreg_recipe(2, local_epochs=epochs, batch_size=batch_size, learning_rate=0.01),
        rounds=1,
        train_sites=[SITE],
        round_deadline_s=round_deadline_s,
    )


class TimedClient(RecordingClient):
    """A RecordingClient that also keeps the time each transfer was allowed (``max_elapsed_s``)."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed: list[float | None] = []

    def upload_result(self, task_id: str, body: bytes, *, max_elapsed_s: float | None = None) -> None:
        self.allowed.append(max_elapsed_s)
        super().upload_result(task_id, body, max_elapsed_s=max_elapsed_s)

    def report_failure(self, task_id: str, failure: Any, *, max_elapsed_s: float | None = None) -> None:
        self.allowed.append(max_elapsed_s)
        super().report_failure(task_id, failure, max_elapsed_s=max_elapsed_s)


def _site(tmp_path: Path, *specs: StudySpec) -> tuple[SiteAgent, TimedClient]:
    csv = _csv(tmp_path / "ward.csv")
    home = make_home(tmp_path / "site")
    for spec in specs:
        approve(home, spec)
    site, _ = agent(home, {"cohort": f"file://{csv}?label=label&id=patient_id"})
    client = TimedClient()
    site.client = client  # type: ignore[assignment]
    return site, client


def _wire(t: Task) -> Task:
    """The task as the agent's client parses it from the orchestrator's answer."""
    return Task.model_validate_json(t.model_dump_json())


@contextmanager
def _recorded_training_deadlines() -> Iterator[list[float]]:
    seen: list[float] = []
    real = agent_module.work_deadline

    @contextmanager
    def recording(seconds: float) -> Iterator[None]:
        seen.append(seconds)
        with real(seconds):
            yield

    agent_module.work_deadline = recording  # type: ignore[assignment]
    try:
        yield seen
    finally:
        agent_module.work_deadline = real


# --- the task's deadline ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "deadline",
    [datetime.max.replace(tzinfo=UTC), datetime.max.replace(tzinfo=FAR_WEST)],
    ids=["9999-12-31Z", "9999-12-31-23:59"],
)
def test_a_deadline_in_the_year_9999_is_bounded_by_the_approved_round_period(tmp_path, deadline):
    spec = _spec(round_deadline_s=60.0)
    site, client = _site(tmp_path, spec)
    with _recorded_training_deadlines() as trained_for:
        site.handle(_wire(task(spec).model_copy(update={"deadline": deadline})))
    [result] = client.results  # the round's work is done as for any task
    assert result.metrics.num_samples > 0
    # ... but the site trains, and sends, for no longer than the steward's round period allows: the deadline
    # plus one period of margin, the deadline itself at most two periods away (an honest one is one)
    [seconds] = trained_for
    assert seconds <= 3 * spec.round_deadline_s
    [upload] = client.allowed
    assert upload is not None
    assert upload <= 2 * spec.round_deadline_s


@pytest.mark.timeout(60)
def test_many_epochs_under_a_deadline_in_the_year_9999_stop_at_the_round_period(tmp_path):
    # 10,000 epochs of batches of one row (600,000 steps): minutes, for a round period of 50 ms
    spec = _spec(epochs=10_000, batch_size=1, round_deadline_s=0.05)
    site, client = _site(tmp_path, spec)
    site.handle(_wire(task(spec).model_copy(update={"deadline": datetime.max.replace(tzinfo=UTC)})))
    assert [f.code for f in client.failures] == [FailureCode.DEADLINE_PASSED]
    assert client.results == []


@pytest.mark.parametrize(
    "deadline",
    [
        datetime.min.replace(tzinfo=UTC),
        datetime.min.replace(tzinfo=FAR_EAST),
        datetime(1970, 1, 1, tzinfo=UTC),
    ],
    ids=["0001-01-01Z", "0001-01-01+23:59", "epoch"],
)
def test_a_deadline_at_the_dawn_of_time_is_refused_as_passed_before_any_row_is_read(tmp_path, deadline):
    spec = _spec()
    site, client = _site(tmp_path, spec)
    site._dataset = None  # type: ignore[assignment,method-assign] # opening the dataset would raise here
    site.handle(_wire(task(spec).model_copy(update={"deadline": deadline})))
    assert [f.code for f in client.failures] == [FailureCode.DEADLINE_PASSED]
    assert client.results == []
    [allowed] = client.allowed  # the failure report itself gets a bounded, positive time
    assert allowed is not None
    assert 0 < allowed <= 2 * spec.round_deadline_s


def test_a_deadline_in_another_offset_is_the_same_instant(tmp_path):
    spec = _spec()
    site, client = _site(tmp_path, spec)
    soon = (datetime.now(UTC) + timedelta(minutes=1)).astimezone(timezone(timedelta(hours=14)))
    site.handle(_wire(task(spec).model_copy(update={"deadline": soon})))
    assert len(client.results) == 1
    assert client.failures == []
    # one minute in the past, written as 14 hours ahead's wall time, is still past: refused by its instant
    past = (datetime.now(UTC) - timedelta(minutes=2)).astimezone(timezone(timedelta(hours=14)))
    site.handle(_wire(task(spec, task_id="tk-2").model_copy(update={"deadline": past})))
    assert [f.code for f in client.failures] == [FailureCode.DEADLINE_PASSED]


# --- through the agent's own client and loop ---------------------------------------------------------------


def _orchestrator(
    poll: Callable[[int], httpx.Response], expires_at: str | None = None
) -> tuple[Callable[[httpx.Request], httpx.Response], dict[str, int]]:
    counts = {"polls": 0, "logins": 0, "failures": 0, "results": 0}
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/challenge"):
            return httpx.Response(200, json={"challenge": "ab" * 16, "expires_at": soon})
        if path.endswith("/token"):
            counts["logins"] += 1
            expiry = expires_at or soon
            return httpx.Response(200, json={"access_token": "t", "expires_at": expiry, "role": "site"})
        if path.endswith("/approvals"):
            return httpx.Response(200, json={"specs": []})
        if path.endswith("/tasks/next"):
            counts["polls"] += 1
            return poll(counts["polls"])
        if path.endswith("/failure"):
            counts["failures"] += 1
            return httpx.Response(200, json={"ok": True})
        if path.endswith("/result"):
            counts["results"] += 1
            return httpx.Response(200, json={"ok": True})
        return httpx.Response(404, json={"error": "not_found", "detail": ""})

    return handler, counts


def _agent(handler: Callable[[httpx.Request], httpx.Response], tmp_path: Path) -> SiteAgent:
    key = IdentityKey.generate()
    client = OrchestratorClient(
        "https://orchestrator.test",
        SITE,
        key,
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(base_s=0.001, max_s=0.01),
    )
    settings = AgentSettings(
        orchestrator_url="https://orchestrator.test",
        site=SITE,
        identity=key,
        poll_wait_s=0.01,
        datasets={"cohort": f"file://{_csv(tmp_path / 'ward.csv')}?label=label&id=patient_id"},
    )
    return SiteAgent(settings, client=client)


@pytest.mark.timeout(60)
def test_a_task_whose_deadline_has_no_offset_is_no_task_and_the_agent_polls_on(tmp_path):
    spec = _spec()
    body = json.loads(task(spec).model_dump_json())
    body["deadline"] = (datetime.now(UTC) + timedelta(minutes=5)).replace(tzinfo=None).isoformat()
    assert "+" not in body["deadline"]
    assert "Z" not in body["deadline"]

    def poll(n: int) -> httpx.Response:
        return httpx.Response(200, json={"task": body if n == 1 else None})

    handler, counts = _orchestrator(poll)
    site = _agent(handler, tmp_path)
    try:
        raised = run_until(site, lambda: counts["polls"] >= 3)
    finally:
        site.client.close()
    # a naive deadline cannot be compared with this site's clock: before, the TypeError escaped handle()
    # (and its own failure report) and ended `site run`
    assert raised is None, f"the agent stopped: {type(raised).__name__}: {raised}"
    assert counts["polls"] >= 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "expires_at",
    ["0001-01-01T00:00:00+00:00", "0001-01-01T00:00:00+23:59"],
    ids=["0001-01-01Z", "0001-01-01+23:59"],
)
def test_a_token_expiring_at_the_dawn_of_time_is_renewed_not_a_crash(tmp_path, expires_at):
    handler, counts = _orchestrator(lambda n: httpx.Response(200, json={"task": None}), expires_at)
    site = _agent(handler, tmp_path)
    try:
        raised = run_until(site, lambda: counts["polls"] >= 3)
    finally:
        site.client.close()
    # before, "expiry minus a minute" overflowed: an OverflowError out of every call ended `site run`
    assert raised is None, f"the agent stopped: {type(raised).__name__}: {raised}"
    assert counts["polls"] >= 3
    assert counts["logins"] >= counts["polls"]  # an expired token is renewed before each call


@pytest.mark.timeout(60)
def test_a_token_whose_expiry_has_no_offset_is_not_a_token_and_the_agent_goes_on(tmp_path):
    naive = (datetime.now(UTC) + timedelta(minutes=10)).replace(tzinfo=None).isoformat()
    handler, counts = _orchestrator(lambda n: httpx.Response(200, json={"task": None}), naive)
    site = _agent(handler, tmp_path)
    try:
        raised = run_until(site, lambda: counts["logins"] >= 3)
    finally:
        site.client.close()
    # before, the naive expiry was kept and compared with this site's clock: a TypeError ended `site run`
    assert raised is None, f"the agent stopped: {type(raised).__name__}: {raised}"
    assert counts["logins"] >= 3
    assert counts["polls"] == 0  # no call goes out under a token whose lifetime cannot be read


def _dated_orchestrator(
    now: Callable[[], datetime], date: Callable[[datetime], str]
) -> tuple[Callable[[httpx.Request], httpx.Response], dict[str, int]]:
    """An orchestrator with no task whose clock reads ``now()``: every answer carries ``date(now())`` as its
    ``Date``, and a token lives ten minutes by that clock."""
    counts = {"polls": 0, "logins": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        stamped = now()
        headers = {"date": date(stamped)}
        if request.url.path.endswith("/challenge"):
            expiry = (stamped + timedelta(minutes=1)).isoformat()
            return httpx.Response(200, headers=headers, json={"challenge": "ab" * 16, "expires_at": expiry})
        if request.url.path.endswith("/token"):
            counts["logins"] += 1
            expiry = (stamped + timedelta(minutes=10)).isoformat()
            return httpx.Response(
                200, headers=headers, json={"access_token": "t", "expires_at": expiry, "role": "site"}
            )
        if request.url.path.endswith("/approvals"):
            return httpx.Response(200, headers=headers, json={"specs": []})
        if request.url.path.endswith("/tasks/next"):
            counts["polls"] += 1
            return httpx.Response(200, headers=headers, json={"task": None})
        return httpx.Response(404, headers=headers, json={"error": "not_found", "detail": ""})

    return handler, counts


@pytest.mark.timeout(60)
@pytest.mark.parametrize("site_ahead_h", [1, -1], ids=["site-an-hour-ahead", "site-an-hour-behind"])
def test_a_site_clock_off_by_an_hour_renews_its_token_once_per_lifetime_not_per_call(tmp_path, site_ahead_h):
    """The orchestrator issues ten-minute tokens by its own clock (its answers' ``Date``). A site whose
    clock is ahead used to find each one expired on arrival and logged in before every call, spending the
    login rate limit; a site behind kept a token past its end (until refused). The token's lifetime is
    now what the orchestrator's clock gives it, counted on the site's monotonic clock."""
    orchestrator_now = datetime.now(UTC) - timedelta(hours=site_ahead_h)
    started = time.monotonic()
    handler, counts = _dated_orchestrator(
        lambda: orchestrator_now + timedelta(seconds=time.monotonic() - started),
        lambda stamped: email.utils.format_datetime(stamped, usegmt=True),
    )
    site = _agent(handler, tmp_path)
    try:
        raised = run_until(site, lambda: counts["polls"] >= 5)
        renew_in = site.client._renew_at - time.monotonic()
    finally:
        site.client.close()
    assert raised is None, f"the agent stopped: {type(raised).__name__}: {raised}"
    assert counts["polls"] >= 5
    assert counts["logins"] == 1  # before: one a call with the clock ahead
    # renewed a minute before the ten minutes end (a second for the Date's rounding), not an hour off
    assert 8 * 60 < renew_in <= 9 * 60 + 1


def test_the_control_a_well_formed_task_and_token_work_through_the_loop(tmp_path):
    spec = _spec()
    body = json.loads(task(spec).model_dump_json())

    def poll(n: int) -> httpx.Response:
        return httpx.Response(200, json={"task": body if n == 1 else None})

    handler, counts = _orchestrator(poll)
    site = _agent(handler, tmp_path)
    try:
        raised = run_until(site, lambda: counts["polls"] >= 3)
    finally:
        site.client.close()
    assert raised is None
    assert counts["logins"] == 1  # a token valid for an hour is reused
    # the task reached handle() and was trained (a bare site: no gates) and its update sent
    assert (counts["results"], counts["failures"]) == (1, 0)


@pytest.mark.parametrize("naive", [False, True], ids=["0001-01-01Z", "no-offset"])
def test_the_operator_client_survives_a_token_expiring_at_the_dawn_of_time_or_without_an_offset(naive):
    expiry = "0001-01-01T00:00:00" if naive else "0001-01-01T00:00:00+00:00"
    logins: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/auth/token":
            logins.append(1)
            return httpx.Response(200, json={"access_token": "t", "expires_at": expiry, "role": "admin"})
        return httpx.Response(200, json=[])

    client = OperatorClient(
        "http://orchestrator.test",
        user="admin",
        api_key="k" * 32,
        ca_pem=None,
        insecure=True,
        transport=httpx.MockTransport(handler),
    )
    try:
        if naive:  # an expiry that cannot be compared with this clock is no token answer: one ClientError
            with pytest.raises(ClientError):
                client.request("GET", "/api/v1/sites")
        else:  # before, "expiry minus 30 s" overflowed (an OverflowError out of every command)
            for _ in range(2):
                assert client.request("GET", "/api/v1/sites").json() == []
            assert len(logins) == 2  # an expired token is renewed before each request
    finally:
        client.close()


@pytest.mark.parametrize("operator_ahead_h", [1, -1], ids=["an-hour-ahead", "an-hour-behind"])
def test_the_operator_client_counts_its_token_by_the_orchestrators_clock(operator_ahead_h):
    """An operator's laptop an hour off: its tokens last their fifteen minutes, not zero (a login before
    every request) nor an hour and a quarter (requests under an expired token)."""
    orchestrator_now = datetime.now(UTC) - timedelta(hours=operator_ahead_h)
    logins: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        date = {"date": email.utils.format_datetime(orchestrator_now, usegmt=True)}
        if request.url.path == "/api/v1/auth/token":
            logins.append(1)
            expiry = (orchestrator_now + timedelta(minutes=15)).isoformat()
            return httpx.Response(
                200, headers=date, json={"access_token": "t", "expires_at": expiry, "role": "admin"}
            )
        return httpx.Response(200, headers=date, json=[])

    client = OperatorClient(
        "http://orchestrator.test",
        user="admin",
        api_key="k" * 32,
        ca_pem=None,
        insecure=True,
        transport=httpx.MockTransport(handler),
    )
    try:
        for _ in range(3):
            assert client.request("GET", "/api/v1/sites").json() == []
        renew_in = client._renew_at - time.monotonic()
    finally:
        client.close()
    assert len(logins) == 1
    assert 14 * 60 < renew_in <= 14 * 60 + 31


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "date",
    [
        "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
        "Mon, 01 Jan 2026 00:00:00",
        "Mon, 01 Jan 2026 00:00:00 +9999",
        "Mon, 01 Jan 2026 00:00:00 -0000",
        "yesterday",
    ],
    ids=["year-of-20-digits", "no-zone", "offset-99h", "unknown-offset", "not-a-date"],
)
def test_a_date_the_site_cannot_read_falls_back_to_its_own_clock(tmp_path, date):
    """The token's lifetime reads the answer's Date: one a lying orchestrator made unreadable (a year of
    twenty digits overflowed the parser) is left aside and the site's own clock counts, as before."""
    handler, counts = _dated_orchestrator(lambda: datetime.now(UTC), lambda _: date)
    site = _agent(handler, tmp_path)
    try:
        raised = run_until(site, lambda: counts["polls"] >= 3)
        renew_in = site.client._renew_at - time.monotonic()
    finally:
        site.client.close()
    assert raised is None, f"the agent stopped: {type(raised).__name__}: {raised}"
    assert counts["logins"] == 1
    assert 8 * 60 < renew_in <= 9 * 60
