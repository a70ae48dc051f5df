"""The orchestrator's newest operations defences (one orchestrator per database, blobs no row names collected
at start; docs/security.md, "Durability") attacked the way operations go wrong: the database reached by
another path or URL spelling, a start pointed at the wrong (empty, stale) database, the advisory lock taken by
another orchestrator while the running one's lock connection was down."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from fedhealth.core import ConfigError, ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.governance import spec_hash
from fedhealth.orchestrator import OrchestratorService, OrchestratorSettings, serve, sqlite_url, start_service
from fedhealth.orchestrator._blobs import BlobKind
from fedhealth.orchestrator._routes_tasks import accept_result
from fedhealth.protocol import Ack, ApprovalState, ResultManifest, SiteMetrics, StudySpec
from fedhealth.runtime import encode_update, param_specs
from support import postgres_admin, postgres_schema, postgres_schema_name, postgres_url, synthetic_recipe

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
SIGNING_KEY = IdentityKey.generate()
SITES = ["east", "north"]


def _settings(state_dir: Path, db_url: str | None, **fields: Any) -> OrchestratorSettings:
    return OrchestratorSettings(
        state_dir=state_dir, signing_key=SIGNING_KEY, database_url=db_url, clock=ManualClock(T0), **fields
    )


def _run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


async def _refused(settings: OrchestratorSettings) -> str:
    try:
        svc = await start_service(settings)
    except ConfigError as refused:
        return str(refused)
    await svc.close()
    raise AssertionError("a second orchestrator started")


# --- one orchestrator per SQLite file, whatever path names it ----------------------------------------------


@pytest.mark.parametrize("spelling", ["symbolic link", "relative path", "pysqlite dialect", "file: URI"])
def test_a_sqlite_database_named_another_way_is_still_refused_to_a_second_orchestrator(
    tmp_path, monkeypatch, spelling
):
    """Two orchestrators with their own state folders on one SQLite file would both run its rounds: the
    database's lock must be the file's, not the spelling's."""
    real = tmp_path / "data" / "orchestrator.sqlite"
    real.parent.mkdir()
    monkeypatch.chdir(tmp_path)
    if spelling == "symbolic link":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "db.sqlite").symlink_to(real)
        other = sqlite_url(tmp_path / "elsewhere" / "db.sqlite")
    elif spelling == "relative path":
        other = "sqlite:///data/../data/orchestrator.sqlite"
    elif spelling == "pysqlite dialect":
        other = f"sqlite+pysqlite:///{real}"
    else:
        other = f"sqlite:///file:{real}?uri=true"

    async def body() -> None:
        svc = await start_service(_settings(tmp_path / "one", sqlite_url(real)))
        try:
            message = await _refused(_settings(tmp_path / "two", other, lock_wait_s=0))
            assert "another orchestrator" in message
            assert "\n" not in message
        finally:
            await svc.close()

    _run(body)


def test_a_sqlite_database_with_a_second_hard_link_is_refused_in_one_line(tmp_path):
    """A hard link is a second name for the file that no path check can tie to the first (and SQLite keeps
    its WAL by name, so two names corrupt it): an orchestrator refuses such a database before using it."""
    real = tmp_path / "orchestrator.sqlite"

    async def first() -> None:
        svc = await start_service(_settings(tmp_path / "one", sqlite_url(real)))
        await svc.close()

    _run(first)
    (tmp_path / "other").mkdir()
    os.link(real, tmp_path / "other" / "orchestrator.sqlite")

    async def body() -> None:
        for state, url in (
            (tmp_path / "one", real),
            (tmp_path / "two", tmp_path / "other" / "orchestrator.sqlite"),
        ):
            message = await _refused(_settings(state, sqlite_url(url), lock_wait_s=0))
            assert "hard link" in message
            assert "\n" not in message

    _run(body)


# --- blobs kept when the database is not the one that names them -------------------------------------------


def _spec() -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "defences",
            "dataset": "none",
            "recipe": synthetic_recipe(8),
            "rounds": 2,
            "train_sites": SITES,
            "min_sites": 2,
            "round_deadline_s": 600.0,
        }
    )


