"""Hostile input to every route of the orchestrator's REST API, from a caller of the right role (an admin, a
researcher, a site; anonymous on the login routes), in process (the whole ASGI app with its request gate and
the default extensions; starlette's TestClient, no sockets), on SQLite and on PostgreSQL.

The project's rule (docs/security.md, "Limits and retries"): bad input gets a clear error and loses nothing.
So each answer here must be a 4xx of the one error shape (``{"error": <one line>, "detail": ...}``), never a
5xx and never a hang, and the database (every table, the signed audit log included) and the blob store must
be unchanged by the refusal, or changed exactly as documented (an invalid update closes its task as
rejected, and only that).

What is tried, beside what test_api_authorization_attacks (who may call what), e2e/test_body_limits (sizes
before the body is read) and e2e/test_fuzz (schema-driven fuzzing over sockets, SQLite only) cover:

- JSON bodies that are not objects, nest 10,000 deep, are truncated, are not UTF-8, hold lone surrogates,
  NaN/Infinity/1e999 literals, 2**70 and 5,000-digit integers, duplicate keys, or come with the wrong content
  type, on every JSON route; then each route's own fields pushed past their bounds;
- NUL bytes in bodies and path parameters (PostgreSQL refuses ``\\x00`` in text), very long ids, dot segments
  and encoded slashes in path parameters, and query parameters out of range (negative, 10**12, NaN);
- a training result with a wrong shape or dtype, NaN/Inf, a truncated or hand-made safetensors body, a
  manifest for another task, a second upload (same bytes, other bytes, two at once), an upload after its
  study was cancelled, an upload by a site revoked mid-round;
- two registrations of one site or user name at once, two studies of one name at once, one site reporting
  the same approval at once;
- an agent login stating a protocol version beyond the database's integer column.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from fedhealth.core import canonical_json, encode_tensors
from fedhealth.crypto import IdentityKey
from fedhealth.governance import AuditEventType
from fedhealth.orchestrator import OrchestratorSettings, create_app, default_extensions
from fedhealth.orchestrator._http import ApiError
from fedhealth.orchestrator._routes_tasks import accept_result
from fedhealth.protocol import (
    RESULT_METADATA_KEY,
    ResultManifest,
    Role,
    SiteMetrics,
    StudySpec,
    Task,
    TaskStatus,
    agent_login_message,
)
from fedhealth.runtime import encode_update, param_specs
from support import TestClient, agent_bearer, operator_bearer, postgres_schema, synthetic_recipe

POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)
DATABASES = ["sqlite", POSTGRES]
REFUSED = {400, 404, 409, 413, 422}


# --- the federation ----------------------------------------------------------------------------------------


@dataclass(repr=False)
class Fed:
    db: str
    client: TestClient
    svc: Any
    state_dir: Path
    bearer: dict[str, dict[str, str]] = field(default_factory=dict)
    keys: dict[str, IdentityKey] = field(default_factory=dict)
    names: Iterator[int] = field(default_factory=itertools.count)

    def call(self, caller: str | None, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self.bearer.get(caller or "", {}), **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)

    def unique(self, prefix: str) -> str:
        return f"{prefix}{next(self.names)}"

    @property
    def engine(self) -> sa.Engine:
        return self.svc.store.engine  # type: ignore[no-any-return]


def _enroll(f: Fed, site: str) -> None:
    f.keys[site], f.bearer[site] = agent_bearer(f.svc, site)


def _user(f: Fed, name: str, role: Role) -> None:
    _, f.bearer[name] = operator_bearer(f.svc, name, role)


@contextlib.contextmanager
def _database(db: str) -> Iterator[str | None]:
    if db == "sqlite":
        yield None  # the state directory's own SQLite file
    else:
        with postgres_schema() as url:
            yield url


@pytest.fixture(scope="module")
def fed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    """The gated app with the default extensions on ``request.param``'s database: admin ``root``,
    researcher ``rx``, sites ``site-a`` and ``site-b`` enrolled with agent tokens. Tests that change state
    make their own sites and studies (``_fresh_task``), so the module's tests stay independent."""
    db = request.param
    state_dir = tmp_path_factory.mktemp(f"fuzz-{db}")
    with _database(db) as url:
        settings = OrchestratorSettings(
            state_dir=state_dir, signing_key=IdentityKey.generate(), rate_per_s=0, database_url=url
        )
        app = create_app(settings, extensions=default_extensions())
        with TestClient(app, base_url="https://testserver", raise_server_exceptions=False) as client:
            f = Fed(db=db, client=client, svc=app.state.services, state_dir=state_dir)
            _user(f, "root", Role.ADMIN)
            _user(f, "rx", Role.RESEARCHER)
            for site in ("site-a", "site-b"):
                _enroll(f, site)
            yield f


