"""Database schema and engine set-up for the orchestrator (SQLAlchemy Core; SQLite or PostgreSQL).

The schema is defined once here; Alembic migrations (``migrations/``) create and evolve it, and
:func:`upgrade_database` applies them at start-up, so a new release can open an old database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url

from fedhealth.core import create_private_file

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

UTC_DATETIME = DateTime(timezone=True)

sites = Table(
    "sites",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("created_at", UTC_DATETIME, nullable=False),
    Column("last_seen_at", UTC_DATETIME, nullable=True),
    # pending (registered, not enrolled) -> active (public key known) -> revoked
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("public_key", String(64), nullable=True),  # hex of the raw Ed25519 key
    Column("enrolled_at", UTC_DATETIME, nullable=True),
    Column("revoked_at", UTC_DATETIME, nullable=True),
    # what the site's agent said at its last login, and its last `fedhealth site check` (figures only)
    Column("software_version", String(40), nullable=True),
    Column("protocol_version", Integer, nullable=True),
    Column("readiness_json", Text, nullable=True),
    # sha256 of the TLS client certificate issued at enrollment (mutual TLS pins exactly this certificate)
    Column("cert_fingerprint", String(64), nullable=True),
)

enrollment_tokens = Table(
    "enrollment_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("site", String(63), ForeignKey("sites.name"), nullable=False),
    Column("created_at", UTC_DATETIME, nullable=False),
    Column("expires_at", UTC_DATETIME, nullable=False),
    Column("used_at", UTC_DATETIME, nullable=True),
)

challenges = Table(
    "challenges",
    metadata,
    Column("challenge", String(64), primary_key=True),
    Column("site", String(63), ForeignKey("sites.name"), nullable=False),
    Column("created_at", UTC_DATETIME, nullable=False),
    Column("expires_at", UTC_DATETIME, nullable=False),
    Column("used_at", UTC_DATETIME, nullable=True),
)
Index("ix_challenges_expires", challenges.c.expires_at)

users = Table(
    "users",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("api_key_hash", String(64), nullable=False),
    Column("created_at", UTC_DATETIME, nullable=False),
    Column("revoked_at", UTC_DATETIME, nullable=True),
)

revoked_tokens = Table(  # operator tokens ended before they expire (a dashboard sign-out), until then
    "revoked_tokens",
    metadata,
    Column("token_id", String(64), primary_key=True),
    Column("expires_at", UTC_DATETIME, nullable=False),
)
Index("ix_revoked_tokens_expires", revoked_tokens.c.expires_at)

studies = Table(
    "studies",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(63), nullable=False),
    Column("spec_json", Text, nullable=False),
    Column("status", String(32), nullable=False),  # "awaiting_approval" is 17 long
    Column("reason", Text, nullable=True),
    Column("created_at", UTC_DATETIME, nullable=False),
    Column("ended_at", UTC_DATETIME, nullable=True),
    Column("completed_rounds", Integer, nullable=False, default=0),
    Column("model_digest", String(64), nullable=False),
    Column("state_digest", String(64), nullable=True),
    Column("spec_hash", String(64), nullable=True),  # what the sites' stewards approve
    Column("approval_deadline_at", UTC_DATETIME, nullable=True),  # while awaiting_approval
)
Index("ix_studies_spec_hash", studies.c.spec_hash)

# Each site's latest decision on a spec hash, as the site reported it (the steward's reason stays there).
# Keyed by hash, not study: a steward may approve a spec before the study is submitted.
site_approvals = Table(
    "site_approvals",
    metadata,
    Column("site", String(63), ForeignKey("sites.name"), primary_key=True),
    Column("spec_hash", String(64), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("reported_at", UTC_DATETIME, nullable=False),
)

rounds = Table(
    "rounds",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("study_id", String(40), ForeignKey("studies.id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("started_at", UTC_DATETIME, nullable=False),
    Column("deadline_at", UTC_DATETIME, nullable=False),
    Column("ended_at", UTC_DATETIME, nullable=True),
    Column("model_in_digest", String(64), nullable=False),
    Column("model_out_digest", String(64), nullable=True),
    Column("state_out_digest", String(64), nullable=True),
    Column("metrics_json", Text, nullable=True),
    UniqueConstraint("study_id", "number", name="uq_rounds_study_number"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("round_id", String(40), ForeignKey("rounds.id"), nullable=False),
    Column("study_id", String(40), ForeignKey("studies.id"), nullable=False),
    Column("site", String(63), ForeignKey("sites.name"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("created_at", UTC_DATETIME, nullable=False),
    Column("delivered_at", UTC_DATETIME, nullable=True),
    Column("ended_at", UTC_DATETIME, nullable=True),
    Column("result_digest", String(64), nullable=True),
    Column("num_samples", Integer, nullable=True),
    Column("metrics_json", Text, nullable=True),
    Column("attestation_json", Text, nullable=True),  # SiteAttestation: audit head, fingerprints, DP spend
    UniqueConstraint("round_id", "site", name="uq_tasks_round_site"),
)
Index("ix_tasks_site_status", tasks.c.site, tasks.c.status)
Index("ix_tasks_round", tasks.c.round_id)

model_versions = Table(
    "model_versions",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("study_id", String(40), ForeignKey("studies.id"), nullable=False),
    Column("round", Integer, nullable=False),
    Column("parent_digest", String(64), nullable=True),
    Column("created_at", UTC_DATETIME, nullable=False),
    Column("num_sites", Integer, nullable=False),
    Column("train_loss", Float, nullable=True),
)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the single writer; NORMAL sync survives a killed process (the WAL is
    # in the OS page cache), and --fsync upgrades to FULL for power-loss durability.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str, *, fsync: bool = False) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``), our settings applied. A
    SQLite file that does not exist yet is created 0600 first (SQLite would create it, and its WAL files
    after it, with the process umask), wherever the URL puts it."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not database.startswith("file:"):
            create_private_file(Path(database))
        engine = create_engine(url, connect_args={"check_same_thread": False}, pool_size=8, max_overflow=8)
        sync = "FULL" if fsync else "NORMAL"

        def _on_connect(dbapi_connection: Any, record: Any) -> None:
            _sqlite_pragmas(dbapi_connection, record)
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA synchronous={sync}")
            cursor.close()

        event.listen(engine, "connect", _on_connect)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    except ImportError as exc:  # the driver is an optional extra
        from fedhealth.core import ConfigError

        raise ConfigError(
            f"no database driver for {url.split('://', 1)[0]} ({exc.name or exc}); "
            "for PostgreSQL install the extra: pip install 'fedhealth[postgres]'"
        ) from exc


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def upgrade_database(engine: Engine) -> None:
    """Apply every Alembic migration up to head (creates the schema on an empty database). ``heads``: branches
    added in parallel (each revising the same parent) are all applied, in dependency order."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    if engine.dialect.name != "sqlite":  # PostgreSQL: DDL is transactional, the whole upgrade is one
        with engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "heads")
        return
    with _sqlite_migration(engine) as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "heads")


