"""docs/architecture.md against an attacker, in process (handlers as functions of a real service on SQLite, or
the whole ASGI app through starlette's TestClient): what the tests the document cites do not already try.

- "Versions on the wire": a spec is approved by the hash of all of it, so no spec field is ever dropped,
  neither by a reader from a peer that states a newer protocol (a lying or newer orchestrator adding a spec
  field an older site cannot see) nor by a sender for an older peer; every answer states the versions, a
  refusal on the enrollment port and a bug's 500 included; a login whose protocol headers do not meet the
  orchestrator's range (or are not numbers) is a 426 sentence that issues nothing and records nothing; the
  release an agent states at login is what ``fedhealth site list`` prints, so one that is not a version
  (a tab forging a column, a terminal escape) is never recorded.
- "Long-poll": a waiting poll answers the moment its site's task exists, and only its own site's.
- "What a round looks like on the wire": a bad update (non-finite, wrong dtype, shape or names) is refused
  with 422 before it is stored: the task is closed as rejected and no file of it stays in the blob store.
- "Recipes are plug-ins": a study whose recipe params fail is refused with 422 naming every problem as
  ``recipe.params.<field>: <rule>``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

import fedhealth
from fedhealth.core import canonical_json
from fedhealth.crypto import IdentityKey
from fedhealth.governance import spec_hash
from fedhealth.orchestrator import OrchestratorService, OrchestratorSettings, create_app, default_extensions
from fedhealth.orchestrator._blobs import BlobKind
from fedhealth.orchestrator._http import ApiError
from fedhealth.orchestrator._routes_sites import accept_approval
from fedhealth.orchestrator._routes_studies import submit_study
from fedhealth.orchestrator._routes_tasks import accept_result, poll_task
from fedhealth.protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    RESULT_METADATA_KEY,
    ApprovalReport,
    ApprovalState,
    PeerVersion,
    ResultManifest,
    Role,
    SiteMetrics,
    StudyInfo,
    StudySpec,
    StudyStatus,
    Task,
    TaskPoll,
    TaskStatus,
    agent_login_message,
    for_peer,
    from_peer,
)
from fedhealth.protocol import _versions as versions
from fedhealth.runtime import param_specs
from support import (
    TestClient,
    agent_bearer,
    breast_spec,
    operator_bearer,
    operator_principal,
    running_service,
    synthetic_recipe,
)

NOW = datetime(2026, 12, 6, tzinfo=UTC)
NEWER = PROTOCOL_VERSION + 1
OURS = PeerVersion(
    protocol=PROTOCOL_VERSION, min_protocol=MIN_PROTOCOL_VERSION, software=fedhealth.__version__
)


# --- versions on the wire: a spec is never cut ------------------------------------------------------------


def _task_json(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "task_id": "tk_1",
        "study_id": "st_1",
        "round": 1,
        "kind": "train",
        "dataset": spec["dataset"],
        "recipe": spec["recipe"],
        "model_digest": "0" * 64,
        "seed": spec["seed"],
        "deadline": NOW.isoformat(),
        "spec": spec,
    }


@pytest.mark.parametrize(
    "where",
    ["top-level", "strategy", "recipe"],
)
def test_a_spec_field_from_a_newer_protocol_is_refused_never_dropped_from_a_task(where: str) -> None:
    """An orchestrator stating a newer protocol (or lying that it does) adds a field to the study spec it
    hands a site. Dropping it, as other fields of a newer protocol are dropped, would have the site check
    and run a spec that is not the one the orchestrator holds: the site's spec hash would be of a spec nobody
    submitted. The reader refuses the poll instead (the agent polls again), and the task's copy of the recipe
    is the spec's too."""
    spec = breast_spec(["a"], rounds=1).model_dump(mode="json")
    extra = {"raw_export": True}
    if where == "top-level":
        spec |= extra
    else:
        spec[where] |= extra
    with pytest.raises(ValidationError, match="raw_export"):
        from_peer(TaskPoll, json.dumps({"task": _task_json(spec)}), NEWER)