def _on(databases: list[Any]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("fed", databases, indirect=True)


# --- what a refusal must look like, and what it must leave alone -----------------------------------------


def _refused(answer: Any, allowed: set[int] = REFUSED, *, max_len: int = 1000) -> dict[str, Any]:
    """A clear refusal: an allowed 4xx, the one error shape, a one-line reason (of at most ``max_len``)."""
    where = (
        f"{answer.request.method} {answer.request.url.path[:120]}: {answer.status_code} {answer.text[:300]!r}"
    )
    assert answer.status_code in allowed, where
    body = answer.json()
    assert set(body) == {"error", "detail"}, where
    error = body["error"]
    assert isinstance(error, str), where
    assert error.strip(), where
    assert "\n" not in error, where
    assert len(error) <= max_len, where
    return body  # type: ignore[no-any-return]


def _tables(f: Fed) -> dict[str, list[tuple[str, ...]]]:
    """Every row of every table of the orchestrator's database (the audit log's included), as text."""
    meta = sa.MetaData()
    meta.reflect(bind=f.engine)
    with f.engine.connect() as c:
        return {
            t.name: sorted(tuple(repr(v) for v in row) for row in c.execute(sa.select(t)))
            for t in meta.sorted_tables
        }


def _blobs(f: Fed) -> set[str]:
    root = f.state_dir / "blobs"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@dataclass(frozen=True)
class Snapshot:
    tables: dict[str, list[tuple[str, ...]]]
    blobs: set[str]


def _snapshot(f: Fed) -> Snapshot:
    return Snapshot(tables=_tables(f), blobs=_blobs(f))


def _unchanged(f: Fed, before: Snapshot, *, ignore: tuple[str, ...] = ()) -> None:
    after = _snapshot(f)
    changed = [
        name
        for name in before.tables.keys() | after.tables.keys()
        if name not in ignore
        if before.tables.get(name) != after.tables.get(name)
    ]
    assert changed == [], f"a refused request changed the tables {sorted(changed)}"
    assert after.blobs == before.blobs, "a refused request changed the blob store"


def _audit_types(f: Fed) -> list[str]:
    with f.engine.connect() as c:
        return [t for (t,) in c.execute(sa.text("SELECT type FROM gov_audit_entries ORDER BY seq"))]


# --- JSON bodies on every JSON route -----------------------------------------------------------------------

# (caller, method, path): None is anonymous (login routes); a task id is filled in per test
JSON_ROUTES: list[tuple[str | None, str, str]] = [
    ("root", "POST", "/api/v1/sites"),
    ("root", "POST", "/api/v1/users"),
    ("root", "PUT", "/api/v1/governance/owner-keys/rx"),
    ("rx", "POST", "/api/v1/studies"),
    ("rx", "POST", "/api/v1/governance/studies"),
    ("rx", "POST", "/api/v1/privacy/plan"),
    ("rx", "PUT", "/api/v1/governance/owner-key"),
    ("site-a", "POST", "/api/v1/agent/approvals"),
    ("site-a", "POST", "/api/v1/agent/readiness"),
    ("site-a", "POST", "/api/v1/agent/tasks/{task}/evaluation"),
    ("site-a", "POST", "/api/v1/agent/tasks/{task}/failure"),
    ("site-a", "POST", "/api/v1/agent/governance/withdrawals"),
    (None, "POST", "/api/v1/enroll"),
    (None, "POST", "/api/v1/agent/challenge"),
    (None, "POST", "/api/v1/agent/token"),
    (None, "POST", "/api/v1/auth/token"),
]

JSON = {"content-type": "application/json"}
DEEP = b"[" * 10_000 + b"]" * 10_000
HOSTILE_BODIES: dict[str, tuple[bytes, dict[str, str]]] = {
    "array": (b"[1, 2, 3]", JSON),
    "string": (b'"a string"', JSON),
    "null": (b"null", JSON),
    "number": (b"12", JSON),
    "empty": (b"", JSON),
    "truncated": (b'{"name": "abc', JSON),
    "deep-array": (DEEP, JSON),
    "deep-in-object": (b'{"name": ' + DEEP + b"}", JSON),
    "not-utf8": (b'{"name": "\xff\xfe"}', JSON),
    "lone-surrogate": (b'{"name": "\\ud800", "\\udfff": 1}', JSON),
    "nan": (b'{"name": NaN, "x": Infinity, "y": -Infinity}', JSON),
    "1e999": (b'{"name": 1e999}', JSON),
    "2**70": (b'{"name": ' + str(2**70).encode() + b"}", JSON),
    "5000-digits": (b'{"name": ' + b"9" * 5000 + b"}", JSON),
    "duplicate-junk-keys": (b'{"zz": 1, "zz": 2, "zz": {"a": [NaN]}}', JSON),
    "form-encoded": (b"name=abc&role=admin", {"content-type": "application/x-www-form-urlencoded"}),
    "text-plain-json": (b'{"name": "zzz"}', {"content-type": "text/plain"}),
    "nul-bytes": (b'{"name": "\\u0000", "\\u0000": "\\u0000"}', JSON),
}


def _fresh_task(
    f: Fed, *, sites: int = 2, min_sites: int = 1, rounds: int = 2
) -> tuple[list[str], Task, str]:
    """New sites and a running study over them (its spec approved by each); the first site's round-1 task
    as delivered to it, and the study id."""
    names = [f.unique("ft") for _ in range(sites)]
    for name in names:
        _enroll(f, name)
    spec = StudySpec.model_validate(
        {
            "name": f.unique("study"),
            "owner": "rx",
            "dataset": "none",
            "recipe": synthetic_recipe(16),
            "rounds": rounds,
            "train_sites": names,
            "min_sites": min_sites,
            "round_deadline_s": 600.0,
            "seed": 3,
        }
    ).model_dump(mode="json")
    study = f.call("rx", "POST", "/api/v1/studies", json=spec)
    assert study.status_code == 201, study.text
    for name in names:
        body = {"spec_hash": study.json()["spec_hash"], "state": "approved"}
        assert f.call(name, "POST", "/api/v1/agent/approvals", json=body).status_code == 200
    task = _poll(f, names[0])
    assert task is not None
    return names, task, study.json()["study_id"]


def _poll(f: Fed, site: str, wait: float = 5.0) -> Task | None:
    answer = f.call(site, "GET", "/api/v1/agent/tasks/next", params={"wait": wait})
    assert answer.status_code == 200, answer.text
    found = answer.json()["task"]
    return None if found is None else Task.model_validate(found)


@pytest.fixture(scope="module")
def open_task(fed: Fed) -> str:
    """An open training task of site-a (the evaluation and failure routes are tried against it: a body
    that slipped through would close it, which the snapshot would show)."""
    names = ["site-a", "site-b"]
    spec = StudySpec.model_validate(
        {
            "name": "target",
            "owner": "rx",
            "dataset": "none",
            "recipe": synthetic_recipe(16),
            "rounds": 2,
            "train_sites": names,
            "round_deadline_s": 600.0,
        }
    ).model_dump(mode="json")
    study = fed.call("rx", "POST", "/api/v1/studies", json=spec)
    assert study.status_code == 201, study.text
    for name in names:
        body = {"spec_hash": study.json()["spec_hash"], "state": "approved"}
        assert fed.call(name, "POST", "/api/v1/agent/approvals", json=body).status_code == 200
    task = _poll(fed, "site-a")
    assert task is not None
    return task.task_id


@_on(["sqlite"])  # parsed and refused before any query: the database does not matter
@pytest.mark.parametrize("body", list(HOSTILE_BODIES), ids=list(HOSTILE_BODIES))
def test_every_json_route_refuses_hostile_json_clearly_and_stores_nothing(
    fed: Fed, open_task: str, body: str
) -> None:
    content, headers = HOSTILE_BODIES[body]
    before = _snapshot(fed)
    wrong = []
    for caller, method, template in JSON_ROUTES:
        path = template.format(task=open_task)
        answer = fed.call(caller, method, path, content=content, headers=headers)
        try:
            _refused(answer, {400, 401, 422})
        except AssertionError as exc:
            wrong.append(str(exc).splitlines()[0])
    assert wrong == [], "\n".join(wrong)
    # login routes may leave nothing either: no challenge, no token spent
    _unchanged(fed, before)


@_on(DATABASES)
def test_duplicate_keys_take_one_value_and_the_answer_says_which(fed: Fed) -> None:
    """JSON with a repeated key is parsed one way only: the site registered is the one the answer names,
    and exactly one row and one audit entry were written."""
    first, last = fed.unique("dup"), fed.unique("dup")
    before = {s.name for s in fed.svc.store.list_sites()}
    audit = len(_audit_types(fed))
    content = json.dumps({"name": first})[:-1] + f', "name": "{last}"}}'
    answer = fed.call("root", "POST", "/api/v1/sites", content=content.encode(), headers=JSON)
    assert answer.status_code == 201, answer.text
    added = {s.name for s in fed.svc.store.list_sites()} - before
    assert added == {answer.json()["name"]}
    assert _audit_types(fed)[audit:] == [
        AuditEventType.SITE_CREATED.value,
        AuditEventType.SITE_TOKEN_ISSUED.value,
    ]


# --- each route's own fields pushed past their bounds -----------------------------------------------------


def _spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "bounds",
        "owner": "rx",
        "dataset": "none",
        "recipe": synthetic_recipe(16).model_dump(mode="json"),
        "rounds": 2,
        "train_sites": ["site-a", "site-b"],
        "min_sites": 1,
        "round_deadline_s": 600.0,
        "seed": 3,
    }
    spec.update(overrides)
    return spec


