"""An attacker's audit of the orchestrator's HTTP API authorization, in process (the whole ASGI app with its
request gate, the default extensions and the dashboard; starlette's TestClient, no sockets).

docs/security.md ("Operators", "Blobs: who may read what", "Limits and retries") is turned into a table of
every route of the app and who may call it; each route is called by each kind of caller (nobody, a site, an
admin, a researcher, an auditor) and its answer compared with the table, with the request gate in place and
with the gate taken out (each route's own dependency must refuse the same callers: a route that forgets its
check fails here, and a route added without a row in the table fails too). Then the object-level attacks:

- a malicious site (valid agent token) on another site's open or closed task (result, evaluation, failure,
  secure-round messages, input model), on another site's upload, on a study it is not named in (approval,
  rejection), and on the operator API (the audit log);
- a researcher on another researcher's study (cancel, model, released versions), an auditor on anything that
  changes state;
- path tricks (trailing, double and dot slashes, case, HEAD and OPTIONS) against the gate's path-based
  access decision (``_limits.access_of``): none reaches an operator route;
- the gate refuses a caller without credentials before it reads a byte of the body, on every protected route.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI

from fedhealth.crypto import IdentityKey
from fedhealth.dashboard import DashboardExtension
from fedhealth.orchestrator import OrchestratorSettings, create_app, default_extensions
from fedhealth.orchestrator._direct import _flat_routes
from fedhealth.orchestrator._limits import Access, RequestGate, access_of
from fedhealth.protocol import (
    ResultManifest,
    Role,
    SiteMetrics,
    StudySpec,
    StudyStatus,
    Task,
    TaskStatus,
)
from fedhealth.runtime import encode_update, param_specs
from support import AsgiAnswer, TestClient, agent_bearer, operator_bearer, send_asgi, synthetic_recipe

# --- who may call what (docs/security.md) ----------------------------------------------------------------

PUBLIC = "public"  # health and the API description: anyone
LOGIN = "login"  # enrollment and login: anyone (no token yet)
AGENT = "agent"  # a site's agent token only
ADMIN = "admin"  # sites and users: admins only
RESEARCHER = "researcher"  # submit, cancel, download models, signing keys: admins and researchers
READER = "reader"  # read studies, reports, sites, the audit log, provenance, cards: every operator
UI = "ui"  # the dashboard: its own session cookie, never a bearer token
UI_OPEN = "ui-open"  # the dashboard's sign-in page, assets and entry redirects

ALLOWED: dict[str, frozenset[str]] = {
    PUBLIC: frozenset({"anonymous", "site", "admin", "researcher", "auditor"}),
    LOGIN: frozenset({"anonymous", "site", "admin", "researcher", "auditor"}),
    AGENT: frozenset({"site"}),
    ADMIN: frozenset({"admin"}),
    RESEARCHER: frozenset({"admin", "researcher"}),
    READER: frozenset({"admin", "researcher", "auditor"}),
}

TABLE: dict[tuple[str, str], str] = {
    ("GET", "/openapi.json"): PUBLIC,
    ("HEAD", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("HEAD", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("HEAD", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("HEAD", "/redoc"): PUBLIC,
    ("GET", "/healthz"): PUBLIC,
    ("POST", "/api/v1/enroll"): LOGIN,
    ("POST", "/api/v1/agent/challenge"): LOGIN,
    ("POST", "/api/v1/agent/token"): LOGIN,
    ("POST", "/api/v1/auth/token"): LOGIN,
    # the agent API
    ("GET", "/api/v1/agent/tasks/next"): AGENT,
    ("POST", "/api/v1/agent/tasks/{task_id}/result"): AGENT,
    ("POST", "/api/v1/agent/tasks/{task_id}/evaluation"): AGENT,
    ("POST", "/api/v1/agent/tasks/{task_id}/failure"): AGENT,
    ("POST", "/api/v1/agent/tasks/{task_id}/secagg/{stage}"): AGENT,
    ("GET", "/api/v1/agent/tasks/{task_id}/secagg/{stage}"): AGENT,
    ("POST", "/api/v1/agent/tasks/{task_id}/collective/{index:int}"): AGENT,
    ("GET", "/api/v1/agent/tasks/{task_id}/collective/{index:int}"): AGENT,
    ("HEAD", "/api/v1/agent/tasks/{task_id}/collective/{index:int}"): AGENT,
    ("GET", "/api/v1/agent/models/{digest}"): AGENT,
    ("GET", "/api/v1/agent/approvals"): AGENT,
    ("POST", "/api/v1/agent/approvals"): AGENT,
    ("GET", "/api/v1/agent/probe/time"): AGENT,
    ("GET", "/api/v1/agent/probe"): AGENT,
    ("POST", "/api/v1/agent/probe"): AGENT,
    ("POST", "/api/v1/agent/readiness"): AGENT,
    ("POST", "/api/v1/agent/governance/withdrawals"): AGENT,
    # sites and users
    ("POST", "/api/v1/sites"): ADMIN,
    ("POST", "/api/v1/sites/{name}/enrollment-token"): ADMIN,
    ("POST", "/api/v1/sites/{name}/rotate"): ADMIN,
    ("POST", "/api/v1/sites/{name}/revoke"): ADMIN,
    ("POST", "/api/v1/users"): ADMIN,
    ("GET", "/api/v1/users"): ADMIN,
    ("POST", "/api/v1/users/{name}/api-key"): ADMIN,
    ("POST", "/api/v1/users/{name}/revoke"): ADMIN,
    ("PUT", "/api/v1/governance/owner-keys/{name}"): ADMIN,
    # studies and models
    ("POST", "/api/v1/studies"): RESEARCHER,
    ("POST", "/api/v1/studies/{study_id}/cancel"): RESEARCHER,
    ("GET", "/api/v1/studies/{study_id}/model"): RESEARCHER,
    ("GET", "/api/v1/models/{digest}"): RESEARCHER,
    ("PUT", "/api/v1/governance/owner-key"): RESEARCHER,
    ("POST", "/api/v1/governance/studies"): RESEARCHER,
    ("POST", "/api/v1/privacy/plan"): RESEARCHER,
    # reading
    ("GET", "/api/v1/sites"): READER,
    ("GET", "/api/v1/sites/readiness"): READER,
    ("GET", "/api/v1/studies"): READER,
    ("GET", "/api/v1/studies/{study_id}"): READER,
    ("GET", "/api/v1/studies/{study_id}/report"): READER,
    ("GET", "/api/v1/studies/{study_id}/privacy"): READER,
    ("GET", "/api/v1/governance/audit"): READER,
    ("GET", "/api/v1/governance/audit/verify"): READER,
    ("GET", "/api/v1/governance/anchors/{site}"): READER,
    ("GET", "/api/v1/governance/models/{model}/provenance"): READER,
    ("GET", "/api/v1/governance/models/{model}/card"): READER,
    # the dashboard
    ("GET", "/ui/static/{name}"): UI_OPEN,
    ("GET", "/ui/"): UI_OPEN,
    ("GET", "/ui"): UI_OPEN,
    ("GET", "/ui/login"): UI_OPEN,
    ("POST", "/ui/login"): UI_OPEN,
    ("POST", "/ui/logout"): UI_OPEN,
    ("GET", "/ui/federation"): UI,
    ("GET", "/ui/studies"): UI,
    ("GET", "/ui/studies/{study_id}"): UI,
    ("GET", "/ui/privacy"): UI,
    ("GET", "/ui/models"): UI,
    ("GET", "/ui/models/{digest}/card"): UI,
    ("GET", "/ui/drift"): UI,
    ("GET", "/ui/audit"): UI,
    ("GET", "/ui/audit/verify"): UI,
    ("GET", "/ui/sites/{name}/onboarding.zip"): UI,
    ("POST", "/ui/sites/{name}/revoke"): UI,
    ("POST", "/ui/drift/reference"): UI,
    ("POST", "/ui/studies/{study_id}/cancel"): UI,
}

CALLERS = ("anonymous", "site", "admin", "researcher", "auditor")
SAMPLES = {
    "task_id": "tk-nobody",
    "index:int": "0",
    "stage": "advertise_keys",
    "digest": "0" * 64,
    "study_id": "st-nobody",
    "name": "nobody",
    "model": "0" * 64,
    "site": "site-c",
}
QUERY = {"wait": "0", "size": "0"}  # long polls answer at once; the probe sends nothing


def _concrete(template: str) -> str:
    path = template
    for name, value in SAMPLES.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"no sample value for a parameter of {template}"
    return path


def _routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path template) the app answers."""
    return {
        (method, route.path)
        for route in _flat_routes(app.router.routes)
        for method in (getattr(route, "methods", None) or ())
    }


