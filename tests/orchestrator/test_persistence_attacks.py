"""The orchestrator's persistence attacked like a power cut and a careless operator would: a database left by
an older release upgraded in place, a migration or a write that fails half way (a constraint, a PostgreSQL
connection killed mid-transaction), a full disk under a blob write or an upload, blob files changed or
truncated on disk after they were stored, and restarts after a kill. Each test states what must hold: a
clear error, nothing lost, no half state, nothing silently stuck. Database tests run on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import builtins
import errno
import hashlib
import os
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from fedhealth.core import FedHealthError, ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.governance import spec_hash
from fedhealth.orchestrator import (
    BlobStore,
    ModelVersion,
    NewRound,
    OrchestratorService,
    OrchestratorSettings,
    Store,
    _blobs,
    _db,
    make_engine,
    sqlite_url,
    start_service,
    upgrade_database,
)
from fedhealth.orchestrator._blobs import BlobKind
from fedhealth.orchestrator._routes_tasks import accept_result
from fedhealth.orchestrator._store import RoundRow, TaskRow
from fedhealth.protocol import (
    Ack,
    ApprovalState,
    ResultManifest,
    RoundStatus,
    SiteMetrics,
    StudySpec,
    StudyStatus,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import encode_update, param_specs
from support import breast_spec, postgres_admin, postgres_schema, synthetic_recipe

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "orchestrator.sqlite")
    else:
        with postgres_schema() as url:
            yield url


# --- migrations: an older database upgraded in place -----------------------------------------------------


def _alembic() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(_db.__file__).with_name("migrations")))
    return cfg


def _migrate_to(engine: sa.Engine, revision: str) -> None:
    """The schema as release ``revision`` left it (what an orchestrator of that release created)."""
    cfg = _alembic()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def _revision(engine: sa.Engine) -> list[str]:
    with engine.connect() as c:
        return [row[0] for row in c.exec_driver_sql("SELECT version_num FROM alembic_version")]


def _counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as c:
        return {
            table: c.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one()
            for table in ("sites", "studies", "rounds", "tasks", "model_versions")
        }


def _fill_first_release(engine: sa.Engine) -> StudySpec:
    """What an orchestrator of the first schema held mid-study: sites, a study whose round 1 completed
    (its model version recorded) and whose round 2 is open with one result in."""
    spec = breast_spec(["a", "b"], rounds=3)
    rows = [
        ("INSERT INTO sites (name, created_at) VALUES ('a', '2026-01-01 00:00:00')", {}),
        ("INSERT INTO sites (name, created_at) VALUES ('b', '2026-01-01 00:00:00')", {}),
        (
            "INSERT INTO studies (id, name, spec_json, status, created_at, completed_rounds, model_digest) "
            "VALUES ('st_old', 'breast', :spec, 'running', '2026-01-01 00:00:00', 1, :b)",
            {"spec": spec.model_dump_json(), "b": DIGEST_B},
        ),
        (
            "INSERT INTO rounds (id, study_id, number, kind, status, started_at, deadline_at, ended_at, "
            "model_in_digest, model_out_digest) VALUES ('rd_1', 'st_old', 1, 'train', 'completed', "
            "'2026-01-01 00:00:00', '2026-01-01 00:10:00', '2026-01-01 00:05:00', :a, :b)",
            {"a": DIGEST_A, "b": DIGEST_B},
        ),
        (
            "INSERT INTO rounds (id, study_id, number, kind, status, started_at, deadline_at, "
            "model_in_digest) VALUES ('rd_2', 'st_old', 2, 'train', 'open', '2026-01-01 00:05:00', "
            "'2026-01-01 00:15:00', :b)",
            {"b": DIGEST_B},
        ),
        (
            "INSERT INTO model_versions (digest, study_id, round, parent_digest, created_at, num_sites) "
            "VALUES (:b, 'st_old', 1, :a, '2026-01-01 00:05:00', 2)",
            {"a": DIGEST_A, "b": DIGEST_B},
        ),
    ]
    for i, (rnd, site, status, digest) in enumerate(
        [
            ("rd_1", "a", "completed", "c" * 64),
            ("rd_1", "b", "completed", "d" * 64),
            ("rd_2", "a", "completed", "e" * 64),
            ("rd_2", "b", "delivered", None),
        ]
    ):
        rows.append(
            (
                "INSERT INTO tasks (id, round_id, study_id, site, kind, status, created_at, result_digest, "
                f"num_samples) VALUES ('tk_{i}', '{rnd}', 'st_old', '{site}', 'train', '{status}', "
                "'2026-01-01 00:00:00', :digest, :n)",
                {"digest": digest, "n": 10 if digest else None},
            )
        )
    with engine.begin() as c:
        for sql, params in rows:
            c.execute(sa.text(sql), params)
    return spec


def test_a_database_of_the_first_schema_mid_study_upgrades_in_place_and_keeps_every_row(db_url):
    engine = make_engine(db_url)
    try:
        _migrate_to(engine, "0001")
        spec = _fill_first_release(engine)
        before = _counts(engine)

        upgrade_database(engine)  # what the next start-up does

        fresh = make_engine(db_url)  # committed, as another process sees it
        try:
            assert _revision(fresh) == list(ScriptDirectory.from_config(_alembic()).get_heads())
            assert _counts(fresh) == before
        finally:
            fresh.dispose()
        store = Store(engine)
        study = store.get_study("st_old")
        assert (study.status, study.completed_rounds, study.model_digest) == (
            StudyStatus.RUNNING,
            1,
            DIGEST_B,
        )
        assert study.spec_hash == spec_hash(spec.model_dump(mode="json"))
        assert [(r.number, r.status) for r in store.rounds_of("st_old")] == [
            (1, RoundStatus.COMPLETED),
            (2, RoundStatus.OPEN),
        ]
        assert [(t.site, t.status, t.result_digest) for t in store.tasks_of_round("rd_2")] == [
            ("a", TaskStatus.COMPLETED, "e" * 64),
            ("b", TaskStatus.DELIVERED, None),
        ]
        assert store.model_version(DIGEST_B) is not None
        with engine.connect() as c:
            if engine.dialect.name == "sqlite":  # the rebuilt tables still reference what they did
                assert c.exec_driver_sql("PRAGMA foreign_key_check").all() == []
                assert c.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        # and the upgraded database takes new writes that its new constraints check
        store.create_site("c", T0)
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as c:
            c.exec_driver_sql(
                "INSERT INTO tasks (id, round_id, study_id, site, kind, status, created_at) "
                "VALUES ('tk_x', 'rd_2', 'st_old', 'nobody', 'train', 'pending', '2026-01-01')"
            )
    finally:
        engine.dispose()


def test_a_migration_that_fails_half_way_leaves_the_old_schema_and_a_later_start_upgrades_it(db_url):
    engine = make_engine(db_url)
    try:
        _migrate_to(engine, "0001")
        with engine.begin() as c:  # a stored spec that migration 0006 cannot read: it fails after 0002-0005
            c.exec_driver_sql("INSERT INTO sites (name, created_at) VALUES ('a', '2026-01-01 00:00:00')")
            c.execute(
                sa.text(
                    "INSERT INTO studies (id, name, spec_json, status, created_at, completed_rounds, "
                    "model_digest) VALUES ('st_bad', 'x', '{not json', 'running', '2026-01-01', 0, :a)"
                ),
                {"a": DIGEST_A},
            )
        tables_before = set(sa.inspect(engine).get_table_names())

        with pytest.raises(ValueError):
            upgrade_database(engine)

        # nothing of the failed upgrade stays: not its tables, not a half-set revision
        assert _revision(engine) == ["0001"]
        assert set(sa.inspect(engine).get_table_names()) == tables_before
        assert [c["name"] for c in sa.inspect(engine).get_columns("sites")] == [
            "name",
            "created_at",
            "last_seen_at",
        ]
        with engine.begin() as c:  # the operator repairs the row; the next start upgrades
            c.execute(
                sa.text("UPDATE studies SET spec_json = :s WHERE id = 'st_bad'"),
                {"s": breast_spec(["a"], rounds=1).model_dump_json()},
            )
        upgrade_database(engine)
        assert Store(engine).get_study("st_bad").spec_hash is not None
        assert "revoked_tokens" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


# --- the blob store: a full disk, a killed writer, bytes changed on disk ------------------------------------


class _FullDisk:
    """A file whose device fills up: at the first write (half its bytes stored), or at the flush, as a
    buffered write shows it, with ENOSPC."""

    fails_at = "write"

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, data: bytes) -> int:
        if self.fails_at == "flush":
            return int(self._file.write(data))
        self._file.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        self._file.flush()
        if self.fails_at == "flush":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


class _Disk:
    """The blob store's disk: :meth:`fill` it and every blob file opened for writing from then on hits a
    full disk (at ``fails_at``); :meth:`free` it again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch

    def fill(self, fails_at: str = "write") -> None:
        real_open = builtins.open

        def open_on_full_disk(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(file, mode, *args, **kwargs)
            return _FullDisk(handle) if "w" in mode else handle

        self._monkeypatch.setattr(_FullDisk, "fails_at", fails_at)
        self._monkeypatch.setattr(_blobs, "open", open_on_full_disk, raising=False)

    def free(self) -> None:
        self._monkeypatch.undo()


@pytest.fixture
def disk(monkeypatch) -> _Disk:
    return _Disk(monkeypatch)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_model_write_that_hits_a_full_disk_fails_clearly_leaves_no_file_and_succeeds_once_there_is_room(
    tmp_path, disk
):
    blobs = BlobStore(tmp_path / "blobs")
    disk.fill()
    data = b"a global model" * 1000
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(OSError) as raised:
        blobs.put(data)
    assert raised.value.errno == errno.ENOSPC
    assert _files(tmp_path / "blobs") == []  # neither half a blob under its name nor a temporary file
    assert not blobs.exists(digest)
    disk.free()
    assert blobs.put(data) == digest
    assert BlobStore(tmp_path / "blobs").get(digest) == data


def _write_and_read_back(writer: _blobs.BlobWriter, data: bytes) -> bytes:
    writer.write(data)
    return writer.read()


@pytest.mark.parametrize("fails_at", ["write", "flush"])
def test_an_upload_that_hits_a_full_disk_fails_clearly_and_leaves_no_file(tmp_path, disk, fails_at):
    blobs = BlobStore(tmp_path / "blobs")
    disk.fill(fails_at)
    data = b"a site's update" * 1000
    writer = blobs.writer(BlobKind.UPDATE)
    try:
        with pytest.raises(OSError) as raised:  # at the write, or when the route reads the update back
            _write_and_read_back(writer, data)
        assert raised.value.errno == errno.ENOSPC
        with pytest.raises(OSError):  # half an update is never stored under the whole one's digest
            writer.commit()
    finally:
        writer.discard()  # what the upload route does on any error
    assert _files(tmp_path / "blobs") == []
    assert not blobs.exists(hashlib.sha256(data).hexdigest(), kind=BlobKind.UPDATE)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":  # a power cut after the rename, before the bytes reached the disk
        path.write_bytes(data[: len(data) // 3])
    else:  # one byte changed in place (a bad disk, or someone with access to the files)
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:])


@pytest.mark.parametrize("how", ["truncated", "changed"])
@pytest.mark.parametrize("kind", [BlobKind.MODEL, BlobKind.UPDATE])
def test_a_blob_damaged_on_disk_is_never_returned_as_if_it_were_the_stored_bytes(tmp_path, kind, how):
    data = bytes(range(256)) * 64
    digest = BlobStore(tmp_path / "blobs").put(data, kind=kind)
    _damage(BlobStore(tmp_path / "blobs").path(digest, kind), how)
    restarted = BlobStore(tmp_path / "blobs")  # nothing cached: what an orchestrator reads after a restart
    with pytest.raises(FedHealthError, match=digest):
        restarted.get(digest, kind=kind)
    if kind is BlobKind.MODEL:
        with pytest.raises(FedHealthError, match=digest):
            restarted.get_if_small(digest, 1 << 20)


@pytest.mark.parametrize("how", ["truncated", "changed"])
@pytest.mark.parametrize("kind", [BlobKind.MODEL, BlobKind.UPDATE])
def test_storing_a_damaged_blobs_bytes_again_repairs_it(tmp_path, kind, how):
    """A site retries its upload, the engine makes the same model again: the good bytes replace the bad."""
    data = bytes(range(256)) * 64
    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put(data, kind=kind)
    _damage(blobs.path(digest, kind), how)
    restarted = BlobStore(tmp_path / "blobs")
    if kind is BlobKind.UPDATE:  # through the upload route's writer
        writer = restarted.writer(kind)
        writer.write(data)
        assert writer.commit() == digest
    else:
        assert restarted.put(data) == digest
    assert BlobStore(tmp_path / "blobs").get(digest, kind=kind) == data
    assert [name for name in _files(tmp_path / "blobs") if name.endswith(".tmp")] == []


def test_with_fsync_a_stored_blob_and_its_name_in_its_folder_survive_a_power_cut(tmp_path, monkeypatch):
    """fsync of the file alone leaves its rename in the page cache: after a power cut the database (synced)
    would name a blob its folder does not hold. The bytes are synced before the rename, the folder after
    it, and a new folder's parent after the folder is made."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def recording_replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        events.append(("rename", str(dst)))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    blobs = BlobStore(tmp_path / "blobs", fsync=True)

    def check(path: Path) -> None:
        renamed = events.index(("rename", str(path)))
        bytes_synced = [i for i, (what, p) in enumerate(events) if what == "fsync" and p.endswith(".tmp")]
        assert bytes_synced
        assert bytes_synced[0] < renamed
        assert ("fsync", str(path.parent)) in events[renamed:]
        assert ("fsync", str(path.parent.parent)) in events[renamed:]
        events.clear()

    for kind in (BlobKind.MODEL, BlobKind.UPDATE):
        data = f"bytes of a {kind}".encode()
        check(blobs.path(blobs.put(data, kind=kind), kind))
        writer = blobs.writer(kind)
        writer.write(b"streamed " + data)
        check(blobs.path(writer.commit(), kind))


def test_temporary_files_of_a_killed_writer_are_removed_when_the_store_opens_and_live_ones_are_kept(
    tmp_path,
):
    blobs = BlobStore(tmp_path / "blobs")
    live = blobs.writer(BlobKind.UPDATE)  # this process's upload, still arriving
    live.write(b"still arriving")
    try:
        _open_after_a_kill(blobs, tmp_path)
        assert live.commit() == hashlib.sha256(b"still arriving").hexdigest()  # untouched
    finally:
        live.discard()


def _open_after_a_kill(blobs: BlobStore, tmp_path: Path) -> None:
    dead_pid = 2**22 + 17  # above the kernel's pid_max: never a live process
    assert not Path(f"/proc/{dead_pid}").exists()
    leftovers = [
        blobs.root_of(BlobKind.UPDATE) / f".upload.{dead_pid}.140.0123456789abcdef.tmp",
        blobs.root_of(BlobKind.MODEL) / f".upload.{dead_pid}.140.fedcba9876543210.tmp",
        blobs.root_of(BlobKind.MODEL) / "ab" / f".{'ab' * 32}.{dead_pid}.140.tmp",
    ]
    for leftover in leftovers:
        leftover.parent.mkdir(exist_ok=True)
        leftover.write_bytes(b"half an upload")
    BlobStore(tmp_path / "blobs")  # the orchestrator starts again
    assert not any(p.exists() for p in leftovers)


# --- the orchestrator's service over its store and blobs: full disk, damaged updates, restarts ------------

SITES = ["east", "north", "south"]


def _synthetic_spec(**fields: Any) -> StudySpec:
    return StudySpec.model_validate(
        {
            "name": "persistence",
            "dataset": "none",
            "recipe": synthetic_recipe(8),
            "rounds": 2,
            "train_sites": SITES,
            "min_sites": 3,
            "round_deadline_s": 600.0,
            **fields,
        }
    )


def _life(
    tmp_path: Path, db_url: str, clock: ManualClock, body: Callable[[OrchestratorService], Awaitable[None]]
) -> None:
    """One life of the orchestrator: it starts (migrates, recovers), runs ``body``, and stops without any
    shutdown work beyond closing its handles (as after a kill, the database and files are what remains)."""

    async def main() -> None:
        settings = OrchestratorSettings(
            state_dir=tmp_path / "state", signing_key=SIGNING_KEY, database_url=db_url, clock=clock
        )
        svc = await start_service(settings)
        try:
            await body(svc)
        finally:
            await svc.close()

    asyncio.run(main())


SIGNING_KEY = IdentityKey.generate()


async def _study(svc: OrchestratorService, *, approved: bool = True, **fields: Any) -> str:
    spec = _synthetic_spec(**fields)
    digest = spec_hash(spec.model_dump(mode="json"))
    for site in SITES:
        if svc.store.get_site_or_none(site) is None:
            svc.store.create_site(site, svc.settings.clock.now())
        if approved:
            svc.store.record_approval(site, digest, ApprovalState.APPROVED, svc.settings.clock.now())
    return (await svc.engine.create_study(spec, approval_wait_s=3600)).id


def _open_task(svc: OrchestratorService, study_id: str, site: str) -> TaskRow:
    (r,) = [x for x in svc.store.open_rounds() if x.study_id == study_id]
    (task,) = [t for t in svc.store.tasks_of_round(r.id) if t.site == site]
    return task


def _upload(svc: OrchestratorService, task: TaskRow, fill: float = 0.01) -> bytes:
    spec = svc.store.spec(task.study_id)
    delta = {s.name: np.full(s.shape, fill, np.float32) for s in param_specs(spec.recipe)}
    return encode_update(delta, ResultManifest(task_id=task.id, metrics=SiteMetrics(num_samples=10)))


def test_an_upload_that_hits_a_full_disk_keeps_the_task_open_and_is_stored_when_retried(
    tmp_path, db_url, disk
):
    async def body(svc: OrchestratorService) -> None:
        study_id = await _study(svc)
        task = _open_task(svc, study_id, "north")
        update = _upload(svc, task)
        disk.fill()
        with pytest.raises(OSError) as raised:
            await accept_result(svc, "north", task.id, update)
        assert raised.value.errno == errno.ENOSPC
        assert svc.store.get_task(task.id).is_open  # the site retries: nothing of the round was lost
        assert _files(svc.blobs.root_of(BlobKind.UPDATE)) == []
        disk.free()
        assert await accept_result(svc, "north", task.id, update) == Ack()
        stored = svc.store.get_task(task.id)
        assert stored.status is TaskStatus.COMPLETED
        assert svc.blobs.get(stored.result_digest or "", kind=BlobKind.UPDATE) == update

    _life(tmp_path, db_url, ManualClock(T0), body)


def test_an_update_damaged_on_disk_before_aggregation_fails_the_study_with_the_reason_not_a_silent_model(
    tmp_path, db_url
):
    clock = ManualClock(T0)
    study: dict[str, str] = {}

    async def first_life(svc: OrchestratorService) -> None:
        study["id"] = await _study(svc)
        for site in SITES:  # stored, and the orchestrator is killed before the round closes
            task = _open_task(svc, study["id"], site)
            digest = svc.blobs.put(_upload(svc, task), kind=BlobKind.UPDATE)
            assert svc.store.complete_task(
                task.id, digest=digest, num_samples=10, metrics=SiteMetrics(num_samples=10), when=clock.now()
            )
            if site == "north":
                _damage(svc.blobs.path(digest, BlobKind.UPDATE), "changed")  # still a valid tensor file

    async def second_life(svc: OrchestratorService) -> None:  # recovery closes the round
        row = svc.store.get_study(study["id"])
        assert row.status is StudyStatus.FAILED
        assert "damaged" in (row.reason or "")
        assert svc.store.model_versions_of(study["id"]) == []  # no model made from other bytes

    _life(tmp_path, db_url, clock, first_life)
    _life(tmp_path, db_url, clock, second_life)


def test_deadlines_that_passed_while_the_orchestrator_was_down_resume_or_fail_with_a_reason(tmp_path, db_url):
    """An open round past its deadline is resumed with a fresh one and keeps its results (architecture.md,
    "Durability"); a study past its approval deadline fails at start naming who did not approve."""
    clock = ManualClock(T0)
    ids: dict[str, str] = {}

    async def first_life(svc: OrchestratorService) -> None:
        ids["running"] = await _study(svc)
        ids["awaiting"] = await _study(svc, approved=False, name="waiting")
        task = _open_task(svc, ids["running"], "north")
        assert await accept_result(svc, "north", task.id, _upload(svc, task)) == Ack()
        ids["task"] = task.id

    async def second_life(svc: OrchestratorService) -> None:
        await asyncio.sleep(0.05)  # the approval timer, armed in the past, fires at once
        awaiting = svc.store.get_study(ids["awaiting"])
        assert awaiting.status is StudyStatus.FAILED
        assert awaiting.reason == "approval deadline passed: not approved by east, north, south"
        running = svc.store.get_study(ids["running"])
        assert running.status is StudyStatus.RUNNING
        (r,) = svc.store.open_rounds()
        assert r.number == 1
        assert r.deadline_at == clock.now() + timedelta(seconds=600)
        tasks = {t.site: t for t in svc.store.tasks_of_round(r.id)}
        assert tasks["north"].status is TaskStatus.COMPLETED
        assert [tasks["east"].is_open, tasks["south"].is_open] == [True, True]

    _life(tmp_path, db_url, clock, first_life)
    clock.advance(2 * 3600)  # down for two hours: past both deadlines
    _life(tmp_path, db_url, clock, second_life)


# --- a write that fails half way: a constraint, a connection killed mid-transaction ------------------------


def _store_with_round(db_url: str) -> tuple[Store, str, str]:
    engine = make_engine(db_url)
    upgrade_database(engine)
    store = Store(engine)
    for site in ("a", "b"):
        store.create_site(site, T0)
    first = NewRound(
        number=1, kind=TaskKind.TRAIN, sites=["a", "b"], model_in_digest=DIGEST_A, deadline_at=T0
    )
    study, r = store.create_study(
        spec=breast_spec(["a", "b"], rounds=2), model_digest=DIGEST_A, state_digest=None, first=first, when=T0
    )
    assert r is not None
    (task, _) = store.tasks_of_round(r.id)
    assert store.complete_task(
        task.id, digest=DIGEST_B, num_samples=10, metrics=SiteMetrics(num_samples=10), when=T0
    )
    return store, study.id, r.id


def _snapshot(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    with store.engine.connect() as c:
        return {
            table: sorted(tuple(map(str, row)) for row in c.exec_driver_sql(f"SELECT * FROM {table}"))
            for table in ("studies", "rounds", "tasks", "model_versions")
        }


def _close_round_one(store: Store, study_id: str, round_id: str, next_sites: list[str]) -> RoundRow | None:
    return store.finish_round(
        round_id,
        status=RoundStatus.COMPLETED,
        reason=None,
        when=T0 + timedelta(seconds=5),
        model_out="c" * 64,
        version=ModelVersion(
            digest="c" * 64,
            study_id=study_id,
            round=1,
            parent_digest=DIGEST_A,
            created_at=T0,
            num_sites=1,
            train_loss=None,
        ),
        next_round=NewRound(
            number=2, kind=TaskKind.TRAIN, sites=next_sites, model_in_digest="c" * 64, deadline_at=T0
        ),
    )


def test_a_round_close_refused_by_a_constraint_half_way_leaves_every_table_as_it_was(db_url):
    store, study_id, round_id = _store_with_round(db_url)
    try:
        before = _snapshot(store)
        # the round closes, its task times out, the study moves on, the version is recorded, round 2 opens
        # ... and its task for an unknown site breaks a foreign key: the last statement of the transaction
        with pytest.raises(sa.exc.IntegrityError):
            _close_round_one(store, study_id, round_id, ["a", "nobody"])
        assert _snapshot(store) == before
        assert _close_round_one(store, study_id, round_id, ["a", "b"]) is not None  # still closable, once
        assert store.get_study(study_id).completed_rounds == 1
    finally:
        store.engine.dispose()


@pytest.mark.postgres
def test_a_round_close_whose_postgres_connection_is_killed_half_way_leaves_no_half_state_and_recovers():
    with postgres_schema() as url:
        store, study_id, round_id = _store_with_round(url)
        try:
            before = _snapshot(store)
            killed: list[int] = []

            def kill_before_the_version(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
                if statement.lstrip().upper().startswith("INSERT INTO MODEL_VERSIONS") and not killed:
                    pid = conn.connection.driver_connection.info.backend_pid
                    with postgres_admin().connect() as admin:
                        admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                    killed.append(pid)

            sa.event.listen(store.engine, "before_cursor_execute", kill_before_the_version)
            with pytest.raises(sa.exc.OperationalError):
                _close_round_one(store, study_id, round_id, ["a", "b"])
            assert killed
            sa.event.remove(store.engine, "before_cursor_execute", kill_before_the_version)
            assert _snapshot(store) == before  # a new connection from the pool: the old one was dropped
            assert _close_round_one(store, study_id, round_id, ["a", "b"]) is not None
            assert [r.status for r in store.rounds_of(study_id)] == [RoundStatus.COMPLETED, RoundStatus.OPEN]
        finally:
            store.engine.dispose()


def _test_client() -> Any:
    import warnings

    with warnings.catch_warnings():
        # starlette would rather drive its test client with httpx2; we pin the httpx it also supports
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from starlette.testclient import TestClient
    return TestClient


@pytest.mark.parametrize(
    ("raised", "status", "error"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), 503, "the orchestrator's disk is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), 503, "the orchestrator's disk is full"),
        (_blobs.DamagedBlobError("blob 00 is damaged on disk"), 500, "blob 00 is damaged on disk"),
    ],
)
def test_a_full_disk_is_a_503_to_retry_and_a_damaged_blob_a_500_in_the_one_error_shape(raised, status, error):
    """A full disk stored nothing, so the client may send the same again later (503, Retry-After: agents
    retry it); a damaged blob is the server's fault, not the request's (500, not 400)."""
    from fastapi import FastAPI

    from fedhealth.orchestrator._http import DISK_FULL_RETRY_S, install_error_handlers

    TestClient = _test_client()

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/upload")
    async def upload() -> None:
        raise raised

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/upload")
    assert answer.status_code == status
    assert answer.json()["error"].startswith(error)
    if status == 503:
        assert answer.headers["Retry-After"] == str(DISK_FULL_RETRY_S)


def test_another_os_error_is_still_the_servers_generic_500():
    from fastapi import FastAPI

    from fedhealth.orchestrator._http import install_error_handlers

    TestClient = _test_client()

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/upload")
    async def upload() -> None:
        raise OSError(errno.EIO, "Input/output error")

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/upload")
    assert answer.status_code == 500
    assert "Retry-After" not in answer.headers