def _recipe(**params: Any) -> dict[str, Any]:
    return {"name": "synthetic", "version": "1", "params": {"n_params": 16, **params}}


def _readiness(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "site": "site-a",
        "checked_at": "2026-01-01T00:00:00Z",
        "software_version": "1.0",
        "protocol_version": 1,
        "ready": True,
        "checks": [],
    }
    body.update(overrides)
    return body


BIG = 2**70
MB = "x" * (1 << 20)
FIELD_CASES: dict[str, tuple[str | None, str, str, Any, set[int]]] = {
    # sites and users (admin)
    "site-name-nul": ("root", "POST", "/api/v1/sites", {"name": "a\x00b"}, {422}),
    "site-name-1mb": ("root", "POST", "/api/v1/sites", {"name": MB}, {413}),
    "site-name-2**70": ("root", "POST", "/api/v1/sites", {"name": BIG}, {422}),
    "site-name-dots": ("root", "POST", "/api/v1/sites", {"name": ".."}, {422}),
    "site-extra-field": ("root", "POST", "/api/v1/sites", {"name": "zz1", "status": "active"}, {422}),
    "user-role-site": ("root", "POST", "/api/v1/users", {"name": "zz2", "role": "site"}, {422}),
    "user-role-2**70": ("root", "POST", "/api/v1/users", {"name": "zz3", "role": BIG}, {422}),
    "user-name-surrogate": ("root", "POST", "/api/v1/users", {"name": "\ud800", "role": "auditor"}, {422}),
    "owner-key-nul": ("root", "PUT", "/api/v1/governance/owner-keys/rx", {"public_key": "\x00" * 64}, {422}),
    # studies (researcher): ints past 64 bits, non-finite floats, long and odd strings
    "rounds-2**70": ("rx", "POST", "/api/v1/studies", _spec(rounds=BIG), {422}),
    "rounds-negative": ("rx", "POST", "/api/v1/studies", _spec(rounds=-1), {422}),
    "seed-2**70": ("rx", "POST", "/api/v1/studies", _spec(seed=BIG), {422}),
    "min-sites-2**70": ("rx", "POST", "/api/v1/studies", _spec(min_sites=BIG), {422}),
    "deadline-nan": ("rx", "POST", "/api/v1/studies", _spec(round_deadline_s=float("nan")), {422}),
    "deadline-inf": ("rx", "POST", "/api/v1/studies", _spec(round_deadline_s=float("inf")), {422}),
    "weight-cap-2**70": ("rx", "POST", "/api/v1/studies", _spec(strategy={"weight_cap": BIG}), {422}),
    "max-norm-inf": (
        "rx",
        "POST",
        "/api/v1/studies",
        _spec(strategy={"max_update_norm": float("inf")}),
        {422},
    ),
    "n-params-2**70": ("rx", "POST", "/api/v1/studies", _spec(recipe=_recipe(n_params=BIG)), {422}),
    "params-nan": ("rx", "POST", "/api/v1/studies", _spec(recipe=_recipe(x=[1.0, float("nan")])), {422}),
    "params-deep-900": (
        "rx",
        "POST",
        "/api/v1/studies",
        json.dumps(_spec(recipe=_recipe(x="DEEP"))).replace('"DEEP"', "[" * 900 + "]" * 900).encode(),
        {400, 422},
    ),
    "description-1mb": ("rx", "POST", "/api/v1/studies", _spec(description=MB), {422}),
    "name-nul": ("rx", "POST", "/api/v1/studies", _spec(name="s\x00"), {422}),
    "name-64-chars": ("rx", "POST", "/api/v1/studies", _spec(name="s" * 64), {422}),
    "site-list-10001": (
        "rx",
        "POST",
        "/api/v1/studies",
        _spec(train_sites=[f"s{i}" for i in range(10_001)]),
        {422},
    ),
    "unknown-site-nul": ("rx", "POST", "/api/v1/studies", _spec(train_sites=["site-a", "\x00"]), {422}),
    "other-owner": ("rx", "POST", "/api/v1/studies", _spec(owner="root"), {422}),
    "secagg-threshold-2**70": (
        "rx",
        "POST",
        "/api/v1/studies",
        _spec(secure_aggregation={"site_keys": {"site-a": "0" * 64, "site-b": "1" * 64}, "threshold": BIG}),
        {422},
    ),
    "signed-study-bad-signature": (
        "rx",
        "POST",
        "/api/v1/governance/studies",
        {"spec": _spec(), "signature": "\x00" * 128},
        {422},
    ),
    "privacy-steps-2**70": (
        "rx",
        "POST",
        "/api/v1/privacy/plan",
        _spec(privacy={"mode": "record", "delta": 1e-5, "noise_multiplier": 1.0, "steps_per_round": BIG}),
        {422},
    ),
    "privacy-delta-nan": (
        "rx",
        "POST",
        "/api/v1/privacy/plan",
        _spec(privacy={"mode": "record", "delta": float("nan"), "noise_multiplier": 1.0}),
        {422},
    ),
    "privacy-epsilon-inf": (
        "rx",
        "POST",
        "/api/v1/privacy/plan",
        _spec(privacy={"mode": "record", "delta": 1e-5, "target_epsilon": float("inf")}),
        {422},
    ),
    # the agent API (a site)
    "approval-hash-nul": (
        "site-a",
        "POST",
        "/api/v1/agent/approvals",
        {"spec_hash": "\x00" * 64, "state": "approved"},
        {422},
    ),
    "approval-hash-upper": (
        "site-a",
        "POST",
        "/api/v1/agent/approvals",
        {"spec_hash": "A" * 64, "state": "approved"},
        {422},
    ),
    "approval-state-2**70": (
        "site-a",
        "POST",
        "/api/v1/agent/approvals",
        {"spec_hash": "a" * 64, "state": BIG},
        {422},
    ),
    "readiness-nan": (
        "site-a",
        "POST",
        "/api/v1/agent/readiness",
        _readiness(checks=[{"name": "x", "status": "ok", "value": float("nan")}]),
        {422},
    ),
    "readiness-201-checks": (
        "site-a",
        "POST",
        "/api/v1/agent/readiness",
        _readiness(checks=[{"name": f"c{i}", "status": "ok"} for i in range(201)]),
        {422},
    ),
    "readiness-other-site": ("site-a", "POST", "/api/v1/agent/readiness", _readiness(site="site-b"), {403}),
    "readiness-protocol-0": (
        "site-a",
        "POST",
        "/api/v1/agent/readiness",
        _readiness(protocol_version=0),
        {422},
    ),
    "evaluation-samples-2**70": (
        "site-a",
        "POST",
        "/api/v1/agent/tasks/{task}/evaluation",
        {"task_id": "{task}", "metrics": {"num_samples": BIG}},
        {422},
    ),
    "evaluation-loss-nan": (
        "site-a",
        "POST",
        "/api/v1/agent/tasks/{task}/evaluation",
        {"task_id": "{task}", "metrics": {"num_samples": 1, "train_loss": float("nan")}},
        {422},
    ),
    "evaluation-on-a-train-task": (
        "site-a",
        "POST",
        "/api/v1/agent/tasks/{task}/evaluation",
        {"task_id": "{task}", "metrics": {"num_samples": 1}},
        {409},
    ),
    "evaluation-other-task": (
        "site-a",
        "POST",
        "/api/v1/agent/tasks/{task}/evaluation",
        {"task_id": "tk-other", "metrics": {"num_samples": 1}},
        {409, 422},
    ),
    "failure-free-text": (
        "site-a",
        "POST",
        "/api/v1/agent/tasks/{task}/failure",
        {"code": "patient 1234 at /data/x.csv"},
        {422},
    ),
    "failure-code-2**70": ("site-a", "POST", "/api/v1/agent/tasks/{task}/failure", {"code": BIG}, {422}),
    "withdrawal-10001": (
        "site-a",
        "POST",
        "/api/v1/agent/governance/withdrawals",
        {"notice_id": "n", "purpose": "p", "withdrawn_at": "t", "snapshot_hashes": ["a" * 64] * 10_001},
        {422},
    ),
    "withdrawal-long-purpose": (
        "site-a",
        "POST",
        "/api/v1/agent/governance/withdrawals",
        {"notice_id": "n", "purpose": "p" * 201, "withdrawn_at": "t", "snapshot_hashes": []},
        {422},
    ),
    # login routes (anonymous)
    "enroll-token-nul": (
        None,
        "POST",
        "/api/v1/enroll",
        {"site": "site-a", "token": "\x00" * 32, "public_key": "0" * 64},
        {401, 409, 422},
    ),
    "enroll-key-not-hex": (
        None,
        "POST",
        "/api/v1/enroll",
        {"site": "site-a", "token": "t" * 32, "public_key": "g" * 64},
        {422},
    ),
    "challenge-site-nul": (None, "POST", "/api/v1/agent/challenge", {"site": "site-a\x00"}, {422}),
    "agent-token-2**70": (
        None,
        "POST",
        "/api/v1/agent/token",
        {"site": "site-a", "challenge": "00", "signature": BIG},
        {422},
    ),
    "operator-key-nul": (None, "POST", "/api/v1/auth/token", {"user": "root", "api_key": "\x00" * 32}, {401}),
    "operator-user-nul": (
        None,
        "POST",
        "/api/v1/auth/token",
        {"user": "ro\x00ot", "api_key": "k" * 32},
        {422},
    ),
}


