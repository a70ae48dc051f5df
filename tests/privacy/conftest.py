"""Fixtures for the privacy tests: the ledger's two databases (SQLite file, PostgreSQL throwaway schema)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from fedhealth.core import ManualClock
from fedhealth.privacy import AccountantKind, BudgetLedger, sqlite_engine
from support import POSTGRES_URL, postgres_schema_name


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
    with postgres_schema_name("ledger") as schema:
        engine = postgres_engine(schema)
        BudgetLedger.create_schema(engine)
        try:
            yield LedgerDb(engine=engine, url=POSTGRES_URL, search_path=schema)
        finally:
            engine.dispose()