# --- the federation ----------------------------------------------------------------------------------------


@dataclass(repr=False)
class World:
    app: FastAPI
    client: TestClient
    svc: Any
    bearer: dict[str, dict[str, str]] = field(default_factory=dict)  # caller -> Authorization header
    keys: dict[str, IdentityKey] = field(default_factory=dict)
    api_keys: dict[str, str] = field(default_factory=dict)  # user -> API key
    facts: dict[str, Any] = field(default_factory=dict)

    def call(self, caller: str, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self.bearer.get(caller, {}), **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)


def _enroll(w: World, site: str) -> None:
    w.keys[site], w.bearer[site] = agent_bearer(w.svc, site)


def _user(w: World, caller: str, name: str, role: Role) -> None:
    w.api_keys[name], w.bearer[caller] = operator_bearer(w.svc, name, role)


def _start(tmp: Path, *, gate: bool) -> Iterator[World]:
    settings = OrchestratorSettings(state_dir=tmp, signing_key=IdentityKey.generate(), rate_per_s=0)
    app = create_app(settings, extensions=[*default_extensions(), DashboardExtension()])
    if not gate:  # the routes' own dependencies alone ("an app mounted without it", _http._principal)
        app.user_middleware = [m for m in app.user_middleware if m.cls is not RequestGate]
    with TestClient(app, base_url="https://testserver") as client:
        w = World(app=app, client=client, svc=app.state.services)
        _user(w, "admin", "root", Role.ADMIN)
        _user(w, "researcher", "rx", Role.RESEARCHER)
        _user(w, "researcher-y", "ry", Role.RESEARCHER)
        _user(w, "auditor", "aud", Role.AUDITOR)
        for site in ("site-a", "site-b", "site-c"):
            _enroll(w, site)
        w.bearer["site"] = w.bearer["site-c"]  # in no study: the table's calls change nothing of the others'
        client.get("/healthz")  # builds the middleware stack
        assert any(isinstance(layer, RequestGate) for layer in _layers(app)) is gate
        yield w