def _fill(value: Any, task: str) -> Any:
    if isinstance(value, str):
        return value.replace("{task}", task)
    if isinstance(value, dict):
        return {k: _fill(v, task) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, task) for v in value]
    return value


def _encode(body: Any) -> bytes:
    # Python's json writes NaN/Infinity literals (what a hostile client would send) and keeps big ints
    return body if isinstance(body, bytes) else json.dumps(body).encode()


@_on(DATABASES)
@pytest.mark.parametrize("case", list(FIELD_CASES), ids=list(FIELD_CASES))
def test_each_routes_fields_past_their_bounds_are_refused_clearly_and_store_nothing(
    fed: Fed, open_task: str, case: str
) -> None:
    caller, method, template, body, allowed = FIELD_CASES[case]
    before = _snapshot(fed)
    answer = fed.call(
        caller, method, template.format(task=open_task), content=_encode(_fill(body, open_task)), headers=JSON
    )
    _refused(answer, allowed)
    _unchanged(fed, before)


@_on(DATABASES)
@pytest.mark.parametrize("site", ["unknown", "revoked"])
def test_a_study_refused_for_its_sites_leaves_nothing_in_the_blob_store(fed: Fed, site: str) -> None:
    other = fed.unique("zz")
    if site == "revoked":
        _enroll(fed, other)
        assert fed.call("root", "POST", f"/api/v1/sites/{other}/revoke").status_code == 200
    before = _snapshot(fed)
    spec = _spec(name=fed.unique("orphan"), train_sites=["site-a", other], seed=1000 + next(fed.names))
    answer = fed.call("rx", "POST", "/api/v1/studies", json=spec)
    assert _refused(answer, {422})["error"] == "invalid study"
    _unchanged(fed, before)


@_on(DATABASES)
def test_nul_and_control_characters_in_free_text_round_trip_exactly(fed: Fed) -> None:
    """Free-text fields that accept any character (a study's description, a readiness note) store a NUL
    byte and a control character as they came, on PostgreSQL too (in JSON text, escaped), and read back
    the same."""
    text = "a\x00b\x1bc\u2028d"
    # (a software version is no free text: it must look like a version, test_site_report_poisoning_attacks)
    readiness = _readiness(checks=[{"name": "x", "status": "ok", "note": text}])
    answer = fed.call("site-a", "POST", "/api/v1/agent/readiness", json=readiness)
    assert answer.status_code == 200, answer.text
    listed = fed.call("root", "GET", "/api/v1/sites/readiness").json()
    mine = next(r for r in listed if r["site"] == "site-a")["readiness"]
    assert mine["checks"][0]["note"] == text
    study = fed.call("rx", "POST", "/api/v1/studies", json=_spec(name=fed.unique("nul"), description=text))
    assert study.status_code == 201, study.text
    again = fed.call("rx", "GET", f"/api/v1/studies/{study.json()['study_id']}")
    assert again.json()["spec"]["description"] == text
    assert fed.call("root", "GET", "/api/v1/governance/audit/verify").json()["ok"] is True


