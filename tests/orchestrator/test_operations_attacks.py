"""Running the orchestrator in production, attacked the way operations go wrong: a second orchestrator started
on the same database or state folder, a restart after a kill, blobs that no row names, a database written by
a newer release, PostgreSQL connections dropped under it. Each test states what must hold: one clear line
and nothing changed, or the service going on. Database tests run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
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
from fedhealth.orchestrator import (
    OrchestratorService,
    OrchestratorSettings,
    make_engine,
    serve,
    sqlite_url,
    start_service,
    upgrade_database,
)
from fedhealth.orchestrator._blobs import BlobKind
from fedhealth.orchestrator._routes_tasks import accept_result
from fedhealth.protocol import Ack, ApprovalState, ResultManifest, SiteMetrics, StudySpec, TaskStatus
from fedhealth.runtime import encode_update, param_specs
from support import postgres_admin, postgres_schema, synthetic_recipe

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
SIGNING_KEY = IdentityKey.generate()
SITES = ["east", "north"]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "orchestrator.sqlite")
    else:
        with postgres_schema() as url:
            yield url


def _settings(state_dir: Path, db_url: str, **fields: Any) -> OrchestratorSettings:
    return OrchestratorSettings(
        state_dir=state_dir, signing_key=SIGNING_KEY, database_url=db_url, clock=ManualClock(T0), **fields
    )


def _run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


# --- one orchestrator per database and per state folder -----------------------------------------------------


@pytest.mark.parametrize("shared", ["database", "state folder"])
def test_a_second_orchestrator_on_the_same_database_or_state_folder_refuses_to_start_with_one_line(
    tmp_path, db_url, shared
):
    """Two orchestrators on one database would both drive its rounds (double aggregation); on one state
    folder, one would collect the other's blobs. The second refuses, names what is taken, and changes nothing;
    the first serves on, and once it stops the second starts."""
    first = _settings(tmp_path / "one", db_url)
    if shared == "database":
        second = _settings(tmp_path / "two", db_url, lock_wait_s=0)
    else:
        second = _settings(tmp_path / "one", sqlite_url(tmp_path / "other.sqlite"), lock_wait_s=0)

    async def body() -> None:
        svc = await start_service(first)
        try:
            svc.store.create_site("east", T0)
            with pytest.raises(ConfigError) as refused:
                await start_service(second)
            message = str(refused.value)
            assert "\n" not in message
            assert "another orchestrator" in message
            assert [s.name for s in svc.store.list_sites()] == ["east"]  # the first goes on
        finally:
            await svc.close()
        again = await start_service(second)  # the first stopped: its locks went with it
        await again.close()

    _run(body)


def test_serve_refuses_before_it_listens_when_another_orchestrator_holds_the_database(tmp_path, db_url):
    """What `fedhealth orchestrator serve` does: the refusal comes before uvicorn and its lifespan (whose
    failure is a traceback and exit 3), as one error the CLI prints as one line; no ready file is written."""
    ready = tmp_path / "ready.json"

    async def body() -> None:
        svc = await start_service(_settings(tmp_path / "one", db_url))
        try:
            with pytest.raises(ConfigError, match="another orchestrator"):
                await asyncio.to_thread(
                    serve,
                    _settings(tmp_path / "two", db_url, lock_wait_s=0),
                    port=0,
                    tls=None,
                    ready_file=ready,
                )
        finally:
            await svc.close()

    _run(body)
    assert not ready.exists()


_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from fedhealth.crypto import IdentityKey
    from fedhealth.orchestrator import OrchestratorSettings, start_service

    async def main():
        settings = OrchestratorSettings(
            state_dir=Path(sys.argv[1]), signing_key=IdentityKey.generate(), database_url=sys.argv[2]
        )
        await start_service(settings)
        print("started", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def test_the_lock_of_a_killed_orchestrator_does_not_block_its_restart(tmp_path, db_url):
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(state), db_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "started"

        async def refused() -> None:
            with pytest.raises(ConfigError, match="another orchestrator"):
                await start_service(_settings(state, db_url, lock_wait_s=0))

        _run(refused)  # alive, it holds the lock
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()

    async def restarted() -> None:
        svc = await start_service(_settings(state, db_url))
        await svc.close()

    _run(restarted)


# --- blobs that no row names --------------------------------------------------------------------------------


def _spec() -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "operations",
            "dataset": "none",
            "recipe": synthetic_recipe(8),
            "rounds": 2,
            "train_sites": SITES,
            "min_sites": 2,
            "round_deadline_s": 600.0,
        }
    )


async def _study(svc: OrchestratorService) -> str:
    spec = _spec()
    digest = spec_hash(spec.model_dump(mode="json"))
    for site in SITES:
        svc.store.create_site(site, T0)
        svc.store.record_approval(site, digest, ApprovalState.APPROVED, T0)
    return (await svc.engine.create_study(spec, approval_wait_s=3600)).id


def _update(svc: OrchestratorService, task_id: str, fill: float) -> bytes:
    spec = svc.store.spec(svc.store.get_task(task_id).study_id)
    delta = {s.name: np.full(s.shape, fill, np.float32) for s in param_specs(spec.recipe)}
    return encode_update(delta, ResultManifest(task_id=task_id, metrics=SiteMetrics(num_samples=10)))


def _blob_files(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*") if p.is_file()}


def test_blobs_no_row_names_are_collected_at_start_and_named_or_live_ones_are_kept(tmp_path, db_url):
    """An upload whose task was never completed (killed between the blob's commit and the row), a model
    made by an aggregation killed before its round closed: nothing names them, nothing will, and they used
    to stay for good. A restart removes them; every blob a row names, a live writer's temporary file and a
    file that is not a blob are left alone."""
    settings = _settings(tmp_path / "state", db_url)
    kept: dict[str, Any] = {}

    async def first_life() -> None:
        svc = await start_service(settings)
        try:
            study_id = await _study(svc)
            (r,) = svc.store.open_rounds()
            east, north = sorted(svc.store.tasks_of_round(r.id), key=lambda t: t.site)
            assert await accept_result(svc, "east", east.id, _update(svc, east.id, 0.01)) == Ack()
            kept["update"] = svc.store.get_task(east.id).result_digest
            kept["model"] = svc.store.get_study(study_id).model_digest
            # killed after the blobs were written, before the rows that would name them
            kept["orphan update"] = svc.blobs.put(_update(svc, north.id, 0.02), kind=BlobKind.UPDATE)
            kept["orphan model"] = svc.blobs.put(b"a model of a round that never closed")
            kept["north"] = north.id
        finally:
            await svc.close()

    _run(first_life)
    blobs_root = settings.state_dir / "blobs"
    live = blobs_root / "updates" / f".upload.{os.getpid()}.1.00.tmp"  # a live process's file being written
    live.write_bytes(b"half")
    stranger = blobs_root / "README"
    stranger.write_text("not a blob")
    assert {kept["orphan update"], kept["orphan model"]} <= _blob_files(blobs_root)

    async def second_life() -> None:
        svc = await start_service(settings)
        try:
            files = _blob_files(blobs_root)
            assert kept["orphan update"] not in files
            assert kept["orphan model"] not in files
            assert {live.name, stranger.name} <= files
            assert svc.blobs.get(kept["model"])  # named blobs are intact and readable
            assert svc.blobs.get(kept["update"], kind=BlobKind.UPDATE)
            # the site whose upload was lost retries, and the round goes on
            north = kept["north"]
            assert await accept_result(svc, "north", north, _update(svc, north, 0.02)) == Ack()
            assert svc.store.get_task(north).status is TaskStatus.COMPLETED
        finally:
            await svc.close()

    _run(second_life)


# --- a database written by a newer release ------------------------------------------------------------------


def test_a_database_of_a_newer_release_refuses_to_start_with_one_line_and_is_left_as_it_was(tmp_path, db_url):
    engine = make_engine(db_url)
    try:
        upgrade_database(engine)
        with engine.begin() as c:
            c.exec_driver_sql("UPDATE alembic_version SET version_num = '0042_from_the_future'")

        async def body() -> None:
            with pytest.raises(ConfigError) as refused:
                await start_service(_settings(tmp_path / "state", db_url))
            message = str(refused.value)
            assert "\n" not in message
            assert "newer" in message
            assert "0042_from_the_future" in message

        _run(body)
        with engine.connect() as c:
            assert c.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [
                "0042_from_the_future"
            ]
    finally:
        engine.dispose()


# --- PostgreSQL connections dropped under a running orchestrator --------------------------------------------


@pytest.mark.postgres
def test_postgres_connections_dropped_under_the_orchestrator_are_replaced_not_failed_forever(tmp_path):
    """An administrator's pg_terminate_backend (or a PostgreSQL restart) drops every connection of the pool:
    the next calls get fresh connections rather than failing on the dead ones."""
    name = f"operations-{uuid.uuid4().hex[:12]}"  # this test's connections, not a neighbour's
    with postgres_schema() as schema_url:
        url = sa.engine.make_url(schema_url).update_query_dict({"application_name": name})

        async def body() -> None:
            svc = await start_service(
                _settings(tmp_path / "state", url.render_as_string(hide_password=False))
            )
            try:
                svc.store.create_site("east", T0)
                with postgres_admin().connect() as admin:
                    pids = (
                        admin.execute(
                            sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                            {"name": name},
                        )
                        .scalars()
                        .all()
                    )
                    assert pids
                    for pid in pids:
                        admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                assert [s.name for s in svc.store.list_sites()] == ["east"]
                svc.store.create_site("north", T0)
                assert len(svc.store.list_sites()) == 2
            finally:
                await svc.close()

        _run(body)


@pytest.mark.postgres
def test_a_dropped_lock_connection_does_not_let_a_second_orchestrator_in(tmp_path):
    name = f"operations-{uuid.uuid4().hex[:12]}"
    with postgres_schema() as schema_url:
        url = sa.engine.make_url(schema_url).update_query_dict({"application_name": name})
        url_text = url.render_as_string(hide_password=False)

        async def body() -> None:
            svc = await start_service(_settings(tmp_path / "one", url_text, lock_check_s=0.2))
            try:
                with postgres_admin().connect() as admin:
                    admin.execute(
                        sa.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = :n"
                        ),
                        {"n": name},
                    )
                await asyncio.sleep(1.0)  # a watchdog's turn
                second = _settings(tmp_path / "two", url_text, lock_wait_s=0)
                with pytest.raises(ConfigError, match="another orchestrator"):
                    await start_service(second)
            finally:
                await svc.close()

        _run(body)


def test_a_database_connection_lost_mid_request_is_a_503_to_retry_not_a_500():
    import warnings

    from fastapi import FastAPI

    from fedhealth.orchestrator._http import install_error_handlers

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from starlette.testclient import TestClient

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/studies")
    async def studies() -> None:
        raise sa.exc.OperationalError(
            "SELECT 1",
            {},
            Exception("terminating connection due to administrator command"),
            connection_invalidated=True,
        )

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/studies")
    assert answer.status_code == 503
    assert "Retry-After" in answer.headers
    assert "\n" not in answer.json()["error"]