def _layers(app: FastAPI) -> Iterator[Any]:
    layer: Any = app.middleware_stack
    while layer is not None:
        yield layer
        layer = getattr(layer, "app", None)


def _spec(name: str, owner: str, sites: list[str], rounds: int = 2) -> dict[str, Any]:
    spec = StudySpec.model_validate(
        {
            "name": name,
            "owner": owner,
            "dataset": "none",
            "recipe": synthetic_recipe(16),
            "rounds": rounds,
            "train_sites": sites,
            "min_sites": 1,
            "round_deadline_s": 600.0,
            "seed": 3,
        }
    )
    return spec.model_dump(mode="json")


def _update(task: Task, fill: float) -> bytes:
    delta = {s.name: np.full(s.shape, fill, dtype=np.float32) for s in param_specs(task.recipe)}
    return encode_update(delta, ResultManifest(task_id=task.task_id, metrics=SiteMetrics(num_samples=10)))


def _poll(w: World, site: str, wait: float = 0) -> Task | None:
    answer = w.call(site, "GET", "/api/v1/agent/tasks/next", params={"wait": wait})
    assert answer.status_code == 200, answer.text
    found = answer.json()["task"]
    return None if found is None else Task.model_validate(found)


def _submit(w: World, caller: str, spec: dict[str, Any]) -> dict[str, Any]:
    answer = w.call(caller, "POST", "/api/v1/studies", json=spec)
    assert answer.status_code == 201, answer.text
    return answer.json()  # type: ignore[no-any-return]


def _approve(w: World, site: str, spec_hash: str, state: str = "approved") -> None:
    answer = w.call(site, "POST", "/api/v1/agent/approvals", json={"spec_hash": spec_hash, "state": state})
    assert answer.status_code == 200, answer.text


def _study(w: World, study_id: str) -> dict[str, Any]:
    answer = w.call("admin", "GET", f"/api/v1/studies/{study_id}")
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The gated app, and in it: rx's study "ours" over site-a and site-b, whose round 1 completed (a
    released model) and whose round 2 tasks are open; ry's study "theirs", awaiting its sites' approval."""
    for w in _start(tmp_path_factory.mktemp("authz-attacks"), gate=True):
        ours = _submit(w, "researcher", _spec("ours", "rx", ["site-a", "site-b"]))
        for site in ("site-a", "site-b"):
            _approve(w, site, ours["spec_hash"])
        first = {site: _poll(w, site) for site in ("site-a", "site-b")}
        uploads = {}
        for fill, (site, task) in enumerate(first.items(), start=1):
            assert task is not None
            assert task.round == 1
            uploads[site] = _update(task, 0.01 * fill)
            answer = w.call(site, "POST", f"/api/v1/agent/tasks/{task.task_id}/result", content=uploads[site])
            assert answer.status_code == 200, answer.text
        second = {site: _poll(w, site, wait=10) for site in ("site-a", "site-b")}
        for task in second.values():
            assert task is not None
            assert task.round == 2
        theirs = _submit(w, "researcher-y", _spec("theirs", "ry", ["site-a", "site-b"]))
        assert theirs["status"] == StudyStatus.AWAITING_APPROVAL.value
        w.facts.update(ours=_study(w, ours["study_id"]), theirs=theirs, first=first, second=second)
        w.facts["uploads"] = uploads
        yield w


@pytest.fixture(scope="module")
def ungated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The same app with the request gate taken out: only the routes' own checks stand."""
    yield from _start(tmp_path_factory.mktemp("authz-ungated"), gate=False)