@_on(DATABASES)
def test_a_withdrawal_notice_id_with_a_nul_byte_is_refused_or_stored_whole(fed: Fed) -> None:
    before = _snapshot(fed)
    body = {
        "notice_id": "n\x00",
        "purpose": "research",
        "withdrawn_at": "2026-01-01",
        "snapshot_hashes": ["a" * 64],
    }
    answer = fed.call("site-a", "POST", "/api/v1/agent/governance/withdrawals", json=body)
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        _refused(answer)
        _unchanged(fed, before)
    else:
        assert answer.json() == {"notice_id": "n\x00", "flagged": []}


# --- path parameters --------------------------------------------------------------------------------------

# (caller, method, path template with {id})
ID_ROUTES: list[tuple[str, str, str]] = [
    ("rx", "GET", "/api/v1/studies/{id}"),
    ("rx", "GET", "/api/v1/studies/{id}/report"),
    ("rx", "GET", "/api/v1/studies/{id}/privacy"),
    ("rx", "GET", "/api/v1/studies/{id}/model"),
    ("rx", "POST", "/api/v1/studies/{id}/cancel"),
    ("rx", "GET", "/api/v1/models/{id}"),
    ("rx", "GET", "/api/v1/governance/models/{id}/provenance"),
    ("rx", "GET", "/api/v1/governance/models/{id}/card"),
    ("rx", "GET", "/api/v1/governance/anchors/{id}"),
    ("root", "POST", "/api/v1/sites/{id}/enrollment-token"),
    ("root", "POST", "/api/v1/sites/{id}/rotate"),
    ("root", "POST", "/api/v1/sites/{id}/revoke"),
    ("root", "POST", "/api/v1/users/{id}/api-key"),
    ("root", "POST", "/api/v1/users/{id}/revoke"),
    ("root", "PUT", "/api/v1/governance/owner-keys/{id}"),
    ("site-a", "GET", "/api/v1/agent/models/{id}"),
    ("site-a", "POST", "/api/v1/agent/tasks/{id}/result"),
    ("site-a", "POST", "/api/v1/agent/tasks/{id}/evaluation"),
    ("site-a", "POST", "/api/v1/agent/tasks/{id}/failure"),
    ("site-a", "POST", "/api/v1/agent/tasks/{id}/secagg/advertise_keys"),
    ("site-a", "GET", "/api/v1/agent/tasks/{id}/secagg/advertise_keys"),
    ("site-a", "POST", "/api/v1/agent/tasks/{id}/collective/0"),
    ("site-a", "GET", "/api/v1/agent/tasks/{id}/collective/0"),
]
BODIES: dict[str, Any] = {
    "/evaluation": {"task_id": "x", "metrics": {"num_samples": 1}},
    "/failure": {"code": "invalid_recipe"},
    "/api/v1/governance/owner-keys/": {"public_key": "0" * 64},
}


def _try_ids(f: Fed, value: str) -> list[str]:
    """Call every id route with ``value`` (already percent-encoded) as its id; what went wrong."""
    wrong = []
    for caller, method, template in ID_ROUTES:
        path = template.replace("{id}", value)
        body = next((b for key, b in BODIES.items() if key in template), None)
        kwargs: dict[str, Any] = {"json": body} if body is not None else {"content": b"x" * 16}
        if method == "GET":
            kwargs = {}
        answer = f.call(caller, method, path, params={"wait": "0"}, **kwargs)
        if answer.status_code == 200 and "/anchors/" in template:
            continue  # anchors of an unknown site: an empty list, by design
        try:
            # (a NotFoundError echoes the whole id: 10,000 characters in, 10,000 out; one line, though)
            _refused(answer, {400, 403, 404, 405, 410, 422}, max_len=300)  # an id is cut, not echoed whole
        except AssertionError:
            wrong.append(
                f"{method} {template}: {answer.status_code} ({len(answer.text)} chars) {answer.text[:100]}"
            )
    return wrong


@_on(DATABASES)
def test_a_nul_byte_in_any_id_is_a_clear_not_found_and_changes_nothing(fed: Fed) -> None:
    before = _snapshot(fed)
    wrong = _try_ids(fed, "%00") + _try_ids(fed, "st%00x")
    assert wrong == [], "\n".join(wrong)
    _unchanged(fed, before)


@_on(DATABASES)
@pytest.mark.parametrize(
    "value",
    [
        "x" * 10_000,
        "%2E%2E",
        "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "%ED%A0%80",
        "%C0%80",
        "%FF%FE",
        "%E2%80%AE",
        "%20",
    ],
    ids=[
        "10000-chars",
        "dot-dot",
        "encoded-traversal",
        "surrogate-utf8",
        "overlong-nul",
        "not-utf8",
        "rtl",
        "space",
    ],
)
def test_odd_ids_get_a_clear_not_found_and_change_nothing(fed: Fed, value: str) -> None:
    before = _snapshot(fed)
    wrong = _try_ids(fed, value)
    assert wrong == [], "\n".join(wrong)
    _unchanged(fed, before)


# --- query parameters -------------------------------------------------------------------------------------

QUERIES: list[tuple[str, str, str, dict[str, str]]] = [
    ("site-a", "GET", "/api/v1/agent/tasks/next", {"wait": "-1"}),
    ("site-a", "GET", "/api/v1/agent/tasks/next", {"wait": "1000000000000"}),
    ("site-a", "GET", "/api/v1/agent/tasks/next", {"wait": "nan"}),
    ("site-a", "GET", "/api/v1/agent/tasks/next", {"wait": "inf"}),
    ("site-a", "GET", "/api/v1/agent/tasks/next", {"wait": "1e999"}),
    ("site-a", "GET", "/api/v1/agent/tasks/next", {"wait": "0x10"}),
    ("site-a", "GET", "/api/v1/agent/tasks/next", {"wait": "\x00"}),
    ("site-a", "GET", "/api/v1/agent/probe", {"size": "-1"}),
    ("site-a", "GET", "/api/v1/agent/probe", {"size": str(10**12)}),
    ("site-a", "GET", "/api/v1/agent/probe", {"size": str(2**70)}),
    ("site-a", "GET", "/api/v1/agent/probe", {"size": "9" * 5000}),
    ("site-a", "GET", "/api/v1/agent/probe", {"size": "1.5"}),
    ("site-a", "GET", "/api/v1/agent/tasks/tk-x/secagg/advertise_keys", {"wait": "-0.1"}),
    ("site-a", "GET", "/api/v1/agent/tasks/tk-x/collective/0", {"wait": "nan"}),
    ("rx", "GET", "/api/v1/studies", {"status": "\x00"}),
    ("rx", "GET", "/api/v1/studies", {"status": "RUNNING"}),
    ("rx", "GET", "/api/v1/governance/models/abcdef01/provenance", {"format": "xml"}),
    ("rx", "GET", "/api/v1/governance/models/abcdef01/card", {"intended_use": "u" * 4001}),
    ("rx", "POST", "/api/v1/studies", {"approval_wait_s": "-1"}),
    ("rx", "POST", "/api/v1/studies", {"approval_wait_s": "0"}),
    ("rx", "POST", "/api/v1/studies", {"approval_wait_s": "nan"}),
    ("rx", "POST", "/api/v1/studies", {"approval_wait_s": str(10**12)}),
    ("rx", "POST", "/api/v1/governance/studies", {"approval_wait_s": "inf"}),
]