def test_an_extra_field_beside_the_spec_from_a_newer_protocol_is_still_dropped() -> None:
    """The refusal above is the spec's only: a field a newer protocol added to the task itself is dropped and
    the spec arrives whole, hashing as it was sent."""
    spec = breast_spec(["a"], rounds=1).model_dump(mode="json")
    task = _task_json(spec) | {"priority": "high"}
    poll = from_peer(TaskPoll, json.dumps({"task": task}), NEWER)
    assert poll.task is not None
    assert "priority" not in poll.task.model_dump()
    assert spec_hash(poll.task.spec.model_dump(mode="json")) == spec_hash(spec)


def test_a_spec_field_of_a_newer_protocol_inside_a_study_info_is_refused_not_dropped() -> None:
    """The operator client reads studies with the same negotiation: the spec inside a StudyInfo is whole or
    refused, never cut, so what an operator or steward reads is what the spec hash covers."""
    spec = breast_spec(["a"], rounds=1).model_dump(mode="json") | {"raw_export": True}
    info = {
        "study_id": "st_1",
        "spec": spec,
        "status": "running",
        "reason": None,
        "created_at": NOW.isoformat(),
        "ended_at": None,
        "completed_rounds": 0,
        "current_round": 1,
        "model_digest": None,
        "new_top_level": 1,  # a field the newer protocol added to StudyInfo: dropped, as before
    }
    with pytest.raises(ValidationError, match="raw_export"):
        from_peer(StudyInfo, info, NEWER)
    del spec["raw_export"]
    assert from_peer(StudyInfo, info, NEWER).spec.model_dump(mode="json") == spec