# --- every route, every caller ---------------------------------------------------------------------------


def test_every_route_of_the_app_has_a_row_in_the_access_table(world: World) -> None:
    """A route added later without a row here fails: decide who may call it, then add it to TABLE."""
    routes = _routes(world.app)
    assert routes - set(TABLE) == set(), "routes nobody decided the access of"
    assert set(TABLE) - routes == set(), "rows of routes that are gone"


def test_the_gates_access_class_of_each_route_is_the_tables(world: World) -> None:
    """The gate decides from the path alone which token a route needs (``access_of``): every agent route is
    under /api/v1/agent/, every operator route under /api/ and outside it, and nothing open by the table
    is classified as needing a token it cannot have."""
    expected = {
        PUBLIC: Access.PUBLIC,
        LOGIN: Access.LOGIN,
        AGENT: Access.AGENT,
        ADMIN: Access.OPERATOR,
        RESEARCHER: Access.OPERATOR,
        READER: Access.OPERATOR,
        UI: Access.PUBLIC,  # the dashboard checks its session cookie itself
        UI_OPEN: Access.PUBLIC,
    }
    wrong = {
        (method, path): access_of(_concrete(path))
        for (method, path), rule in TABLE.items()
        if access_of(_concrete(path)) is not expected[rule]
    }
    assert wrong == {}


def _check_route(w: World, method: str, template: str, caller: str) -> str | None:
    """Call the route as ``caller``; a description of what is wrong with the answer, or None."""
    rule = TABLE[(method, template)]
    body = {"json": {}} if method in ("POST", "PUT") else {}
    answer = w.call(caller, method, _concrete(template), params=QUERY, follow_redirects=False, **body)
    status = answer.status_code
    where = f"{method} {template} as {caller}: {status} {answer.text[:200]!r}"
    if status >= 500:
        return where
    if rule in (UI, UI_OPEN):
        # no bearer token opens a dashboard page: without its session cookie, a page is the sign-in redirect
        if rule == UI and not (status == 303 and answer.headers["location"].endswith("/ui/login")):
            return where
        return None
    allowed = caller in ALLOWED[rule]
    if allowed:
        return where if status in (401, 403) else None
    if caller == "anonymous":
        return None if status == 401 else where
    if status != 403:
        return where
    if method == "HEAD":
        return None  # no body to tell who refused
    error = answer.json()["error"]
    if caller == "site":
        expected = "agent credentials cannot call this endpoint"
    elif rule == AGENT:
        expected = "operator credentials cannot call this endpoint"
    else:
        expected = f"role {caller!r} may not do this"
    return None if error.startswith(expected) else f"{where} (expected {expected!r})"


@pytest.mark.parametrize("gated", [True, False], ids=["with-the-gate", "routes-alone"])
def test_every_route_answers_every_caller_as_the_docs_table_says(
    gated: bool, request: pytest.FixtureRequest
) -> None:
    """Nobody gets 401 on every protected route, a site 403 on every operator route, an operator 403 on the
    agent API, a role without the right 403; the callers the table allows are never refused. With the gate
    taken out, each route's own dependency must refuse the same callers (defence in depth: a route that
    forgets its dependency fails here)."""
    w: World = request.getfixturevalue("world" if gated else "ungated")
    wrong = [
        problem
        for (method, template) in sorted(TABLE)
        for caller in CALLERS
        if (problem := _check_route(w, method, template, caller)) is not None
    ]
    assert wrong == []


def test_an_auditor_changes_nothing_and_a_researcher_administers_nothing(world: World) -> None:
    """Every route that is not a read refuses an auditor (403), every admin route a researcher (403); the
    dashboard's forms are the dashboard tests' (CSRF and roles there)."""
    writes = [
        (m, p)
        for (m, p), rule in TABLE.items()
        if m not in ("GET", "HEAD") and rule in (ADMIN, RESEARCHER, READER)
    ]
    assert len(writes) == 13
    for method, template in writes:
        answer = world.call("auditor", method, _concrete(template), json={})
        assert answer.status_code == 403, (method, template, answer.text)
        if TABLE[(method, template)] == ADMIN:
            answer = world.call("researcher", method, _concrete(template), json={})
            assert answer.status_code == 403, (method, template, answer.text)
    assert {u["name"] for u in world.call("admin", "GET", "/api/v1/users").json()} == {
        "root",
        "rx",
        "ry",
        "aud",
    }
    sites = {s["name"]: s["status"] for s in world.call("admin", "GET", "/api/v1/sites").json()}
    assert sites == {"site-a": "active", "site-b": "active", "site-c": "active"}


