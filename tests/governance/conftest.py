"""Fixtures for the governance tests: one database per test, on SQLite or PostgreSQL.

Storage tests are written once as a contract class and run on both backends by subclasses that set
``backend = "sqlite"`` or ``backend = "postgres"`` (the latter marked ``postgres``). PostgreSQL runs in a
throwaway schema per test on the suite's one test server (``support.POSTGRES_URL``); an unreachable server
fails the test.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from fedhealth.core import ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.governance import GOVERNANCE_METADATA, AuditLog, create_governance_tables
from support import POSTGRES_URL, postgres_admin


@dataclass(frozen=True)
class Database:
    """An engine plus what a child process needs to open the same database."""

    engine: Engine
    url: str
    schema: str | None  # PostgreSQL: the search_path to set


def open_engine(url: str, schema: str | None) -> Engine:
    """How tests open a test database (SQLite without fsync: the machine is shared and durability is moot)."""
    if schema is None:
        engine = create_engine(url)
        event.listen(engine, "connect", _no_fsync)
        return engine
    # without waiting for the WAL flush at each commit: durability is moot in a throwaway schema
    return create_engine(url, connect_args={"options": f"-csearch_path={schema} -csynchronous_commit=off"})


def _no_fsync(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous = OFF")


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty governance database, created once and copied for each test (creating tables is slow)."""
    path = tmp_path_factory.mktemp("template") / "governance.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    create_governance_tables(engine)
    engine.dispose()
    return path


@lru_cache(maxsize=1)
def _postgres_ddl() -> str:
    """GOVERNANCE_METADATA's CREATE statements for PostgreSQL as one script: one round trip per test."""
    dialect = postgresql.dialect()
    statements = []
    for table in GOVERNANCE_METADATA.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=dialect)).strip())
        statements += [str(CreateIndex(index).compile(dialect=dialect)).strip() for index in table.indexes]
    return ";\n".join(statements)


@pytest.fixture
def database(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[Database]:
    backend = getattr(request.cls, "backend", "sqlite")
    if backend == "sqlite":
        path = tmp_path / "governance.sqlite"
        shutil.copyfile(sqlite_template, path)
        url = f"sqlite:///{path}"
        engine = open_engine(url, None)
        yield Database(engine=engine, url=url, schema=None)
        engine.dispose()
        return
    admin = postgres_admin()
    schema = f"gov_test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(
            f'CREATE SCHEMA "{schema}"; SET LOCAL search_path TO "{schema}"; {_postgres_ddl()}'
        )
    engine = open_engine(POSTGRES_URL, schema)
    try:
        yield Database(engine=engine, url=POSTGRES_URL, schema=schema)
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')


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
