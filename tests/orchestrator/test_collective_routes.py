"""The collective routes and their session driver in one process (ASGI, no sockets): who may call, re-sent
calls that change nothing, results by long-poll, and a lost participant failing the session with its name.
The real services over HTTPS are in tests/e2e/test_collective_sessions.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
from starlette.applications import Starlette

from fedhealth.crypto import Audience, IdentityKey, TokenClaims
from fedhealth.orchestrator._auth import Principal
from fedhealth.orchestrator._collective import CollectiveSessions, collective_router
from fedhealth.orchestrator._limits import PRINCIPAL
from fedhealth.protocol import SESSION_HEADER, RecipeSpec, Role, SecureAggregationSpec, StudySpec
from fedhealth.secagg import CollectiveSite, SessionFailure

SITES = ["site-a", "site-b", "site-c"]
KEYS = {s: IdentityKey.generate() for s in SITES}
TASKS = {f"tk-{s[-1]}": s for s in SITES}


def _spec(timeout_s: float = 30.0) -> StudySpec:
    return StudySpec(
        name="collective",
        dataset="none",
        recipe=RecipeSpec(name="collective-probe", params={"size": 4}),
        rounds=1,
        train_sites=SITES,
        secure_aggregation=SecureAggregationSpec(
            site_keys={s: k.public().fingerprint for s, k in KEYS.items()}, stage_timeout_s=timeout_s
        ),
    )


class _Harness:
    """The routes behind a stand-in for the request gate (the test names the caller in a header)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.sessions = CollectiveSessions()
        self.failed: list[str] = []
        self.done: list[str] = []
        self.driver = self.sessions.start(
            round_id="rd-1",
            study_id="st-1",
            number=1,
            spec=_spec(timeout_s),
            tasks=TASKS,
            identities={s: k.public().raw.hex() for s, k in KEYS.items()},
            on_done=self.done.append,
            on_failed=lambda rid, reason: self.failed.append(reason),
        )
        identities = {s: k.public() for s, k in KEYS.items()}
        self.sites = {s: CollectiveSite(self.driver.config, s, KEYS[s], identities) for s in SITES}
        app = Starlette(routes=collective_router().routes)
        app.state.services = SimpleNamespace(
            engine=SimpleNamespace(collective=self.sessions), settings=SimpleNamespace(max_wait_s=60.0)
        )

        async def gate(scope: dict[str, Any], receive: Callable[..., Awaitable[Any]], send: Any) -> None:
            caller = dict(scope["headers"]).get(b"x-test-site", b"").decode()
            now = datetime.now(UTC)
            claims = TokenClaims(
                subject=caller,
                role="site",
                audience=Audience.AGENT,
                issued_at=now,
                expires_at=now + timedelta(minutes=5),
                token_id="t",
            )
            scope.setdefault("state", {})[PRINCIPAL] = Principal(name=caller, role=Role.SITE, claims=claims)
            await app(scope, receive, send)

        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://orchestrator")

    def task_of(self, site: str) -> str:
        return next(t for t, s in TASKS.items() if s == site)

    async def post(
        self,
        site: str,
        index: int,
        body: bytes,
        *,
        wait: float = 5.0,
        task: str | None = None,
        **headers: str,
    ) -> httpx.Response:
        return await self.http.post(
            f"/api/v1/agent/tasks/{task or self.task_of(site)}/collective/{index}",
            params={"wait": wait},
            content=body,
            headers={"x-test-site": site, SESSION_HEADER: self.driver.config.attempt, **headers},
        )

    async def get(self, site: str, index: int, wait: float = 5.0) -> httpx.Response:
        return await self.http.get(
            f"/api/v1/agent/tasks/{self.task_of(site)}/collective/{index}",
            params={"wait": wait},
            headers={"x-test-site": site, SESSION_HEADER: self.driver.config.attempt},
        )

    async def set_up(self) -> None:
        answers = await asyncio.gather(*(self.post(s, 0, self.sites[s].advertise()) for s in SITES))
        for site, answer in zip(SITES, answers, strict=True):
            assert answer.status_code == 200, answer.text
            self.sites[site].establish(answer.content)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_every_site_gets_the_exact_sum_in_the_answer_to_its_call():
    async def main() -> None:
        h = _Harness()
        await h.set_up()
        values = {s: np.full(4, float(i) + 0.5) for i, s in enumerate(SITES)}
        bodies = {s: h.sites[s].prepare_sum(values[s]) for s in SITES}
        answers = await asyncio.gather(*(h.post(s, 1, bodies[s]) for s in SITES))
        for site, answer in zip(SITES, answers, strict=True):
            assert answer.status_code == 200
            assert h.sites[site].complete_sum(answer.content).tolist() == [4.5] * 4
        assert h.driver.relay.calls == 1

    run(main)


def test_a_resent_call_changes_nothing_even_after_its_body_became_the_running_sum():
    async def main() -> None:
        h = _Harness()
        await h.set_up()
        values = {s: np.arange(4, dtype=np.float64) * (i + 1) for i, s in enumerate(SITES)}
        bodies = {s: bytes(h.sites[s].prepare_sum(values[s])) for s in SITES}
        first = await h.post("site-a", 1, bodies["site-a"], wait=0)  # taken as the running sum
        assert first.status_code == 204
        again = await h.post("site-a", 1, bodies["site-b"], wait=0)  # a re-send (with other bytes even)
        assert again.status_code == 204
        answers = await asyncio.gather(
            h.post("site-b", 1, bodies["site-b"]), h.post("site-c", 1, bodies["site-c"])
        )
        late = await h.get("site-a", 1)
        resent_after = await h.post("site-a", 1, bodies["site-a"])  # the response was lost: send again
        for answer in (*answers, late, resent_after):
            assert answer.status_code == 200
            assert answer.content == answers[0].content
        assert h.sites["site-a"].complete_sum(late.content).tolist() == [0.0, 6.0, 12.0, 18.0]

    run(main)


