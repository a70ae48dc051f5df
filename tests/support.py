"""Shared helpers for the tests: dataset locations, study specs, the orchestrator's service and round engine
in one process, the CLI in process, a misbehaving site or orchestrator, the PostgreSQL server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import ssl
import stat
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

with warnings.catch_warnings():
    # starlette would rather drive its test client with httpx2; the httpx it also supports is the one we pin
    # (tests import TestClient from here, so that the warning is silenced once)
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient as TestClient

from fedhealth.agent import OrchestratorClient, SiteAgent
from fedhealth.cli import app
from fedhealth.core import SystemClock, canonical_json, decode_tensors, sha256_hex
from fedhealth.crypto import Audience, IdentityKey, PublicIdentity, TokenClaims, create_ca, pinned_tls_context
from fedhealth.data import open_dataset
from fedhealth.governance import spec_hash
from fedhealth.learning import LOGREG_RECIPE, SYNTHETIC_RECIPE, LogRegParams, PackageOrigin, SyntheticParams
from fedhealth.orchestrator import (
    BlobStore,
    Extension,
    OrchestratorService,
    OrchestratorSettings,
    RoundEngine,
    Store,
    default_extensions,
    make_engine,
    sqlite_url,
    start_service,
    upgrade_database,
)
from fedhealth.orchestrator._auth import Principal
from fedhealth.orchestrator._blobs import BlobKind
from fedhealth.orchestrator._notify import TaskNotifier
from fedhealth.orchestrator._routes_admin import register_site
from fedhealth.orchestrator._routes_auth import enroll_site
from fedhealth.orchestrator._store import RoundRow, TaskRow
from fedhealth.protocol import (
    ApprovalState,
    EnrollRequest,
    OperatorCredential,
    RecipeSpec,
    ResultManifest,
    Role,
    SiteCreate,
    SiteMetrics,
    StrategySpec,
    StudySpec,
    Task,
    TaskKind,
    TaskPoll,
    TaskStatus,
    agent_login_message,
)
from fedhealth.runtime import (
    encode_contribution,
    encode_update,
    evaluate_on_site,
    param_specs,
    recipe_spec,
    secure_codec,
    train_on_site,
)
from fedhealth.secagg import (
    ConsistencyRequest,
    KeyDirectory,
    SecAggClient,
    SecAggConfig,
    ShareBundle,
    UnmaskRequest,
)
from fedhealth.sim import LocalFederation

# The suite's one PostgreSQL setting: every test marked `postgres` reaches the server through
# `postgres_admin()` below, and an unreachable server fails those tests (never skips them).
POSTGRES_URL_ENV = "FEDHEALTH_TEST_POSTGRES_URL"
POSTGRES_URL = os.environ.get(POSTGRES_URL_ENV) or "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# And its one MySQL/MariaDB setting (the SQL connector's tests): an account that may create databases.
MYSQL_URL_ENV = "FEDHEALTH_TEST_MYSQL_URL"
MYSQL_URL = os.environ.get(MYSQL_URL_ENV) or "mysql+pymysql://root@127.0.0.1:3306/test"


def logreg_recipe(n_features: int = 30, **params: object) -> RecipeSpec:
    """The logistic-regression recipe of a test study (``params``: local_epochs, learning_rate...), its
    params validated here so that a typo fails where it is written."""
    return recipe_spec(LOGREG_RECIPE, LogRegParams(n_features=n_features, **params))  # type: ignore[arg-type]


def synthetic_recipe(n_params: int) -> RecipeSpec:
    """The data-free recipe of the transport tests: a model of ``n_params`` float32 numbers."""
    return recipe_spec(SYNTHETIC_RECIPE, SyntheticParams(n_params=n_params))


# A recipe plug-in outside src/ (its package and its dist-info): on PYTHONPATH, it registers "toy-centroid".
TOY_PLUGIN_PATH = Path(__file__).resolve().parent / "plugins" / "fedhealth_toy"
TOY_RECIPE = "toy-centroid"
TOY_COLLECTIVE_RECIPE = "toy-mean"  # the toy package's collective recipe: pooled feature means

BREAST_SITES = {f"hospital-{c}": f"builtin://breast-cancer/{i}?sites=4&seed=0" for i, c in enumerate("abcd")}


def breast_spec(sites: list[str], *, rounds: int = 3, name: str = "breast", **overrides: object) -> StudySpec:
    fields: dict[str, object] = {
        "name": name,
        "dataset": "breast-cancer",
        "recipe": logreg_recipe(30, local_epochs=1, learning_rate=0.05, batch_size=16),
        "strategy": StrategySpec(name="fedavg"),
        "rounds": rounds,
        "train_sites": sorted(sites),
        "min_sites": 1,
        "round_deadline_s": 60.0,
        "seed": 7,
    }
    fields.update(overrides)
    return StudySpec.model_validate(fields)


def study_task(spec: StudySpec, round: int = 1, kind: TaskKind = TaskKind.TRAIN) -> Task:
    """The task of ``spec``'s round ``round`` at a site, as the orchestrator would hand it out (for tests that
    call ``train_on_site`` / ``evaluate_on_site`` directly, without services)."""
    return Task(
        task_id=f"t-{round}",
        study_id="st",
        round=round,
        kind=kind,
        dataset=spec.dataset,
        recipe=spec.recipe,
        model_digest="0" * 64,
        seed=spec.seed,
        deadline=datetime.now(UTC),
        spec=spec,
    )


def package_origin(spec: dict[str, object], weights: bytes, **fields: object) -> PackageOrigin:
    """A model package's origin for ``spec`` (a study spec as JSON) and its ``weights``: hashes computed,
    no provenance or privacy statement; ``fields`` replace any of it (study_id, software_version...)."""
    origin = PackageOrigin(
        study_id="s",
        spec=spec,
        spec_hash=sha256_hex(canonical_json(spec)),
        model_digest=sha256_hex(weights),
        provenance=None,
        privacy=None,
        software_version="0",
        exported_at="now",
    )
    return dataclasses.replace(origin, **fields)  # type: ignore[arg-type]


def operator_principal(name: str, role: Role, *, token_id: str | None = None) -> Principal:
    """An operator as the API's auth dependency hands them to a route handler: a five-minute token of
    ``role`` (for tests that call the handlers as plain functions)."""
    now = datetime.now(UTC)
    claims = TokenClaims(
        subject=name,
        role=role.value,
        audience=Audience.OPERATOR,
        issued_at=now,
        expires_at=now + timedelta(minutes=5),
        token_id=f"t-{name}" if token_id is None else token_id,
    )
    return Principal(name=name, role=role, claims=claims)


def open_round(store: Store, study_id: str) -> RoundRow:
    """The study's one open round (fails the test if it has none, or several)."""
    (r,) = [x for x in store.open_rounds() if x.study_id == study_id]
    return r