# --- a malicious site ------------------------------------------------------------------------------------

NOT_YOURS = {"error": "this task belongs to another site", "detail": None}


def _task_status(w: World, task_id: str) -> TaskStatus:
    return w.svc.store.get_task(task_id).status  # type: ignore[no-any-return]


def test_a_site_can_neither_complete_fail_nor_message_for_another_sites_open_task(world: World) -> None:
    """site-b (in the round) and site-c (in no study) on site-a's open round-2 task: every route that acts for
    a task is refused with 403, and the task stays open and site-a's (it still polls it)."""
    task = world.facts["second"]["site-a"]
    base = f"/api/v1/agent/tasks/{task.task_id}"
    manifest = ResultManifest(task_id=task.task_id, metrics=SiteMetrics(num_samples=10)).model_dump(
        mode="json"
    )
    for attacker in ("site-b", "site-c"):
        attempts = [
            world.call(attacker, "POST", f"{base}/result", content=_update(task, 9.0)),
            world.call(attacker, "POST", f"{base}/evaluation", json=manifest),
            world.call(attacker, "POST", f"{base}/failure", json={"code": "study_approval"}),
            world.call(attacker, "POST", f"{base}/secagg/advertise_keys", content=b"x" * 32),
            world.call(attacker, "GET", f"{base}/secagg/advertise_keys", params={"wait": 0}),
        ]
        for answer in attempts:
            assert (answer.status_code, answer.json()) == (403, NOT_YOURS), answer.request.url
        # no collective session runs for it: the same answer its own site would get, nothing about the owner
        call = world.call(attacker, "POST", f"{base}/collective/0", content=b"x" * 16)
        assert call.status_code == 410
    assert _task_status(world, task.task_id) is TaskStatus.DELIVERED
    polled = _poll(world, "site-a")
    assert polled is not None
    assert polled.task_id == task.task_id


def test_a_site_downloads_only_the_input_model_of_its_own_open_task_and_never_an_upload(world: World) -> None:
    """docs/security.md, "Blobs": a digest opens nothing by itself; every refusal is the same 404."""
    first, second = world.facts["first"], world.facts["second"]
    current = second["site-a"].model_digest
    assert current == second["site-b"].model_digest  # one global model for the round
    upload_a = hashlib.sha256(world.facts["uploads"]["site-a"]).hexdigest()
    refused = {
        ("site-c", current),  # a model of a task it was not given
        ("site-a", first["site-a"].model_digest),  # a closed task's model
        ("site-c", first["site-a"].model_digest),
        ("site-a", upload_a),  # uploads: its own and another site's
        ("site-b", upload_a),
        ("site-c", upload_a),
        ("site-a", "f" * 64),  # nothing at all
    }
    answers = {(site, d): world.call(site, "GET", f"/api/v1/agent/models/{d}") for site, d in refused}
    bodies = {(a.status_code, a.content) for a in answers.values()}
    assert len(bodies) == 1, bodies  # no oracle
    assert next(iter(bodies))[0] == 404
    for site in ("site-a", "site-b"):
        answer = world.call(site, "GET", f"/api/v1/agent/models/{current}")
        assert answer.status_code == 200
        assert hashlib.sha256(answer.content).hexdigest() == current
    for trick in (current.upper(), current + "/", "../" + current, current[:-1]):
        assert world.call("site-c", "GET", f"/api/v1/agent/models/{trick}").status_code in (404, 422)