def test_only_the_tasks_own_site_in_the_current_attempt_may_call():
    async def main() -> None:
        h = _Harness()
        body = h.sites["site-a"].advertise()
        other = await h.post("site-b", 0, body, task=h.task_of("site-a"))
        assert other.status_code == 403
        unknown = await h.post("site-a", 0, body, task="tk-zz")
        assert unknown.status_code == 410
        stale = await h.post("site-a", 0, body, **{SESSION_HEADER: "an-earlier-attempt"})
        assert stale.status_code == 410
        assert stale.json()["detail"] == "the session restarted"
        bad_wait = await h.post("site-a", 0, body, wait=99)
        assert bad_wait.status_code == 422
        assert h.driver.relay.missing() == SITES  # none of these reached the relay

    run(main)


def test_a_participant_that_does_not_call_in_time_fails_the_session_with_its_name():
    async def main() -> None:
        h = _Harness(timeout_s=0.3)
        await h.set_up()
        bodies = {s: h.sites[s].prepare_sum(np.ones(4)) for s in ("site-a", "site-b")}
        answers = await asyncio.gather(*(h.post(s, 1, bodies[s], wait=5) for s in bodies))
        for answer in answers:
            assert answer.status_code == 410
            assert "site-c did not take part in collective call 1 within 0.3 s" in answer.json()["detail"]
        assert h.failed == [answers[0].json()["detail"]]  # the engine heard it once
        late = await h.post("site-c", 1, h.sites["site-c"].prepare_sum(np.ones(4)))
        assert late.status_code == 410  # nothing is taken after the failure

    run(main)


def test_a_malformed_or_divergent_call_fails_the_session():
    async def main() -> None:
        h = _Harness()
        await h.set_up()
        ok = await h.post("site-a", 1, h.sites["site-a"].prepare_sum(np.ones(4)), wait=0)
        assert ok.status_code == 204
        wrong = await h.post("site-b", 1, h.sites["site-b"].prepare_sum(np.ones(5)), wait=0)
        assert wrong.status_code == 410
        assert "site-b sums 5 values, others 4" in wrong.json()["detail"]
        assert len(h.failed) == 1

    run(main)


def test_no_sum_over_fewer_than_every_participant_is_ever_answered():
    async def main() -> None:
        h = _Harness(timeout_s=0.2)
        await h.set_up()
        for site in ("site-a", "site-b"):
            sent = await h.post(site, 1, h.sites[site].prepare_sum(np.full(4, 2.0)), wait=0)
            assert sent.status_code == 204
        polled = await h.get("site-a", 1, wait=1)
        assert polled.status_code == 410  # the session failed; it did not answer with the sum of two
        assert h.driver.relay.failure is not None
        assert h.driver.relay.missing() == SITES  # what was gathered for call 1 is gone

    run(main)


def test_a_closing_call_sent_again_after_the_session_ended_gets_the_same_answer():
    async def main() -> None:
        h = _Harness()
        await h.set_up()
        bodies = {s: h.sites[s].prepare_end() for s in SITES}
        answers = await asyncio.gather(*(h.post(s, 1, bodies[s]) for s in SITES))
        assert {a.status_code for a in answers} == {200}
        assert h.done == ["rd-1"]
        h.sessions.discard("rd-1", "the session is complete")  # what the engine does next
        again = await h.post("site-b", 1, bodies["site-b"])  # its answer was lost on the way
        assert again.status_code == 200
        assert again.content == answers[1].content
        h.sites["site-b"].complete_end(again.content)
        other = await h.post("site-b", 7, bodies["site-b"])
        assert other.status_code == 409

    run(main)


def test_a_late_call_to_a_failed_session_gets_its_reason():
    async def main() -> None:
        h = _Harness()
        await h.set_up()
        h.driver.fail(SessionFailure.SITE_LOST, "site-c's task ended (dataset_unavailable)")
        h.sessions.discard("rd-1", "failed")
        late = await h.post("site-a", 1, h.sites["site-a"].prepare_sum(np.ones(2)))
        assert late.status_code == 410
        assert "site-c's task ended" in late.json()["detail"]

    run(main)


def test_a_participant_revoked_or_re_keyed_fails_the_session_for_everyone_at_once():
    # docs/security.md, Sites item 4: the revoke and rotate routes call OrchestratorService.site_locked_out;
    # the site's calls would be refused from then on, so the others are not left waiting for its next one
    async def main() -> None:
        h = _Harness(timeout_s=30.0)
        await h.set_up()
        bodies = {s: h.sites[s].prepare_sum(np.ones(4)) for s in ("site-a", "site-b")}
        waiting = [asyncio.ensure_future(h.post(s, 1, bodies[s], wait=20)) for s in bodies]
        await asyncio.sleep(0.2)
        h.sessions.site_locked_out("site-z")  # the control: a site of no session changes nothing
        await asyncio.sleep(0.2)
        assert not any(w.done() for w in waiting)
        assert h.failed == []
        started = asyncio.get_running_loop().time()
        h.sessions.site_locked_out("site-c")
        answers = await asyncio.gather(*waiting)
        assert asyncio.get_running_loop().time() - started < 5  # not at the call's 30 s deadline
        for answer in answers:
            assert answer.status_code == 410
            assert "site-c was revoked or re-keyed during the session" in answer.json()["detail"]
        assert h.failed == [answers[0].json()["detail"]]  # the engine heard it once
        late = await h.post("site-c", 1, h.sites["site-c"].prepare_sum(np.ones(4)))
        assert late.status_code == 410

    run(main)