def task_of(store: Store, round_id: str, site: str) -> TaskRow:
    """``site``'s one task of the round."""
    (t,) = [x for x in store.tasks_of_round(round_id) if x.site == site]
    return t


def enroll_sites(svc: OrchestratorService, sites: Sequence[str]) -> dict[str, IdentityKey]:
    """Register each of ``sites`` (as an admin) and enroll it with a fresh identity key, through the route
    handlers; the keys."""
    admin = operator_principal("admin", Role.ADMIN)
    keys = {}
    for site in sites:
        created = register_site(svc, admin, SiteCreate(name=site))
        keys[site] = IdentityKey.generate()
        request = EnrollRequest(
            site=site, token=created.enrollment_token, public_key=keys[site].public().raw.hex()
        )
        enroll_site(svc, request)
    return keys


@asynccontextmanager
async def running_service(
    tmp_path: Path, sites: Sequence[str], extensions: Sequence[Extension] | None = None
) -> AsyncIterator[OrchestratorService]:
    """The orchestrator's service for handlers called as functions: state in ``tmp_path / "state"`` (SQLite),
    a fresh signing key, the default extensions unless ``extensions`` says otherwise, and ``sites`` enrolled
    (:func:`enroll_sites`); closed afterwards."""
    settings = OrchestratorSettings(state_dir=tmp_path / "state", signing_key=IdentityKey.generate())
    svc = await start_service(settings, default_extensions() if extensions is None else extensions)
    try:
        enroll_sites(svc, sites)
        yield svc
    finally:
        await svc.close()