@_on(["sqlite"])  # answered before any query reaches the database
def test_query_parameters_out_of_range_are_refused_at_once(fed: Fed) -> None:
    before = _snapshot(fed)
    wrong = []
    for caller, method, path, params in QUERIES:
        body = {"json": _spec(name=fed.unique("q"))} if method == "POST" else {}
        if path.endswith("/governance/studies"):
            body = {"json": {"spec": _spec(name=fed.unique("q")), "signature": "0" * 128}}
        answer = fed.call(caller, method, path, params=params, **body)
        try:
            _refused(answer, {404, 410, 422})
        except AssertionError as exc:
            wrong.append(f"{method} {path} {str(params)[:60]}: {str(exc).splitlines()[0][-200:]}")
    assert wrong == [], "\n".join(wrong)
    _unchanged(fed, before)


# --- training results -------------------------------------------------------------------------------------


def _update(
    task: Task, fill: float = 0.01, *, dtype: Any = np.float32, manifest: Any = None, **shape: Any
) -> bytes:
    delta = {s.name: np.full(shape.get(s.name, s.shape), fill, dtype=dtype) for s in param_specs(task.recipe)}
    if manifest is None:
        manifest = ResultManifest(task_id=task.task_id, metrics=SiteMetrics(num_samples=10))
    if isinstance(manifest, ResultManifest):
        return encode_update(delta, manifest)
    return encode_tensors(delta, {RESULT_METADATA_KEY: manifest})


def _raw_safetensors(header: Any, data: bytes = b"\0" * 64) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text)) + text + data


def _manifest_json(task: Task, **metrics: Any) -> str:
    return json.dumps({"task_id": task.task_id, "metrics": {"num_samples": 10, **metrics}})


# case -> a function of the task giving the body
BAD_UPLOADS: dict[str, Callable[[Task], bytes]] = {
    "wrong-shape": lambda t: _update(t, weight=(17,)),
    "wrong-rank": lambda t: _update(t, weight=(4, 4)),
    "float64": lambda t: _update(t, dtype=np.float64),
    "int32": lambda t: _update(t, dtype=np.int32),
    "nan": lambda t: _update(t, float("nan")),
    "inf": lambda t: _update(t, float("inf")),
    "-inf": lambda t: _update(t, float("-inf")),
    "truncated-data": lambda t: _update(t)[:-7],
    "truncated-header": lambda t: _update(t)[:20],
    "only-length": lambda t: struct.pack("<Q", 100),
    "empty": lambda t: b"",
    "garbage": lambda t: b"\x89PNG\r\n\x1a\n" + b"\xff" * 200,
    "header-length-2**63": lambda t: struct.pack("<Q", 2**63) + b"{}",
    "header-not-json": lambda t: _raw_safetensors(b"{not json" + b" " * 8),
    "header-an-array": lambda t: _raw_safetensors([1, 2, 3]),
    "header-deep": lambda t: _raw_safetensors(b"[" * 100_000 + b"]" * 100_000),
    "header-not-utf8": lambda t: _raw_safetensors(b'{"\xff": 1}'),
    "offsets-past-the-end": lambda t: _raw_safetensors(
        {"weight": {"dtype": "F32", "shape": [16], "data_offsets": [0, 2**40]}}
    ),
    "shape-2**70": lambda t: _raw_safetensors(
        {"weight": {"dtype": "F32", "shape": [2**70], "data_offsets": [0, 64]}}
    ),
    "negative-offsets": lambda t: _raw_safetensors(
        {"weight": {"dtype": "F32", "shape": [16], "data_offsets": [-64, 0]}}
    ),
    "metadata-not-strings": lambda t: _raw_safetensors(
        {"weight": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}, "__metadata__": {"k": 1}}
    ),
    "missing-tensor": lambda t: encode_tensors(
        {"other": np.zeros(16, np.float32)},
        {RESULT_METADATA_KEY: _manifest_json(t)},
    ),
    "extra-tensor": lambda t: encode_tensors(
        {"weight": np.zeros(16, np.float32), "extra": np.zeros(1, np.float32)},
        {RESULT_METADATA_KEY: _manifest_json(t)},
    ),
    "no-manifest": lambda t: encode_tensors({"weight": np.zeros(16, np.float32)}),
    "manifest-not-json": lambda t: _update(t, manifest="{not json"),
    "manifest-deep": lambda t: _update(t, manifest="[" * 10_000 + "]" * 10_000),
    "manifest-for-another-task": lambda t: _update(
        t, manifest=ResultManifest(task_id="tk_someone_else", metrics=SiteMetrics(num_samples=10))
    ),
    "manifest-without-metrics": lambda t: _update(
        t, manifest=ResultManifest(task_id=t.task_id, metrics=None)
    ),
    "manifest-samples-2**70": lambda t: _update(
        t, manifest=json.dumps({"task_id": t.task_id, "metrics": {"num_samples": 2**70}})
    ),
    "manifest-loss-nan": lambda t: _update(t, manifest=_manifest_json(t, train_loss=float("nan"))),
    "manifest-extra-field": lambda t: _update(
        t, manifest=json.dumps({"task_id": t.task_id, "metrics": {"num_samples": 1}, "weight_override": 1e9})
    ),
}


def _rejected_exactly(f: Fed, before: Snapshot, task: Task) -> None:
    """The documented effect of an invalid update: its task closed as rejected with the reason, nothing
    else in the database, no update kept in the blob store."""
    row = f.svc.store.get_task(task.task_id)
    assert row.status is TaskStatus.REJECTED
    assert row.reason
    assert row.result_digest is None
    after = _snapshot(f)
    assert after.blobs == before.blobs, "a rejected update was kept in the blob store"
    changed = sorted(n for n in after.tables if after.tables[n] != before.tables.get(n))
    assert set(changed) <= {"tasks", "gov_audit_entries"}, changed
    gone = set(before.tables["tasks"]) - set(after.tables["tasks"])
    assert len(gone) == 1, "other tasks changed too"
    prefix = before.tables["gov_audit_entries"]
    assert set(prefix) <= set(after.tables["gov_audit_entries"]), "the audit log lost entries"