async def _study_with_an_update(svc: OrchestratorService) -> dict[str, str]:
    spec = _spec()
    digest = spec_hash(spec.model_dump(mode="json"))
    for site in SITES:
        svc.store.create_site(site, T0)
        svc.store.record_approval(site, digest, ApprovalState.APPROVED, T0)
    study_id = (await svc.engine.create_study(spec, approval_wait_s=3600)).id
    (r,) = svc.store.open_rounds()
    east = next(t for t in svc.store.tasks_of_round(r.id) if t.site == "east")
    delta = {s.name: np.full(s.shape, 0.01, np.float32) for s in param_specs(spec.recipe)}
    body = encode_update(delta, ResultManifest(task_id=east.id, metrics=SiteMetrics(num_samples=10)))
    assert await accept_result(svc, "east", east.id, body) == Ack()
    result = svc.store.get_task(east.id).result_digest
    assert result is not None
    return {"study": study_id, "model": svc.store.get_study(study_id).model_digest, "update": result}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def two_databases(request, tmp_path) -> Iterator[tuple[str, str]]:
    """The federation's database and another one (empty): a forgotten FEDHEALTH_DATABASE_URL falls back to
    the home's SQLite file, a mistyped schema is a new one."""
    if request.param == "sqlite":
        yield (
            sqlite_url(tmp_path / "federation.sqlite"),
            sqlite_url(tmp_path / "state" / "orchestrator.sqlite"),
        )
    else:
        with postgres_schema() as ours, postgres_schema() as other:
            yield ours, other


def test_a_start_on_the_wrong_database_does_not_collect_the_federations_blobs(tmp_path, two_databases):
    """Started once on a database that names none of the state folder's blobs (the wrong URL, an empty
    schema, a stale file), the orchestrator must not take them for orphans: started again on its own
    database, every model and update is still there and readable."""
    ours, other = two_databases
    state = tmp_path / "state"
    kept: dict[str, str] = {}

    async def first_life() -> None:
        svc = await start_service(_settings(state, ours))
        try:
            kept.update(await _study_with_an_update(svc))
        finally:
            await svc.close()

    async def wrong_start() -> None:
        svc = await start_service(_settings(state, other))
        await svc.close()

    async def own_database_again() -> None:
        svc = await start_service(_settings(state, ours))
        try:
            assert svc.blobs.get(kept["model"])
            assert svc.blobs.get(kept["update"], kind=BlobKind.UPDATE)
        finally:
            await svc.close()

    _run(first_life)
    _run(wrong_start)
    _run(wrong_start)  # twice: the wrong database must not become the folder's own either
    _run(own_database_again)


def test_orphans_are_still_collected_on_the_federations_own_database(tmp_path):
    """The control: on its own database, a restart still removes a blob no row names."""
    state = tmp_path / "state"
    kept: dict[str, str] = {}

    async def first_life() -> None:
        svc = await start_service(_settings(state, None))
        try:
            kept.update(await _study_with_an_update(svc))
            kept["orphan"] = svc.blobs.put(b"a model of a round that never closed")
        finally:
            await svc.close()

    async def second_life() -> None:
        svc = await start_service(_settings(state, None))
        try:
            assert not svc.blobs.path(kept["orphan"]).exists()
            assert svc.blobs.get(kept["model"])
        finally:
            await svc.close()

    _run(first_life)
    _run(second_life)


# --- the PostgreSQL lock taken by another orchestrator while the running one's connection was down ---------


def _steal_lock(schema: str, application_name: str) -> sa.Connection:
    """End the running orchestrator's sessions and take its advisory lock, as a second orchestrator starting
    at that moment would; returns the admin connection that holds it."""
    admin = postgres_admin().connect().execution_options(isolation_level="AUTOCOMMIT")
    # pg_terminate_backend only signals: the ended session may hold the lock a moment longer, and the
    # orchestrator's watch may take it again first, so end its sessions until the lock is free to take
    deadline = time.monotonic() + 10
    taken = False
    while not taken and time.monotonic() < deadline:
        admin.execute(
            sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :n"),
            {"n": application_name},
        )
        taken = bool(
            admin.execute(
                sa.text("SELECT pg_try_advisory_lock(x'66656468'::integer, hashtext(:s))"), {"s": schema}
            ).scalar()
        )
        if not taken:
            time.sleep(0.02)
    assert taken
    return admin