def agent_bearer(svc: OrchestratorService, site: str) -> tuple[IdentityKey, dict[str, str]]:
    """Create ``site`` in the store, enroll it with a fresh identity key and log its agent in through the
    service's auth (no HTTP): the key, and the ``Authorization`` header of the agent's token."""
    key = IdentityKey.generate()
    svc.store.create_site(site, svc.settings.clock.now())
    issued = svc.auth.enrollment_token(site)
    svc.auth.enroll(site=site, token=issued.token, public_key_hex=key.public().raw.hex())
    challenge, _ = svc.auth.challenge(site)
    signature = key.sign(canonical_json(agent_login_message(site, challenge))).hex()
    token, _ = svc.auth.agent_token(site=site, challenge=challenge, signature_hex=signature)
    return key, {"Authorization": f"Bearer {token}"}


def operator_bearer(svc: OrchestratorService, name: str, role: Role) -> tuple[str, dict[str, str]]:
    """A new operator ``name`` of ``role`` through the service's auth (no HTTP): their API key, and the
    ``Authorization`` header of the token it trades for."""
    api_key = svc.auth.new_user(name, role)
    token, _ = svc.auth.operator_token(user=name, api_key=api_key)
    return api_key, {"Authorization": f"Bearer {token}"}


ENGINE_SITES = ("north", "east", "south")


class RoundEngineHarness:
    """The round engine with its real store (SQLite) and blob store in ``folder``, no service and no HTTP: a
    test stores results as the upload route does, and tells the engine of each closure itself (or does not,
    to play a process that died before it could)."""

    def __init__(self, folder: Path, *, round_deadline_s: float = 3600.0) -> None:
        self.db = make_engine(sqlite_url(folder / "orchestrator.sqlite"))
        upgrade_database(self.db)
        self.store = Store(self.db)
        self.blobs = BlobStore(folder / "blobs")
        self.clock = SystemClock()
        self.engine = RoundEngine(self.store, self.blobs, self.clock, TaskNotifier())
        self.round_deadline_s = round_deadline_s

    async def start(self, **fields: Any) -> str:
        """A study of the synthetic recipe over :data:`ENGINE_SITES`, approved by each; its id."""
        spec = StudySpec.model_validate(
            {
                "name": "driver",
                "dataset": "none",
                "recipe": synthetic_recipe(8),
                "rounds": 2,
                "train_sites": list(ENGINE_SITES),
                "min_sites": 2,
                "round_deadline_s": self.round_deadline_s,
                **fields,
            }
        )
        digest = spec_hash(spec.model_dump(mode="json"))
        for site in ENGINE_SITES:
            if self.store.get_site_or_none(site) is None:
                self.store.create_site(site, self.clock.now())
            self.store.record_approval(site, digest, ApprovalState.APPROVED, self.clock.now())
        return (await self.engine.create_study(spec)).id

    def open_round(self, study_id: str) -> RoundRow:
        return open_round(self.store, study_id)

    def complete(self, study_id: str, site: str) -> tuple[str, str]:
        """Store ``site``'s result for the open round as the upload route does; its (round, task) ids."""
        r = self.open_round(study_id)
        task = task_of(self.store, r.id, site)
        metrics = SiteMetrics(num_samples=10, train_loss=0.5)
        digest = None
        if r.kind is TaskKind.TRAIN:
            spec = self.store.spec(study_id)
            delta = {s.name: np.full(s.shape, 0.01, np.float32) for s in param_specs(spec.recipe)}
            body = encode_update(delta, ResultManifest(task_id=task.id, metrics=metrics))
            digest = self.blobs.put(body, kind=BlobKind.UPDATE)
        assert self.store.complete_task(
            task.id, digest=digest, num_samples=10, metrics=metrics, when=self.clock.now()
        )
        return r.id, task.id

    def fail(self, study_id: str, site: str, reason: str) -> tuple[str, str]:
        """Close ``site``'s task of the open round as failed with ``reason``; its (round, task) ids."""
        r = self.open_round(study_id)
        task = task_of(self.store, r.id, site)
        assert self.store.close_task(task.id, TaskStatus.FAILED, reason, self.clock.now())
        return r.id, task.id


def run_round_engine(
    test: Callable[[RoundEngineHarness], Awaitable[None]], folder: Path, **harness: Any
) -> None:
    """Run ``test`` on a :class:`RoundEngineHarness` over ``folder`` (one process "life": call again on the
    same folder to restart), closing the engine and the database afterwards."""

    async def main() -> None:
        o = RoundEngineHarness(folder, **harness)
        try:
            await test(o)
        finally:
            await o.engine.close()
            o.db.dispose()

    asyncio.run(main())