@_on(["sqlite"])  # decoded and refused before the task row is touched (once, the same on both)
@pytest.mark.parametrize("case", list(BAD_UPLOADS), ids=list(BAD_UPLOADS))
def test_an_invalid_update_is_a_clear_422_that_rejects_only_its_task(fed: Fed, case: str) -> None:
    sites, task, _ = _fresh_task(fed)
    before = _snapshot(fed)
    answer = fed.call(
        sites[0], "POST", f"/api/v1/agent/tasks/{task.task_id}/result", content=BAD_UPLOADS[case](task)
    )
    body = _refused(answer, {422})
    assert body["error"] == "invalid update"
    assert isinstance(body["detail"], str)
    assert body["detail"]
    _rejected_exactly(fed, before, task)
    # the round goes on with the other site: its valid update is taken
    other = _poll(fed, sites[1])
    assert other is not None
    ok = fed.call(sites[1], "POST", f"/api/v1/agent/tasks/{other.task_id}/result", content=_update(other))
    assert ok.status_code == 200, ok.text


@_on(DATABASES)
@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}], ids=["list", "object"])
def test_a_safetensors_header_with_an_unhashable_dtype_is_a_clear_422(fed: Fed, dtype: Any) -> None:
    sites, task, _ = _fresh_task(fed)
    before = _snapshot(fed)
    header = {
        "weight": {"dtype": dtype, "shape": [16], "data_offsets": [0, 64]},
        "__metadata__": {RESULT_METADATA_KEY: _manifest_json(task)},
    }
    answer = fed.call(
        sites[0], "POST", f"/api/v1/agent/tasks/{task.task_id}/result", content=_raw_safetensors(header)
    )
    _refused(answer, {422})
    _rejected_exactly(fed, before, task)


@_on(DATABASES)
def test_an_update_over_the_models_size_is_413_and_the_task_stays_open_for_a_good_one(fed: Fed) -> None:
    sites, task, _ = _fresh_task(fed)
    before = _snapshot(fed)
    too_big = _update(task) + b"\0" * ((1 << 20) + 1024)
    answer = fed.call(sites[0], "POST", f"/api/v1/agent/tasks/{task.task_id}/result", content=too_big)
    _refused(answer, {413})
    _unchanged(fed, before)
    assert fed.svc.store.get_task(task.task_id).is_open
    good = fed.call(sites[0], "POST", f"/api/v1/agent/tasks/{task.task_id}/result", content=_update(task))
    assert good.status_code == 200, good.text


@_on(DATABASES)
def test_a_second_upload_is_idempotent_for_the_same_bytes_and_409_for_others(fed: Fed) -> None:
    sites, task, _ = _fresh_task(fed, sites=2, min_sites=2)
    path = f"/api/v1/agent/tasks/{task.task_id}/result"
    first = _update(task, 0.01)
    assert fed.call(sites[0], "POST", path, content=first).status_code == 200
    stored = fed.svc.store.get_task(task.task_id)
    before = _snapshot(fed)
    again = fed.call(sites[0], "POST", path, content=first)
    assert again.status_code == 200, again.text
    assert again.json()["detail"] == "already stored"
    other = fed.call(sites[0], "POST", path, content=_update(task, 0.02))
    _refused(other, {409})
    bad = fed.call(sites[0], "POST", path, content=_update(task, float("nan")))
    _refused(bad, {409})
    _unchanged(fed, before)
    after = fed.svc.store.get_task(task.task_id)
    assert (after.status, after.result_digest) == (TaskStatus.COMPLETED, stored.result_digest)