@contextmanager
def _sqlite_migration(engine: Engine) -> Iterator[Connection]:
    """A connection for migrating a SQLite database: one transaction around every migration, foreign keys
    off while tables are rebuilt, then checked before the commit.

    The sqlite3 driver opens a transaction only before INSERT/UPDATE/DELETE, so each CREATE/ALTER/DROP of a
    migration would commit by itself: a migration that failed half way left its first tables behind under
    the old revision, and every later start failed on them ("table users already exists"). And a batch
    migration rebuilds a table (copy, DROP, rename): with foreign keys on, the DROP of ``studies`` or
    ``sites`` deletes its rows first and fails on the rounds and tasks referencing them, so a database
    holding any study could not be upgraded. SQLite's own procedure for this (lang_altertable.html): keys
    off outside the transaction, rebuild, ``PRAGMA foreign_key_check``, commit. The connection goes back
    to the pool with its settings restored."""
    connection = engine.connect()
    raw = connection.connection.driver_connection
    assert raw is not None
    isolation = raw.isolation_level
    try:
        raw.isolation_level = None  # the driver leaves transactions to us: BEGIN below covers the DDL too
        raw.execute("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction, so before BEGIN
        # Begun here, the transaction is the caller's to alembic, which then neither begins nor commits one
        # per migration; the driver's COMMIT/ROLLBACK end the BEGIN below.
        with connection.begin():
            raw.execute("BEGIN IMMEDIATE")  # the write lock at once: another process waits, not interleaves
            yield connection
            broken = raw.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"a migration left rows that reference nothing: {broken[:5]}")
    finally:
        raw.execute("PRAGMA foreign_keys=ON")
        raw.isolation_level = isolation
        connection.close()