def breast_datasets(sites: dict[str, str]) -> dict[str, object]:
    return {name: open_dataset(uri) for name, uri in sites.items()}


def heart_data_dir() -> Path:
    """The shared dataset folder; skipped when absent unless CI requires it."""
    value = os.environ.get("FEDHEALTH_DATA_DIR")
    folder = Path(value) if value else None
    if folder is None or not (folder / "heart_disease").is_dir():
        if os.environ.get("FEDHEALTH_REQUIRE_DATA") == "1":
            pytest.fail(f"FEDHEALTH_DATA_DIR={value!r} does not hold heart_disease/ (required in CI)")
        pytest.skip("set FEDHEALTH_DATA_DIR to the shared datasets folder to run this test")
    return folder


_cli_runner = CliRunner()


def cli(*args: object) -> Any:
    """``fedhealth`` with ``args`` (each passed through ``str``), run in process; its result."""
    return _cli_runner.invoke(app, [str(a) for a in args])


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unreachable_credential(path: Path) -> Path:
    """An admin credential (0600) of a federation whose orchestrator does not answer: its CA is a fresh one
    and its URL a closed loopback port."""
    path.write_text(
        OperatorCredential(
            orchestrator=f"https://127.0.0.1:{closed_port()}",
            ca_pem=create_ca("test federation").cert_pem.decode(),
            user="admin",
            api_key="fhk_" + "x" * 40,
        ).model_dump_json()
    )
    path.chmod(0o600)  # a credential others can read is refused
    return path


def one_error(result: Any, code: int = 1) -> str:
    """stderr is exactly one ``error:`` line, with no traceback, and the exit code is ``code``; the line."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def file_mode(path: Path) -> int:
    """The permission bits of ``path`` itself (a symbolic link's own, not its target's)."""
    return stat.S_IMODE(path.lstat().st_mode)


def allreduce_request(values: np.ndarray) -> bytes:
    """XGBoost's federated.proto AllreduceRequest, as its worker sends it to the site's proxy: sequence 0,
    rank 0, the buffer, float64 (2), SUM (2)."""
    buffer = values.astype("<f8").tobytes()
    assert len(buffer) < 128  # one-byte length varint
    return bytes([0x08, 0, 0x10, 0, 0x1A, len(buffer)]) + buffer + bytes([0x20, 2, 0x28, 2])


@dataclasses.dataclass(frozen=True)
class AsgiAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    pulled: int  # bytes of the request body the app asked for


async def asgi_request(
    app: Any,
    method: str,
    path: str,
    headers: dict[str, str],
    chunks: Iterator[bytes],
    *,
    address: str = "198.51.100.7",
) -> AsgiAnswer:
    """One request straight into the ASGI app, with the path exactly as given (no client normalizes it) and
    its body handed over chunk by chunk only as the app asks for it (a client streaming a body without end,
    as far as the app reads it); ``pulled`` says how much of it the app read."""
    pulled = 0
    pending = iter(chunks)
    finished = False

    async def receive() -> dict[str, Any]:
        nonlocal pulled, finished
        if finished:
            return {"type": "http.disconnect"}
        chunk = next(pending, None)
        if chunk is None:
            finished = True
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ],
        "client": (address, 40000),
        "server": ("testserver", 443),
        "extensions": {},
        "app": app,
    }
    try:
        await app(scope, receive, send)
    except Exception:  # a server answers 500 for what escapes the app; what was sent says what happened
        if not any(m["type"] == "http.response.start" for m in sent):
            sent.append({"type": "http.response.start", "status": 500, "headers": []})
    start = next(m for m in sent if m["type"] == "http.response.start")
    return AsgiAnswer(
        status=start["status"],
        headers={k.decode(): v.decode() for k, v in start["headers"]},
        body=b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"),
        pulled=pulled,
    )


def send_asgi(
    client: TestClient, app: Any, method: str, path: str, headers: dict[str, str], **kw: Any
) -> AsgiAnswer:
    """:func:`asgi_request` on the event loop of ``client`` (a started TestClient of ``app``)."""
    chunks = kw.pop("chunks", iter(()))
    assert client.portal is not None
    return client.portal.call(lambda: asgi_request(app, method, path, headers, chunks, **kw))


def opened_for_writing_later(fifo: Path) -> threading.Timer:
    """Unblock a reader stuck on ``fifo`` after a while (so an unfixed reader ends the test, not the run)."""

    def unblock() -> None:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(5.0, unblock)
    timer.start()
    return timer


def finishes_within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` in a thread; the exception it raised, asserting it ended within ``seconds``."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # what the test checks
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the call blocked (a read on a FIFO?)"
    return raised[0] if raised else None


def run_until(site: SiteAgent, done: Callable[[], bool], give_up_s: float = 20) -> BaseException | None:
    """Run the agent's loop in a thread until ``done()`` holds; what it raised, if it stopped."""
    raised: list[BaseException] = []

    def loop() -> None:
        try:
            site.run()
        except BaseException as exc:
            raised.append(exc)

    site._warm_up = lambda: None  # type: ignore[method-assign] # no library preloading in a unit test
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    give_up = time.monotonic() + give_up_s  # a bound on a broken test, not a timing assertion
    while not done() and thread.is_alive() and time.monotonic() < give_up:
        time.sleep(0.01)
    site.stop()
    thread.join(10)
    return raised[0] if raised else None