@pytest.mark.postgres
def test_an_orchestrator_whose_lock_another_took_stops_running_rounds_with_the_reason(tmp_path):
    name = f"defences-{uuid.uuid4().hex[:12]}"
    with postgres_schema_name() as schema:
        url = sa.engine.make_url(postgres_url(schema)).update_query_dict({"application_name": name})

        async def body() -> None:
            svc = await start_service(
                _settings(tmp_path / "one", url.render_as_string(hide_password=False), lock_check_s=0.2)
            )
            try:
                admin = _steal_lock(schema, name)
                try:
                    for _ in range(50):
                        if svc.stopped:
                            break
                        await asyncio.sleep(0.1)
                    assert svc.stopped is not None
                    assert "another orchestrator" in svc.stopped
                    assert "\n" not in svc.stopped
                finally:
                    admin.close()
            finally:
                await svc.close()

        _run(body)


@pytest.mark.postgres
def test_an_app_whose_lock_another_took_refuses_every_request_with_a_503(tmp_path):
    """Embedded (``create_app`` under the caller's own server) no process exits: the app itself must stop
    answering, or its routes would accept uploads and approvals beside the orchestrator that now holds the
    database. The reason, which names the other's database session, stays in the log."""
    import warnings

    from fedhealth.orchestrator import create_app

    with warnings.catch_warnings():  # starlette would rather have httpx2; the httpx we pin is supported
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from starlette.testclient import TestClient

    name = f"defences-{uuid.uuid4().hex[:12]}"
    with postgres_schema_name() as schema:
        url = sa.engine.make_url(postgres_url(schema)).update_query_dict({"application_name": name})
        settings = _settings(tmp_path / "one", url.render_as_string(hide_password=False), lock_check_s=0.2)
        app = create_app(settings)
        with TestClient(app, base_url="https://testserver") as client:
            assert client.get("/healthz").status_code == 200
            admin = _steal_lock(schema, name)
            try:
                deadline = time.monotonic() + 10
                while app.state.services.stopped is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert app.state.services.stopped is not None
                for method, path in (
                    ("GET", "/healthz"),
                    ("GET", "/api/v1/agent/tasks/next"),
                    ("POST", "/api/v1/enroll"),
                ):
                    answer = client.request(method, path)
                    assert answer.status_code == 503, (path, answer.text)
                    assert (
                        answer.json()["error"]
                        == "this orchestrator has stopped: another orchestrator took its database"
                    )
                    assert "PostgreSQL session" not in answer.text
            finally:
                admin.close()


@pytest.mark.postgres
def test_serve_exits_with_one_line_when_another_orchestrator_took_its_lock(tmp_path):
    """What `fedhealth orchestrator serve` does: the server stops (its supervisor sees a failed exit) and says
    why, rather than running rounds beside the orchestrator that now holds the database."""
    name = f"defences-{uuid.uuid4().hex[:12]}"
    ready = tmp_path / "ready.json"
    with postgres_schema_name() as schema:
        url = sa.engine.make_url(postgres_url(schema)).update_query_dict({"application_name": name})
        settings = _settings(tmp_path / "one", url.render_as_string(hide_password=False), lock_check_s=0.2)
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                serve(settings, port=0, tls=None, ready_file=ready, extensions=[])
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started = time.monotonic()
        while not ready.exists() and time.monotonic() - started < 30:
            time.sleep(0.05)
        assert ready.exists()
        admin = _steal_lock(schema, name)
        try:
            thread.join(timeout=20)
        finally:
            admin.close()
        assert not thread.is_alive()
        (error,) = outcome
        assert isinstance(error, ConfigError)
        assert "another orchestrator" in str(error)
        assert "\n" not in str(error)