def test_a_sender_never_leaves_a_spec_field_out_for_an_older_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release that adds spec fields lists them in FIELDS_SINCE like any other; a sender still sends the
    spec whole (in a task's spec, its copy of the recipe, and a StudyInfo), since an older site that cannot
    read all of it must refuse it rather than approve a shorter one."""
    monkeypatch.setitem(versions.FIELDS_SINCE, "StudySpec", {"description": NEWER, "purpose": NEWER})
    monkeypatch.setitem(versions.FIELDS_SINCE, "StrategySpec", {"server_learning_rate": NEWER})
    monkeypatch.setitem(versions.FIELDS_SINCE, "RecipeSpec", {"params": NEWER})
    monkeypatch.setitem(versions.FIELDS_SINCE, "Task", {"scaling": NEWER})
    spec = breast_spec(["a"], rounds=1, description="what the steward read")
    task = Task.model_validate(_task_json(spec.model_dump(mode="json")))
    sent = for_peer(TaskPoll(task=task), PROTOCOL_VERSION)["task"]
    assert "scaling" not in sent  # the task's own field of a newer protocol is left out
    assert sent["spec"] == spec.model_dump(mode="json")
    assert sent["recipe"] == spec.recipe.model_dump(mode="json")
    info = StudyInfo(
        study_id="st_1",
        spec=spec,
        status=StudyStatus.RUNNING,
        reason=None,
        created_at=NOW,
        ended_at=None,
        completed_rounds=0,
        current_round=1,
        model_digest=None,
    )
    assert for_peer(info, PROTOCOL_VERSION)["spec"] == spec.model_dump(mode="json")


# --- versions on the wire: every answer, and logins -------------------------------------------------------


@contextmanager
def _client(tmp_path: Path, **settings: Any) -> Iterator[tuple[FastAPI, TestClient]]:
    app = create_app(
        OrchestratorSettings(state_dir=tmp_path / "state", signing_key=IdentityKey.generate(), **settings),
        extensions=default_extensions(),
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client


def _states_our_versions(headers: Any) -> bool:
    return PeerVersion.from_headers(headers) == OURS


def test_every_answer_states_the_versions_refusals_and_a_bugs_500_included(tmp_path: Path) -> None:
    with _client(tmp_path) as (app, client):
        svc: OrchestratorService = app.state.services
        _, admin = operator_bearer(svc, "root", Role.ADMIN)
        answers = {
            "ok": client.get("/healthz"),
            "401": client.get("/api/v1/studies"),
            "404": client.get("/api/v1/no-such-route", headers=admin),
            "405": client.delete("/healthz"),
            "422": client.post("/api/v1/studies", headers=admin, json={"name": "x"}),
            "426": client.post(
                "/api/v1/auth/token",
                json={"user": "root", "api_key": "fh_" + "x" * 40},
                headers={"X-Fedhealth-Protocol": "0", "X-Fedhealth-Protocol-Min": "0"},
            ),
        }

        def bug(*_: object, **__: object) -> None:
            raise RuntimeError("a bug")

        svc.store.list_studies = bug  # type: ignore[method-assign]
        answers["500"] = client.get("/api/v1/studies", headers=admin)
    for name, answer in answers.items():
        assert answer.status_code == (200 if name == "ok" else int(name)), (name, answer.text)
        assert _states_our_versions(answer.headers), (name, dict(answer.headers))


def test_a_refusal_on_the_enrollment_port_states_the_versions_too(tmp_path: Path) -> None:
    """The enrollment listener serves enrollment and health only; what it refuses is an answer like any
    other, and a site reading it learns the orchestrator's versions (TestClient's requests reach port 80)."""
    with _client(tmp_path, enroll_port=80) as (_, client):
        refused = client.get("/api/v1/studies")
        health = client.get("/healthz")
    assert refused.status_code == 403
    assert refused.json()["error"] == "only enrollment is served on this port"
    assert _states_our_versions(refused.headers), dict(refused.headers)
    assert health.status_code == 200
    assert _states_our_versions(health.headers)


@pytest.mark.parametrize(
    "stated",
    [
        {"X-Fedhealth-Protocol": "two"},
        {"X-Fedhealth-Protocol": ""},
        {"X-Fedhealth-Protocol": "1.0"},
        {"X-Fedhealth-Protocol": "-1"},
        {"X-Fedhealth-Protocol": str(PROTOCOL_VERSION), "X-Fedhealth-Protocol-Min": "x"},
        {"X-Fedhealth-Protocol": "0", "X-Fedhealth-Protocol-Min": "0"},
        {
            "X-Fedhealth-Protocol": str(PROTOCOL_VERSION + 5),
            "X-Fedhealth-Protocol-Min": str(PROTOCOL_VERSION + 4),
        },
    ],
    ids=["word", "empty", "decimal", "negative", "min-word", "too-old", "too-new"],
)
def test_a_login_outside_the_protocols_is_one_426_sentence_that_issues_and_records_nothing(
    tmp_path: Path, stated: dict[str, str]
) -> None:
    """Each login route (challenge, agent token, operator token) refuses a client whose stated protocol is
    not a number or does not meet the orchestrator's range with 426 and one line, issues no token, and
    leaves the versions the operator sees as they were; the same signed challenge then logs in."""
    with _client(tmp_path) as (app, client):
        svc: OrchestratorService = app.state.services
        key, _ = agent_bearer(svc, "north")
        recorded = svc.store.get_site("north")
        api_key, _ = operator_bearer(svc, "root", Role.ADMIN)
        challenge = client.post("/api/v1/agent/challenge", json={"site": "north"})
        assert challenge.status_code == 200, challenge.text
        value = challenge.json()["challenge"]
        signed = {
            "site": "north",
            "challenge": value,
            "signature": key.sign(canonical_json(agent_login_message("north", value))).hex(),
        }
        answers = [
            client.post("/api/v1/agent/challenge", json={"site": "north"}, headers=stated),
            client.post("/api/v1/agent/token", json=signed, headers=stated),
            client.post("/api/v1/auth/token", json={"user": "root", "api_key": api_key}, headers=stated),
        ]
        for answer in answers:
            assert answer.status_code == 426, answer.text
            body = answer.json()
            assert set(body) == {"error", "detail"}
            assert "access_token" not in answer.text
            assert "challenge" not in body
            assert len(body["error"].splitlines()) == 1
            assert body["error"].startswith(
                ("orchestrator speaks protocol", "the peer's X-Fedhealth-Protocol")
            )
        after = svc.store.get_site("north")
        assert (after.software_version, after.protocol_version) == (
            recorded.software_version,
            recorded.protocol_version,
        )
        again = client.post("/api/v1/agent/token", json=signed)
        assert again.status_code == 200, again.text


@pytest.mark.parametrize(
    "software",
    ["0.1\tactive\tNOT READY", "0.1\x1b[2J\x1b[H", "0.1\x9b2J", "\x1b]0;owned\x07", " 0.1", "0.1 (patched)"],
    ids=["tab-forges-columns", "terminal-escape", "c1-escape", "osc-title", "leading-space", "space"],
)
def test_a_release_an_agent_states_at_login_that_is_not_a_version_is_never_recorded(
    tmp_path: Path, software: str
) -> None:
    """``fedhealth site list`` prints one tab-separated line per site with the release its agent stated at
    login (``X-Fedhealth-Version``): a tab forged the line's columns, an escape sequence drove the
    operator's terminal. The readiness report refuses such a version at receipt; at login it is recorded as
    unknown (the login itself still works), and a real version is recorded as stated."""
    with _client(tmp_path) as (app, client):
        svc: OrchestratorService = app.state.services
        key, _ = agent_bearer(svc, "north")
        _, admin = operator_bearer(svc, "root", Role.ADMIN)

        def login(release: str) -> None:
            challenge = client.post("/api/v1/agent/challenge", json={"site": "north"}).json()["challenge"]
            signed = {
                "site": "north",
                "challenge": challenge,
                "signature": key.sign(canonical_json(agent_login_message("north", challenge))).hex(),
            }
            headers: dict[str, str | bytes] = {
                "X-Fedhealth-Protocol": str(PROTOCOL_VERSION),
                "X-Fedhealth-Protocol-Min": str(MIN_PROTOCOL_VERSION),
                "X-Fedhealth-Version": release.encode("latin-1"),  # HTTP carries bytes, not just ASCII
            }
            answer = client.post("/api/v1/agent/token", json=signed, headers=headers)
            assert answer.status_code == 200, answer.text

        login("1.2.3.dev4+g1a2b3c")
        assert svc.store.get_site("north").software_version == "1.2.3.dev4+g1a2b3c"
        login(software)
        (site,) = [s for s in client.get("/api/v1/sites", headers=admin).json() if s["name"] == "north"]
    shown = site["software_version"]
    assert shown == "unknown" or shown is None, repr(shown)
    assert site["protocol_version"] == PROTOCOL_VERSION


# --- handlers as functions: long poll, updates, recipe params ---------------------------------------------

SITES = ["site-a", "site-b", "site-c"]
RESEARCHER = operator_principal("alice", Role.RESEARCHER)


def _spec(sites: list[str]) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "arch",
            "owner": "alice",
            "dataset": "none",
            "recipe": synthetic_recipe(16),
            "rounds": 2,
            "train_sites": sites,
            "min_sites": 1,
            "round_deadline_s": 600.0,
            "seed": 3,
        }
    )


async def _approve(svc: OrchestratorService, info: StudyInfo, sites: list[str]) -> None:
    assert info.spec_hash is not None
    for site in sites:
        report = ApprovalReport(spec_hash=info.spec_hash, state=ApprovalState.APPROVED)
        await accept_approval(svc, site, report)


def _run(tmp_path: Path, body: Callable[[OrchestratorService], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_service(tmp_path, SITES) as svc:
            await body(svc)

    asyncio.run(main())


def test_a_waiting_poll_answers_the_moment_its_sites_task_exists_and_only_its_own(tmp_path: Path) -> None:
    """Polls of all three sites wait (25 s) before any study exists; a study of site-a and site-b opens its
    first round: their polls answer at once, each with its own task, and site-c's, named by no study, is
    woken by nothing and ends empty at its own wait."""

    async def body(svc: OrchestratorService) -> None:
        started = time.monotonic()
        polls = {
            s: asyncio.create_task(poll_task(svc, s, wait=25.0 if s != "site-c" else 1.5)) for s in SITES
        }
        await asyncio.sleep(0.2)
        assert not any(p.done() for p in polls.values())
        info = await submit_study(svc, RESEARCHER, _spec(["site-a", "site-b"]))
        opened = time.monotonic()
        await _approve(svc, info, ["site-a", "site-b"])
        answered = await asyncio.wait_for(asyncio.gather(polls["site-a"], polls["site-b"]), timeout=10)
        assert time.monotonic() - opened < 5.0  # woken, not answered at the end of its 25 s
        (r,) = svc.store.open_rounds()
        tasks = {t.id: t.site for t in svc.store.tasks_of_round(r.id)}
        for site, polled in zip(["site-a", "site-b"], answered, strict=True):
            assert polled.task is not None
            assert tasks[polled.task.task_id] == site
            assert polled.task.study_id == info.study_id
        empty = await asyncio.wait_for(polls["site-c"], timeout=10)
        assert empty.task is None
        assert time.monotonic() - started >= 1.5

    _run(tmp_path, body)


def _bad_update(task: Task, how: str) -> bytes:
    specs = param_specs(task.recipe)
    delta: dict[str, np.ndarray] = {s.name: np.full(s.shape, 0.01, np.float32) for s in specs}
    first = specs[0].name
    if how == "nan":
        delta[first] = delta[first].copy()
        delta[first][0] = np.nan
    elif how == "infinite":
        delta[first] = np.full(specs[0].shape, np.inf, np.float32)
    elif how == "float64":
        delta[first] = delta[first].astype(np.float64)
    elif how == "shape":
        delta[first] = np.zeros((*specs[0].shape, 2), np.float32)
    elif how == "extra-name":
        delta["smuggled"] = np.zeros(4, np.float32)
    elif how == "missing-name":
        del delta[first]
    import safetensors.numpy

    manifest = ResultManifest(task_id=task.task_id, metrics=SiteMetrics(num_samples=10))
    return safetensors.numpy.save(delta, metadata={RESULT_METADATA_KEY: manifest.model_dump_json()})


@pytest.mark.parametrize("how", ["nan", "infinite", "float64", "shape", "extra-name", "missing-name"])
def test_a_bad_update_is_refused_before_it_is_stored_and_its_task_closed_as_rejected(
    tmp_path: Path, how: str
) -> None:
    async def body(svc: OrchestratorService) -> None:
        info = await submit_study(svc, RESEARCHER, _spec(["site-a", "site-b"]))
        await _approve(svc, info, ["site-a", "site-b"])
        polled = await poll_task(svc, "site-a", wait=0)
        assert polled.task is not None
        updates = svc.blobs.root_of(BlobKind.UPDATE)
        before = sorted(p.name for p in updates.rglob("*") if p.is_file())
        with pytest.raises(ApiError) as refused:
            await accept_result(svc, "site-a", polled.task.task_id, _bad_update(polled.task, how))
        assert (refused.value.status, refused.value.error) == (422, "invalid update")
        row = svc.store.get_task(polled.task.task_id)
        assert row.status is TaskStatus.REJECTED
        assert row.result_digest is None
        assert sorted(p.name for p in updates.rglob("*") if p.is_file()) == before  # nothing kept on disk
        assert svc.store.get_study(info.study_id).status is StudyStatus.RUNNING  # the round goes on

    _run(tmp_path, body)


def test_recipe_params_the_recipe_refuses_are_a_422_naming_every_problem(tmp_path: Path) -> None:
    async def body(svc: OrchestratorService) -> None:
        spec = _spec(["site-a"]).model_dump(mode="json")
        spec["recipe"]["params"] = {"n_params": 0, "n_parms": 3, "extra": {"deep": True}}
        with pytest.raises(ApiError) as refused:
            await submit_study(svc, RESEARCHER, StudySpec.model_validate(spec))
        assert (refused.value.status, refused.value.error) == (422, "invalid study")
        detail = refused.value.detail
        assert isinstance(detail, str)
        problems = detail.split("; ")
        assert sorted(p.split(":", 1)[0] for p in problems) == [
            "recipe.params.extra",
            "recipe.params.n_params",
            "recipe.params.n_parms",
        ]
        assert all(p.split(":", 1)[1].strip() for p in problems)  # each with its rule
        assert svc.store.list_studies(None) == []  # nothing stored

    _run(tmp_path, body)