def run_until_polled(site: SiteAgent, polls: list[int], times: int = 3) -> BaseException | None:
    """Run the agent's loop in a thread until it polled ``times`` times; what it raised, if it stopped."""
    return run_until(site, lambda: len(polls) >= times, give_up_s=10)


class RogueSite:
    """An enrolled site driven by the test itself over the real HTTPS API, to send what a real agent never
    would. Its identity key and pinned CA come from the site's home, as a real agent's do."""

    def __init__(self, fed: LocalFederation, name: str) -> None:
        home = fed.site_home(name)
        self.name = name
        self.client = OrchestratorClient(fed.url, name, home.identity(), ca_pem=home.ca_pem())
        self.http = self.client.http

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return self.http.get(path, headers=self.client.auth_headers(), **kwargs)

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), **self.client.auth_headers()}  # type: ignore[dict-item]
        return self.http.post(path, headers=headers, **kwargs)

    def poll(self, wait: float = 20.0) -> Task:
        response = self.get("/api/v1/agent/tasks/next", params={"wait": wait}, timeout=wait + 10)
        response.raise_for_status()
        task = TaskPoll.model_validate_json(response.content).task
        assert task is not None, f"{self.name} got no task within {wait} s"
        return task

    def model(self, task: Task) -> dict[str, np.ndarray]:
        response = self.get(f"/api/v1/agent/models/{task.model_digest}")
        response.raise_for_status()
        return decode_tensors(response.content, param_specs(task.recipe))[0]

    def upload(self, task_id: str, body: bytes) -> httpx.Response:
        return self.post(
            f"/api/v1/agent/tasks/{task_id}/result",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )

    def close(self) -> None:
        self.client.close()


_postgres: sa.Engine | None = None
_postgres_unreachable: str | None = None


def postgres_admin() -> sa.Engine:
    """An engine on the test server, probed once per session.

    An unreachable server fails the calling test with one line naming the URL and the setting: CI has the
    server, so a skip would hide every PostgreSQL test at once. (``-m "not postgres"`` deselects them.)
    """
    global _postgres, _postgres_unreachable
    if _postgres is None and _postgres_unreachable is None:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            _postgres = engine
        except sa.exc.OperationalError as exc:
            engine.dispose()
            reason = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
            _postgres_unreachable = (
                f"PostgreSQL is unreachable at {POSTGRES_URL} ({POSTGRES_URL_ENV}): {reason}"
            )
    if _postgres is None:
        pytest.fail(_postgres_unreachable, pytrace=False)
    return _postgres


def postgres_url(schema: str) -> str:
    """The test server's URL with connections confined to ``schema`` (for engines and child processes)."""
    url = sa.engine.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@contextmanager
