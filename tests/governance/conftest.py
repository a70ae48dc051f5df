"""Fixtures for the governance tests: one database per test, on SQLite or PostgreSQL.

Storage tests are written once as a contract class and run on both backends by subclasses that set
``backend = "sqlite"`` or ``backend = "postgres"`` (the latter marked ``postgres``). PostgreSQL runs in a
throwaway schema per test at ``$FEDHEALTH_TEST_POSTGRES_URL`` (default: trust auth on 127.0.0.1:5432/test).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError

from fedhealth.core import ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.governance import AuditLog, create_governance_tables

POSTGRES_URL = os.environ.get(
    "FEDHEALTH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
_postgres_reachable: bool | None = None


@dataclass(frozen=True)
class Database:
    """An engine plus what a child process needs to open the same database."""

    engine: Engine
    url: str
    schema: str | None  # PostgreSQL: the search_path to set


def _check_postgres() -> bool:
    global _postgres_reachable
    if _postgres_reachable is None:
        probe = create_engine(POSTGRES_URL)
        try:
            with probe.connect() as conn:
                conn.execute(text("SELECT 1"))
            _postgres_reachable = True
        except OperationalError:
            _postgres_reachable = False
        finally:
            probe.dispose()
    return _postgres_reachable


def open_engine(url: str, schema: str | None) -> Engine:
    """How tests open a test database (SQLite without fsync: the machine is shared and durability is moot)."""
    if schema is None:
        engine = create_engine(url)
        event.listen(engine, "connect", _no_fsync)
        return engine
    return create_engine(url, connect_args={"options": f"-csearch_path={schema}"})


def _no_fsync(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous = OFF")


@pytest.fixture
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    backend = getattr(request.cls, "backend", "sqlite")
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'governance.sqlite'}"
        engine = open_engine(url, None)
        create_governance_tables(engine)
        yield Database(engine=engine, url=url, schema=None)
        engine.dispose()
        return
    if not _check_postgres():
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL}")
    schema = f"gov_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = open_engine(POSTGRES_URL, schema)
    try:
        create_governance_tables(engine)
        yield Database(engine=engine, url=POSTGRES_URL, schema=schema)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def engine(database: Database) -> Engine:
    return database.engine


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 3, 2, 9, 0, tzinfo=UTC))


@pytest.fixture
def site_key() -> IdentityKey:
    return IdentityKey.generate()


@pytest.fixture
def site_log(engine: Engine, site_key: IdentityKey, clock: ManualClock) -> AuditLog:
    return AuditLog(engine, site_key, "site:hospital-a", clock)
