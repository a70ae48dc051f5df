"""Fixtures for the privacy tests: the ledger's two databases (SQLite file, PostgreSQL throwaway schema)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from fedhealth.core import ManualClock
from fedhealth.privacy import AccountantKind, BudgetLedger, sqlite_engine

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class LedgerDb:
    """How to reach one ledger database, also from a subprocess."""

    engine: sa.Engine
    url: str
    search_path: str | None

    def ledger(self, accountant: AccountantKind = AccountantKind.RDP) -> BudgetLedger:
        return BudgetLedger(self.engine, ManualClock(), accountant=accountant)


def postgres_engine(search_path: str) -> sa.Engine:
    return sa.create_engine(POSTGRES_URL, connect_args={"options": f"-csearch_path={search_path}"})


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_db(request: pytest.FixtureRequest, tmp_path) -> Iterator[LedgerDb]:
    if request.param == "sqlite":
        path = tmp_path / "site.sqlite"
        engine = sqlite_engine(path)
        BudgetLedger.create_schema(engine)
        yield LedgerDb(engine=engine, url=str(path), search_path=None)
        engine.dispose()
        return
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    schema = f"ledger_{secrets.token_hex(6)}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL}: {exc.orig}")
    engine = postgres_engine(schema)
    BudgetLedger.create_schema(engine)
    try:
        yield LedgerDb(engine=engine, url=POSTGRES_URL, search_path=schema)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()
