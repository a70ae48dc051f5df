"""Shared helpers for the tests: dataset locations, study specs, a misbehaving site, the PostgreSQL server."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from fedhealth.agent import OrchestratorClient
from fedhealth.core import canonical_json, decode_tensors, sha256_hex
from fedhealth.crypto import PublicIdentity, pinned_tls_context
from fedhealth.data import open_dataset
from fedhealth.learning import LOGREG_RECIPE, SYNTHETIC_RECIPE, LogRegParams, PackageOrigin, SyntheticParams
from fedhealth.protocol import RecipeSpec, StrategySpec, StudySpec, Task, TaskKind, TaskPoll
from fedhealth.runtime import (
    encode_contribution,
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