def test_a_replayed_or_foreign_upload_for_a_closed_task_changes_nothing(world: World) -> None:
    """Round 1 is over: site-a's own bytes again are acknowledged once ("already stored"), other bytes get
    409; site-b may not replay site-a's upload, nor its own, to site-a's task, nor fail it (403)."""
    task_a, task_b = world.facts["first"]["site-a"], world.facts["first"]["site-b"]
    uploads = world.facts["uploads"]
    path_a = f"/api/v1/agent/tasks/{task_a.task_id}"
    again = world.call("site-a", "POST", f"{path_a}/result", content=uploads["site-a"])
    assert (again.status_code, again.json()["detail"]) == (200, "already stored")
    changed = world.call("site-a", "POST", f"{path_a}/result", content=_update(task_a, 0.5))
    assert changed.status_code == 409
    for body in (uploads["site-a"], uploads["site-b"]):
        foreign = world.call("site-b", "POST", f"{path_a}/result", content=body)
        assert (foreign.status_code, foreign.json()) == (403, NOT_YOURS)
    failed = world.call("site-b", "POST", f"{path_a}/failure", json={"code": "study_approval"})
    assert (failed.status_code, failed.json()) == (403, NOT_YOURS)
    late = world.call("site-a", "POST", f"{path_a}/failure", json={"code": "study_approval"})
    assert late.status_code == 200  # a closed task stays as it is
    # site-a's bytes sent to site-b's task, by site-a: not its task
    swapped = world.call(
        "site-a", "POST", f"/api/v1/agent/tasks/{task_b.task_id}/result", content=uploads["site-a"]
    )
    assert (swapped.status_code, swapped.json()) == (403, NOT_YOURS)
    row = world.svc.store.get_task(task_a.task_id)
    assert row.status is TaskStatus.COMPLETED
    assert row.result_digest == hashlib.sha256(uploads["site-a"]).hexdigest()
    assert world.svc.store.get_task(task_b.task_id).status is TaskStatus.COMPLETED


def test_a_site_not_named_in_a_study_neither_sees_it_nor_starts_or_fails_it(world: World) -> None:
    """ry's study names site-a and site-b. site-c is not offered its spec, and its approval or rejection of
    the spec hash counts for nothing (a site cannot fail, or start, a study it is not part of); site-b's
    approval does not stand for site-a's."""
    theirs = world.facts["theirs"]
    offered = world.call("site-c", "GET", "/api/v1/agent/approvals").json()["specs"]
    assert [s["study_id"] for s in offered] == []
    assert theirs["study_id"] in [
        s["study_id"] for s in world.call("site-b", "GET", "/api/v1/agent/approvals").json()["specs"]
    ]
    _approve(world, "site-c", theirs["spec_hash"], "rejected")
    assert _study(world, theirs["study_id"])["status"] == StudyStatus.AWAITING_APPROVAL.value
    _approve(world, "site-c", theirs["spec_hash"])
    _approve(world, "site-b", theirs["spec_hash"])
    _approve(world, "site-b", theirs["spec_hash"])
    assert _study(world, theirs["study_id"])["status"] == StudyStatus.AWAITING_APPROVAL.value
    assert _poll(world, "site-c") is None


def test_a_site_token_opens_no_operator_route_even_with_real_ids(world: World) -> None:
    """The table's calls use made-up ids; here a site names the real study, model and site."""
    ours = world.facts["ours"]
    released = ours["model_digest"]
    for method, path in [
        ("GET", "/api/v1/governance/audit"),
        ("GET", "/api/v1/governance/audit/verify"),
        ("GET", f"/api/v1/studies/{ours['study_id']}"),
        ("GET", f"/api/v1/studies/{ours['study_id']}/report"),
        ("GET", f"/api/v1/studies/{ours['study_id']}/model"),
        ("GET", f"/api/v1/models/{released}"),
        ("GET", f"/api/v1/governance/models/{released}/card"),
        ("POST", f"/api/v1/studies/{ours['study_id']}/cancel"),
        ("POST", "/api/v1/sites/site-b/revoke"),
        ("POST", "/api/v1/sites/site-b/rotate"),
    ]:
        answer = world.call("site-a", method, path)
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.json()["error"] == "agent credentials cannot call this endpoint"
    assert _study(world, ours["study_id"])["status"] == StudyStatus.RUNNING.value
    assert world.svc.store.get_site("site-b").status.value == "active"


# --- operators with too few rights -----------------------------------------------------------------------