def postgres_schema_name(prefix: str = "t") -> Iterator[str]:
    """A throwaway schema on the test server, dropped afterwards; yields its name."""
    admin = postgres_admin()
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A throwaway schema on the test server; yields a URL whose connections use it."""
    with postgres_schema_name() as schema:
        yield postgres_url(schema)


_mysql: sa.Engine | None = None
_mysql_unreachable: str | None = None


def mysql_admin() -> sa.Engine:
    """An engine on the test MySQL/MariaDB server, probed once per session; unreachable, it fails the
    calling test in one line (as :func:`postgres_admin` does)."""
    global _mysql, _mysql_unreachable
    if _mysql is None and _mysql_unreachable is None:
        engine = sa.create_engine(MYSQL_URL, connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            _mysql = engine
        except sa.exc.OperationalError as exc:
            engine.dispose()
            reason = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
            _mysql_unreachable = f"MySQL/MariaDB is unreachable at {MYSQL_URL} ({MYSQL_URL_ENV}): {reason}"
    if _mysql is None:
        pytest.fail(_mysql_unreachable, pytrace=False)
    return _mysql


@contextmanager
def mysql_database(prefix: str = "t") -> Iterator[str]:
    """A throwaway database on the test MySQL/MariaDB server, dropped afterwards; yields its name."""
    admin = mysql_admin()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
    try:
        yield name
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE `{name}`")


class ChokeProxy:
    """A TCP proxy in front of the orchestrator that can stall one client's upload part-way through.

    It forwards bytes both ways (TLS passes through untouched). Once armed, the first connection whose
    client-to-server stream passes ``choke_at`` bytes is held there: the rest is never forwarded, and
    ``choked`` is set, so a test can kill the client mid-upload.
    """

    def __init__(self, target: str) -> None:
        host, port = target.rsplit("//", 1)[1].rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self.choke_at: int | None = None
        self.choked = threading.Event()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, scheme: str = "https") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:  # accepted while the proxy was closing: nothing may outlive close()
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                armed = upstream and self.choke_at is not None and not self.choked.is_set()
                if armed and sent + len(data) > self.choke_at:
                    dst.sendall(data[: self.choke_at - sent])
                    self.choked.set()
                    while src.recv(65536):  # swallow the rest until the client dies
                        pass
                    return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._listener.close()
            sockets = list(self._sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()


class SecureRogue:
    """A site taking part in secure rounds, driven step by step by the test, so a test can hold a stage open
    (the stage cannot close before every expected site answered or its timeout passed) while it kills a real
    agent at exactly that point. It trains for real on its dataset with the same runtime code as an agent."""

    def __init__(self, fed: LocalFederation, name: str, dataset_uri: str) -> None:
        self.site = RogueSite(fed, name)
        self.name = name
        self.identity = fed.site_home(name).identity()
        self.dataset = open_dataset(dataset_uri)
        self.task: Task | None = None
        self.protocol: SecAggClient | None = None
        self.vector: np.ndarray | None = None
        self._answer: bytes | None = None

    def join(self, wait: float = 60.0) -> Task:
        """Take the next task, train, and prepare this site's secure contribution."""
        task = self.site.poll(wait)
        assert task.secure_round is not None
        params = self.site.model(task)
        if task.kind is TaskKind.TRAIN:
            outcome = train_on_site(task, self.name, params, self.dataset)
            delta, metrics = outcome.delta, outcome.metrics
        else:
            delta, metrics = None, evaluate_on_site(task, params, self.dataset)
        info = task.secure_round
        codec = secure_codec(task.spec, task.kind)
        self.vector = encode_contribution(codec, task.spec, metrics, delta)
        peers = {s: PublicIdentity(bytes.fromhex(k)) for s, k in info.peer_keys.items()}
        self.protocol = SecAggClient(SecAggConfig.from_json(info.config), self.name, self.identity, peers)
        self.task = task
        return task

    def _send(self, stage: str, body: bytes) -> None:
        assert self.task is not None
        response = self.site.post(
            f"/api/v1/agent/tasks/{self.task.task_id}/secagg/{stage}",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert response.status_code == 200, response.text

    def _receive(self, stage: str) -> bytes:
        assert self.task is not None
        while True:
            response = self.site.get(
                f"/api/v1/agent/tasks/{self.task.task_id}/secagg/{stage}", params={"wait": 20}
            )
            assert response.status_code in (200, 204), response.text
            if response.status_code == 200:
                return response.content

    def step(self, stage: str) -> None:
        """Send this site's message for ``stage`` (after receiving what the previous stage produced)."""
        p = self.protocol
        assert p is not None
        if stage == "advertise_keys":
            self._send(stage, p.advertise_keys().to_bytes())
        elif stage == "share_keys":
            self._send(
                stage, p.share_keys(KeyDirectory.from_bytes(self._receive("advertise_keys"))).to_bytes()
            )
        elif stage == "masked_input":
            assert self.vector is not None
            bundle = ShareBundle.from_bytes(self._receive("share_keys"))
            self._send(stage, p.masked_input(bundle, self.vector).to_bytes())
        elif stage == "consistency":
            request = ConsistencyRequest.from_bytes(self._receive("masked_input"))
            self._send(stage, p.consistency(request).to_bytes())
        else:
            self._send(stage, p.unmask(UnmaskRequest.from_bytes(self._receive("consistency"))).to_bytes())

    def close(self) -> None:
        self.site.close()


SECURE_STAGES = ("advertise_keys", "share_keys", "masked_input", "consistency", "unmask")


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that drops its connection mid-request (a killed agent) is not the test's failure


class LyingOrchestrator:
    """The orchestrator, lying: an HTTPS proxy in front of the real one that rewrites chosen answers.

    The orchestrator owns the federation's CA, so a proxy serving the orchestrator's own TLS certificate is,
    for a site, exactly the orchestrator: whatever it rewrites is what a malicious orchestrator could send.
    Point agents at it with ``fed.start_agent(site, datasets, orchestrator_url=lying.url)``. Everything is
    forwarded unchanged unless a rewrite is set:

    - ``rewrite_task(task) -> task``: applied to each task an agent's long-poll returns (e.g. strip the
      secure round, change its threshold, add a sybil peer);
    - ``rewrite(method, path, status, body) -> body``: applied to any other response's body (bytes).

    ``requests`` lists ``(method, path)`` of every request that reached the proxy, in order, so a test can
    check what a site sent (e.g. never a result in clear). Call ``close()`` when done (or use ``with``).
    """

    def __init__(self, fed: LocalFederation) -> None:
        assert fed.url is not None, "start the orchestrator first"
        assert fed.url.startswith("https://"), "the lying orchestrator serves TLS: start it with tls=True"
        self.rewrite_task: Callable[[Task], Task] | None = None
        self.rewrite: Callable[[str, str, int, bytes], bytes] | None = None
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._upstream = httpx.Client(
            base_url=fed.url, verify=pinned_tls_context(fed.home.ca_cert.read_bytes()), timeout=120.0
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(fed.home.tls_cert, fed.home.tls_key)
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def paths(self, method: str, fragment: str = "") -> list[str]:
        """The paths of the requests with ``method`` that contain ``fragment``."""
        with self._lock:
            return [p for m, p in self.requests if m == method and fragment in p]

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict, bytes]:
        with self._lock:
            self.requests.append((method, path.split("?", 1)[0]))
        response = self._upstream.request(method, path, headers=headers, content=body)
        data = response.content
        if method == "GET" and path.startswith("/api/v1/agent/tasks/next") and response.status_code == 200:
            poll = TaskPoll.model_validate_json(data)
            if poll.task is not None and self.rewrite_task is not None:
                data = TaskPoll(task=self.rewrite_task(poll.task)).model_dump_json().encode()
        elif self.rewrite is not None:
            data = self.rewrite(method, path, response.status_code, data)
        skip = {"content-length", "transfer-encoding", "content-encoding", "connection"}
        out = {k: v for k, v in response.headers.items() if k.lower() not in skip}
        return response.status_code, out, data

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                skip = {"host", "connection", "content-length", "accept-encoding", "transfer-encoding"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                try:
                    status, out, data = proxy._forward(self.command, self.path, headers, body)
                except httpx.HTTPError:
                    status, out, data = 502, {"content-type": "text/plain"}, b"upstream unreachable"
                try:
                    self.send_response(status)
                    for k, v in out.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the agent went away (killed, or its long-poll gave up): nothing to tell
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _relay

        return Handler

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._upstream.close()

    def __enter__(self) -> LyingOrchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@contextmanager
def proxy_recorder() -> Iterator[tuple[int, list[bytes]]]:
    """A listener for every proxy variable to name: what a process tries to reach beyond the federation
    through the environment's proxy (a library's telemetry, an update check) arrives as a request's first
    bytes. Yields its port and what arrived."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    seen.append(conn.recv(4096))
                except OSError:
                    seen.append(b"")

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], seen
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
