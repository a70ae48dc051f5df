from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from support import heart_data_dir, postgres_admin, postgres_schema_name


@pytest.fixture(scope="session")
def heart_dir() -> Path:
    return heart_data_dir()


@pytest.fixture
def pg() -> Iterator[tuple[sa.Engine, str]]:
    """The test PostgreSQL server and a throwaway schema on it (dropped afterwards)."""
    with postgres_schema_name("conn") as schema:
        yield postgres_admin(), schema
