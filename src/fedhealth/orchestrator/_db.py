"""Database schema and engine set-up for the orchestrator (SQLAlchemy Core; SQLite or PostgreSQL).

The schema is defined once here; Alembic migrations (``migrations/``) create and evolve it, and
:func:`upgrade_database` applies them at start-up, so a new release can open an old database.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

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
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from fedhealth.core import ConfigError, create_private_file

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
    added in parallel (each revising the same parent) are all applied, in dependency order. A database that a
    newer release migrated is refused (:class:`ConfigError`, one line) and left as it is."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    _refuse_newer_schema(engine, ScriptDirectory.from_config(cfg))
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


def _refuse_newer_schema(engine: Engine, scripts: Any) -> None:
    """Alembic fails on a revision it does not know with a traceback ("Can't locate revision"); a database
    that a newer release upgraded is a downgrade of the software, so say that, before anything is touched."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_heads()
    known = {script.revision for script in scripts.walk_revisions()}
    unknown = sorted(set(current) - known)
    if unknown:
        raise ConfigError(
            f"the database's schema is at revision {', '.join(unknown)}, newer than this fedhealth knows "
            f"(up to {', '.join(sorted(scripts.get_heads()))}): a newer orchestrator upgraded it; "
            "run that release, or restore the database's backup from before the upgrade"
        )


# -- one orchestrator per database and per state folder ------------------------------------------------------

# The advisory lock's first key ("fedh"); the second is the hash of the schema, so orchestrators of two
# federations on one PostgreSQL database, each in its own schema, do not exclude each other.
_ADVISORY_CLASS = 0x66656468
# A dead client's session (a host that vanished, no FIN) holds its lock until TCP notices: keepalives make
# that well under a minute instead of the kernel's two hours.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


class OrchestratorLock:
    """Held for the life of an orchestrator process: a lock file ``flock``-ed in its state folder (its blobs
    and reports; and a SQLite database's own beside it), and on PostgreSQL a session advisory lock on a
    connection of its own. The kernel drops a flock, and PostgreSQL an advisory lock, when the process or
    its connection dies: a killed orchestrator leaves nothing that blocks its restart."""

    def __init__(self) -> None:
        self._files: list[int] = []
        self._engine: Engine | None = None
        self._connection: Connection | None = None
        self._url: str | None = None  # the PostgreSQL database whose advisory lock this holds
        self._keys: dict[str, Any] = {}

    def _lock_file(self, path: Path, what: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise ConfigError(
                f"another orchestrator{pid} is using {what} {path.parent}; stop it first "
                "(two orchestrators on one database would both run its rounds)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # who holds it, for the next one's message
        self._files.append(fd)

    def _lock_postgres(self, url: str) -> None:
        engine = create_engine(url, poolclass=NullPool, connect_args=dict(_KEEPALIVES))
        connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._engine, self._connection = engine, connection
        keys = {
            "c": _ADVISORY_CLASS,
            "k": connection.execute(text("SELECT hashtext(current_schema())")).scalar(),
        }
        if connection.execute(text("SELECT pg_try_advisory_lock(:c, :k)"), keys).scalar():
            self._url, self._keys = url, keys
            return
        holder = connection.execute(
            text(
                "SELECT a.pid, a.client_addr FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 "  # the two-key form
                "AND l.classid = CAST(:c AS integer)::oid AND l.objid = CAST(:k AS integer)::oid"
            ),
            keys,
        ).first()
        who, end = "", ""
        if holder is not None:
            who = f" (PostgreSQL session {holder[0]} from {holder[1] or 'a local socket'})"
            end = f", or end its session if its host is gone: SELECT pg_terminate_backend({holder[0]})"
        raise ConfigError(f"another orchestrator{who} is using this database's schema; stop it first{end}")

    def check(self) -> bool:
        """Whether the PostgreSQL advisory lock is still this process's, asked on its own connection (the
        flocks cannot be lost). A lock whose connection ended (``pg_terminate_backend``, a PostgreSQL
        restart or failover) is taken again on a new connection, returning False; :class:`ConfigError` if
        another orchestrator took it meanwhile (this one must stop), a ``DBAPIError`` if the database cannot
        be reached now (ask again later). A lock without PostgreSQL is always held."""
        if self._url is None:
            return True
        held = False
        if self._connection is not None:
            with contextlib.suppress(DBAPIError):  # the connection dropped: its session's lock went with it
                held = bool(
                    self._connection.execute(
                        text(
                            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() "
                            "AND locktype = 'advisory' AND granted AND objsubid = 2 "
                            "AND classid = CAST(:c AS integer)::oid AND objid = CAST(:k AS integer)::oid"
                        ),
                        self._keys,
                    ).scalar()
                )
        if held:
            return True
        url = self._url
        self._drop_connection()
        self._lock_postgres(url)  # the same schema's key; raises ConfigError naming the new holder
        return False

    def _drop_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):  # a dropped connection has lost its lock already
                self._connection.close()
            self._connection = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def release(self) -> None:
        while self._files:
            os.close(self._files.pop())  # closing the descriptor drops its flock
        self._url = None
        self._drop_connection()


def _sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL opens, resolved: a symbolic link, a relative path or a ``file:`` URI naming
    it must find the same lock beside it (None: an in-memory database). A file with a second hard link is
    refused: no path leads from one name to the other's lock, and SQLite keeps its WAL by name."""
    parsed = make_url(url)
    database = parsed.database
    if database and database.startswith("file:") and str(parsed.query.get("uri", "")).lower() == "true":
        uri = urlsplit(database)
        if "memory" in parse_qs(uri.query).get("mode", []):
            return None
        database = unquote(uri.path)
    if not database or database == ":memory:":
        return None
    path = Path(database).resolve()
    with contextlib.suppress(FileNotFoundError):
        if (links := path.stat().st_nlink) > 1:
            raise ConfigError(
                f"the SQLite database {path} has {links} hard links: another name could reach it with its "
                "own lock and WAL file (which corrupts it); keep one name (copy the file, remove the links)"
            )
    return path


def lock_orchestrator(state_dir: Path, database_url: str, *, wait_s: float = 0.0) -> OrchestratorLock:
    """Take the locks that keep a second orchestrator off this state folder and database, or raise
    :class:`ConfigError` saying who holds them. ``wait_s``: how long to retry, for a supervisor's restart
    racing the death of the process it replaces (PostgreSQL ends a dead client's session a moment later)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    sqlite_file = _sqlite_file(database_url) if database_url.startswith("sqlite") else None
    deadline = time.monotonic() + wait_s
    while True:
        lock = OrchestratorLock()
        try:
            lock._lock_file(state_dir / "orchestrator.lock", "the state folder")
            if sqlite_file is not None:
                lock._lock_file(sqlite_file.with_name(sqlite_file.name + ".lock"), "the database in")
            elif make_url(database_url).get_backend_name() == "postgresql":
                lock._lock_postgres(database_url)
            return lock
        except ConfigError:
            lock.release()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
        except BaseException:
            lock.release()
            raise