def test_a_researcher_neither_cancels_nor_downloads_another_researchers_study(world: World) -> None:
    ours, theirs = world.facts["ours"], world.facts["theirs"]
    released = ours["model_digest"]
    owner_only = "only the study's owner (rx) or an admin may"
    for caller, error in (("researcher-y", owner_only), ("auditor", "role 'auditor' may not do this")):
        for method, path in [
            ("POST", f"/api/v1/studies/{ours['study_id']}/cancel"),
            ("GET", f"/api/v1/studies/{ours['study_id']}/model"),
            ("GET", f"/api/v1/models/{released}"),
        ]:
            answer = world.call(caller, method, path)
            assert answer.status_code == 403, (caller, path, answer.text)
            assert answer.json()["error"].startswith(error)
    refused = world.call("researcher", "POST", f"/api/v1/studies/{theirs['study_id']}/cancel")
    assert refused.status_code == 403
    assert refused.json()["error"] == "only the study's owner (ry) or an admin may cancel it"
    assert _study(world, ours["study_id"])["status"] == StudyStatus.RUNNING.value
    assert _study(world, theirs["study_id"])["status"] == StudyStatus.AWAITING_APPROVAL.value
    for caller in ("researcher", "admin"):  # the owner and an admin
        for path in (f"/api/v1/studies/{ours['study_id']}/model", f"/api/v1/models/{released}"):
            answer = world.call(caller, "GET", path)
            assert answer.status_code == 200, (caller, path)
            assert answer.headers["x-fedhealth-model-digest"] == released
            assert hashlib.sha256(answer.content).hexdigest() == released
    # the owner gets released versions only: not the initial model, not a site's upload (404 like no blob)
    initial = world.facts["first"]["site-a"].model_digest
    upload = hashlib.sha256(world.facts["uploads"]["site-a"]).hexdigest()
    for digest in (initial, upload, "e" * 64):
        for caller in ("researcher", "admin"):
            assert world.call(caller, "GET", f"/api/v1/models/{digest}").status_code == 404
    # guessed study ids: the same 404 for everyone
    for caller in ("researcher", "researcher-y", "admin"):
        for path in ("/api/v1/studies/st-0/model", "/api/v1/studies/../model"):
            assert world.call(caller, "GET", path).status_code == 404


def test_a_researcher_administers_nothing_with_real_names(world: World) -> None:
    for method, path, body in [
        ("POST", "/api/v1/sites/site-a/revoke", None),
        ("POST", "/api/v1/sites/site-a/rotate", None),
        ("POST", "/api/v1/sites", {"name": "rogue"}),
        ("POST", "/api/v1/users", {"name": "rogue", "role": "admin"}),
        ("POST", "/api/v1/users/ry/revoke", None),
        ("POST", "/api/v1/users/root/api-key", None),
        ("PUT", "/api/v1/governance/owner-keys/ry", {"public_key": "00" * 32}),
        ("GET", "/api/v1/users", None),
    ]:
        for caller in ("researcher", "auditor"):
            answer = world.call(caller, method, path, json=body)
            assert answer.status_code == 403, (caller, method, path, answer.text)
    assert world.svc.store.get_site("site-a").status.value == "active"
    assert world.svc.store.get_user("rogue") is None
    assert world.svc.store.get_user("ry").revoked_at is None


# --- the gate's path-based decision -----------------------------------------------------------------------


def _send_raw(w: World, caller: str, method: str, path: str, body: bytes = b"") -> AsgiAnswer:
    """One request straight into the app, the path exactly as given (a server hands the app the
    percent-decoded path as it came, without resolving dots or slashes)."""
    headers = {**w.bearer.get(caller, {}), "content-length": str(len(body))}
    return send_asgi(w.client, w.app, method, path, headers, chunks=iter([body] if body else []))


def _tricks(path: str) -> list[str]:
    """Spellings of an operator path that a path-based check might classify otherwise than the router."""
    rest = path.removeprefix("/api/v1")
    return [
        path + "/",
        "/" + path,
        path.replace("/api/v1/", "/api//v1/"),
        path.replace("/api/", "/API/"),
        path.upper(),
        path + "/.",
        path + "%2F",
        path + ";",
        path + "\x00",
        "/." + path,
        "/healthz/.." + path,
        "/ui/.." + path,
        "/api/v1/agent/.." + rest,
        "/api/v1/agent/../.." + path,
        "/api/v1/agent" + rest,
        "/api/v1/agent/" + path,
        "/api/v1/enroll/.." + rest,
    ]


@pytest.mark.parametrize(
    ("method", "path", "callers"),
    [
        ("GET", "/api/v1/users", ("anonymous", "site", "researcher", "auditor")),
        ("GET", "/api/v1/governance/audit", ("anonymous", "site")),
        ("POST", "/api/v1/sites/site-b/revoke", ("anonymous", "site", "researcher", "auditor")),
        ("POST", "/api/v1/users", ("anonymous", "site", "researcher", "auditor")),
    ],
)
def test_no_spelling_of_a_path_or_method_reaches_an_operator_route_around_the_gate(
    world: World, method: str, path: str, callers: tuple[str, ...]
) -> None:
    """Trailing, doubled and dotted slashes, case, a NUL, the agent or login prefix in front, HEAD and
    OPTIONS: a caller the route refuses gets no 2xx from any of them, and nothing changes."""
    body = b'{"name": "rogue", "role": "admin"}' if method == "POST" else b""
    wrong = []
    for caller in callers:
        for spelling in _tricks(path):
            for verb in (method, "HEAD", "OPTIONS"):
                answer = _send_raw(world, caller, verb, spelling, body)
                if 200 <= answer.status < 300 or answer.status >= 500:
                    wrong.append((caller, verb, spelling, answer.status, answer.body[:120]))
                if 300 <= answer.status < 400:  # a redirect goes to the real path, where the gate checks
                    assert answer.headers["location"].endswith(path), answer.headers
        refused = _send_raw(world, caller, method, path, body)
        assert refused.status in (401, 403)
    assert wrong == []
    assert world.svc.store.get_site("site-b").status.value == "active"
    assert world.svc.store.get_user("rogue") is None