def _at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls in threads released together; their answers in order."""
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return out


@_on(DATABASES)
def test_two_different_uploads_for_one_task_at_once_store_exactly_one(fed: Fed) -> None:
    sites, task, _ = _fresh_task(fed, sites=2, min_sites=2)
    path = f"/api/v1/agent/tasks/{task.task_id}/result"
    bodies = [_update(task, 0.01 * (i + 1)) for i in range(4)]
    updates_before = {b for b in _blobs(fed) if b.startswith("update")}
    answers = _at_once([lambda b=b: fed.call(sites[0], "POST", path, content=b) for b in bodies])
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 409, 409, 409], [a.text for a in answers]
    for a in answers:
        if a.status_code == 409:
            _refused(a, {409})
    winner = bodies[next(i for i, a in enumerate(answers) if a.status_code == 200)]
    digest = hashlib.sha256(winner).hexdigest()
    row = fed.svc.store.get_task(task.task_id)
    assert (row.status, row.result_digest) == (TaskStatus.COMPLETED, digest)
    kept = {b for b in _blobs(fed) if b.startswith("updates/")} - updates_before
    assert f"updates/{digest[:2]}/{digest}" in kept
    assert not any(".upload." in b for b in kept), "temporary upload files were left"


@_on(DATABASES)
def test_the_loser_of_two_concurrent_uploads_leaves_no_update_behind(fed: Fed) -> None:
    """The race made deterministic: both uploads are handed to the handler, both bodies are in, and both
    are released together (the HTTP version above shows the same, most of the time)."""
    sites, task, _ = _fresh_task(fed, sites=2, min_sites=2)
    bodies = [_update(task, 0.01), _update(task, 0.02)]
    updates_before = {b for b in _blobs(fed) if b.startswith("updates/")}

    async def race() -> list[Any]:
        import asyncio

        go = asyncio.Event()

        async def body(data: bytes) -> Any:
            yield data
            await go.wait()  # the whole body is in; the upload ends when both have got this far

        async def upload(data: bytes) -> Any:
            try:
                return await accept_result(fed.svc, sites[0], task.task_id, body(data))
            except ApiError as exc:
                return exc

        runs = [asyncio.ensure_future(upload(b)) for b in bodies]
        await asyncio.sleep(0.2)
        go.set()
        return list(await asyncio.gather(*runs))

    outcomes = fed.client.portal.call(race)
    statuses = sorted(getattr(o, "status", 200) for o in outcomes)
    assert statuses == [200, 409], outcomes
    digest = fed.svc.store.get_task(task.task_id).result_digest
    kept = {b for b in _blobs(fed) if b.startswith("updates/")} - updates_before
    assert kept == {f"updates/{digest[:2]}/{digest}"}, "the refused upload was kept"


@_on(DATABASES)
def test_an_upload_after_its_study_was_cancelled_is_409_and_changes_nothing(fed: Fed) -> None:
    sites, task, study_id = _fresh_task(fed)
    cancelled = fed.call("rx", "POST", f"/api/v1/studies/{study_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    before = _snapshot(fed)
    for body in (_update(task), _update(task, float("nan")), b"garbage"):
        answer = fed.call(sites[0], "POST", f"/api/v1/agent/tasks/{task.task_id}/result", content=body)
        _refused(answer, {409})
    failure = fed.call(
        sites[0], "POST", f"/api/v1/agent/tasks/{task.task_id}/failure", json={"code": "invalid_recipe"}
    )
    assert failure.status_code == 200  # a closed task stays as it is
    again = fed.call("rx", "POST", f"/api/v1/studies/{study_id}/cancel")
    _refused(again, {409})
    _unchanged(fed, before)


@_on(DATABASES)
def test_a_site_revoked_mid_round_is_refused_and_the_round_goes_on_without_it(fed: Fed) -> None:
    sites, task, _ = _fresh_task(fed, sites=2, min_sites=1)
    other = _poll(fed, sites[1])
    assert other is not None
    audit = len(_audit_types(fed))
    revoked = fed.call("root", "POST", f"/api/v1/sites/{sites[0]}/revoke")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked"
    before = _snapshot(fed)
    answer = fed.call(sites[0], "POST", f"/api/v1/agent/tasks/{task.task_id}/result", content=_update(task))
    _refused(answer, {401, 403})
    _unchanged(fed, before)
    # a second revocation is answered the same and writes no second entry; the first closed the site's
    # open task (failed, site_revoked), which the audit log records as any task's end
    twice = fed.call("root", "POST", f"/api/v1/sites/{sites[0]}/revoke")
    assert twice.status_code == 200, twice.text
    assert _audit_types(fed)[audit:] == [
        AuditEventType.SITE_REVOKED.value,
        AuditEventType.TASK_COMPLETED.value,
    ]
    # the revoked site is refused in new studies; the other site's update still counts
    spec = _spec(name=fed.unique("rv"), train_sites=sites)
    _refused(fed.call("rx", "POST", "/api/v1/studies", json=spec), {422})
    ok = fed.call(sites[1], "POST", f"/api/v1/agent/tasks/{other.task_id}/result", content=_update(other))
    assert ok.status_code == 200, ok.text
    closed = fed.svc.store.get_task(task.task_id)
    assert (closed.status, closed.reason) == (
        TaskStatus.FAILED,
        "site_revoked: the site was revoked by an admin",
    )


# --- the same thing twice at once -------------------------------------------------------------------------


@_on(DATABASES)
def test_one_site_name_registered_eight_times_at_once_is_one_site_and_one_audit_entry(fed: Fed) -> None:
    name = fed.unique("race")
    audit = len(_audit_types(fed))
    answers = _at_once([lambda: fed.call("root", "POST", "/api/v1/sites", json={"name": name})] * 8)
    codes = sorted(a.status_code for a in answers)
    assert codes == [201] + [409] * 7, [a.text[:200] for a in answers]
    for a in answers[1:]:
        if a.status_code == 409:
            _refused(a, {409})
    assert [s.name for s in fed.svc.store.list_sites()].count(name) == 1
    assert _audit_types(fed)[audit:] == [
        AuditEventType.SITE_CREATED.value,
        AuditEventType.SITE_TOKEN_ISSUED.value,
    ]
    with fed.engine.connect() as c:
        tokens = c.execute(
            sa.text("SELECT count(*) FROM enrollment_tokens WHERE site = :s"), {"s": name}
        ).scalar()
    assert tokens == 1


@_on(DATABASES)
def test_one_user_name_created_eight_times_at_once_is_one_user_with_one_key(fed: Fed) -> None:
    name = fed.unique("urace")
    audit = len(_audit_types(fed))
    body = {"name": name, "role": "auditor"}
    answers = _at_once([lambda: fed.call("root", "POST", "/api/v1/users", json=body)] * 8)
    created = [a for a in answers if a.status_code == 201]
    assert len(created) == 1, [a.text[:200] for a in answers]
    for a in answers:
        if a is not created[0]:
            _refused(a, {409})
    login = fed.call(
        None, "POST", "/api/v1/auth/token", json={"user": name, "api_key": created[0].json()["api_key"]}
    )
    assert login.status_code == 200, login.text
    assert _audit_types(fed)[audit:] == [AuditEventType.USER_CREATED.value]


@_on(DATABASES)
def test_two_studies_of_one_name_submitted_at_once_are_each_stored_whole(fed: Fed) -> None:
    """Study names are not unique; two submitted at once both run, each with its own round 1 and one task
    per site (nothing shared, nothing half-written)."""
    names = [fed.unique("tw") for _ in range(2)]
    for name in names:
        _enroll(fed, name)
    spec = _spec(name=fed.unique("twin"), train_sites=names)
    answers = _at_once([lambda: fed.call("rx", "POST", "/api/v1/studies", json=spec)] * 3)
    assert [a.status_code for a in answers] == [201] * 3, [a.text[:200] for a in answers]
    ids = {a.json()["study_id"] for a in answers}
    assert len(ids) == 3
    assert len({a.json()["spec_hash"] for a in answers}) == 1
    # the sites approve the one hash at once: every study starts, each with its own round and tasks
    spec_hash = answers[0].json()["spec_hash"]
    approvals = _at_once(
        [
            lambda s=s: fed.call(
                s, "POST", "/api/v1/agent/approvals", json={"spec_hash": spec_hash, "state": "approved"}
            )
            for s in names * 2
        ]
    )
    assert [a.status_code for a in approvals] == [200] * 4, [a.text[:200] for a in approvals]
    with fed.engine.connect() as c:
        rows = c.execute(
            sa.text("SELECT count(*) FROM site_approvals WHERE spec_hash = :h"), {"h": spec_hash}
        ).scalar()
    assert rows == 2
    for study_id in ids:
        study = fed.call("rx", "GET", f"/api/v1/studies/{study_id}").json()
        assert study["status"] == "running", study
        rounds = fed.svc.store.rounds_of(study_id)
        assert [r.number for r in rounds] == [1]
        tasks = fed.svc.store.tasks_of_round(rounds[0].id)
        assert sorted(t.site for t in tasks) == sorted(names)


# --- versions an agent states at login ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fed", "protocol"),
    [
        ("sqlite", 2**31),
        ("sqlite", 2**70),
        pytest.param("postgres", 2**31, marks=pytest.mark.postgres),
        pytest.param("postgres", 2**70, marks=pytest.mark.postgres),
    ],
    indirect=["fed"],
)
def test_an_agent_stating_a_huge_protocol_version_gets_a_clear_answer(fed: Fed, protocol: int) -> None:
    site = fed.unique("pv")
    _enroll(fed, site)
    challenge = fed.call(None, "POST", "/api/v1/agent/challenge", json={"site": site})
    assert challenge.status_code == 200, challenge.text
    value = challenge.json()["challenge"]
    signature = fed.keys[site].sign(canonical_json(agent_login_message(site, value))).hex()
    headers = {
        "X-Fedhealth-Protocol": str(protocol),
        "X-Fedhealth-Protocol-Min": "1",
        "X-Fedhealth-Version": "9.9",
    }
    body = {"site": site, "challenge": value, "signature": signature}
    answer = fed.call(None, "POST", "/api/v1/agent/token", json=body, headers=headers)
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        _refused(answer, {400, 422, 426})
    row = fed.svc.store.get_site(site)  # the site's row still reads
    assert row.name == site