def test_every_protected_route_refuses_a_caller_without_a_token_before_reading_the_body(world: World) -> None:
    """docs/security.md, "Limits and retries": credentials are checked from the headers; no protected route,
    the collective calls (served ahead of the router) included, asks for a byte of the body first."""
    read_first = []
    for (method, template), rule in sorted(TABLE.items()):
        if rule not in (AGENT, ADMIN, RESEARCHER, READER):
            continue
        for caller in ("anonymous",):
            answer = _send_raw(world, caller, method, _concrete(template), b'{"a": 1}')
            if answer.status != 401 or answer.pulled > 0:
                read_first.append((method, template, answer.status, answer.pulled > 0))
    assert read_first == []
    # and the same request with a token is read (the check above is not vacuous)
    answer = _send_raw(world, "site", "POST", "/api/v1/agent/probe", b"x" * 10)
    assert (answer.status, answer.pulled > 0) == (200, True)


def test_every_operator_reads_another_researchers_study_on_the_rest_api_though_the_dashboard_hides_it(
    world: World,
) -> None:
    """docs/security.md, "Operators": studies, reports, provenance and model cards are read by every role
    (the threat model's residual). The dashboard shows a researcher the details and model cards of their own
    studies only (docs/dashboard.md, "Roles"), but that is presentation: the same user's token reads them
    here. If the dashboard's rule is meant as access control, the REST routes need ``owner_or_admin`` too
    and this test changes with them."""
    ours = world.facts["ours"]
    released = ours["model_digest"]
    for path in (
        f"/api/v1/studies/{ours['study_id']}",
        f"/api/v1/studies/{ours['study_id']}/report",
        f"/api/v1/governance/models/{released}/provenance",
        f"/api/v1/governance/models/{released}/card",
    ):
        for caller in ("researcher-y", "auditor"):
            assert world.call(caller, "GET", path).status_code == 200, (caller, path)
    try:
        page = world.client.get("/ui/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf is not None
        form = {"user": "ry", "api_key": world.api_keys["ry"], "csrf_token": csrf.group(1)}
        signed_in = world.client.post("/ui/login", data=form, follow_redirects=False)
        assert signed_in.status_code == 303
        hidden = world.client.get(f"/ui/studies/{ours['study_id']}")
        assert hidden.status_code == 403
        assert world.client.get(f"/ui/models/{released}/card").status_code == 403
    finally:
        world.client.cookies.clear()


def test_a_site_reports_readiness_and_an_operator_submits_studies_only_as_itself(world: World) -> None:
    """site-c cannot write site-a's readiness; rx cannot submit a study owned by ry or by the admin (plain or
    signed route): 422, and no study is stored."""
    readiness = {
        "site": "site-a",
        "checked_at": "2026-01-01T00:00:00Z",
        "software_version": "9.9.9",
        "protocol_version": 1,
        "ready": False,
        "checks": [],
    }
    forged = world.call("site-c", "POST", "/api/v1/agent/readiness", json=readiness)
    assert forged.status_code == 403
    reports = {
        r["site"]: r["readiness"] for r in world.call("auditor", "GET", "/api/v1/sites/readiness").json()
    }
    assert reports.get("site-a") is None
    before = len(world.call("admin", "GET", "/api/v1/studies").json())
    for owner in ("ry", "root"):
        spec = _spec(f"as-{owner}", owner, ["site-a"])
        answer = world.call("researcher", "POST", "/api/v1/studies", json=spec)
        assert answer.status_code == 422, answer.text
        assert "the spec's owner must be the submitting user ('rx')" in answer.text
        signed = world.call(
            "researcher", "POST", "/api/v1/governance/studies", json={"spec": spec, "signature": "00" * 64}
        )
        assert signed.status_code == 422, signed.text
        assert "the spec's owner must be the submitting user ('rx')" in signed.text
    assert len(world.call("admin", "GET", "/api/v1/studies").json()) == before
