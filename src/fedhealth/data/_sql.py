"""SQL: a table or a read-only query of any database SQLAlchemy reaches, as a dataset.

    sql+postgresql+psycopg://analyst@db.hospital.org:5432/warehouse?table=cohort&db_schema=research
        &id=patient_id&label=outcome&password_env=WAREHOUSE_PASSWORD
    sql+postgresql+psycopg://analyst@db/warehouse?query=SELECT ... WHERE ward = :ward&param.ward=cardiology
        &id=patient_id&label=outcome
    sql+sqlite:////data/cohort.db?table=cohort&label=outcome

After ``sql+`` comes the SQLAlchemy URL without its password. Parameters: ``table=`` (and ``db_schema=``),
or ``query=`` / ``query_file=/abs/cohort.sql`` with ``param.NAME=VALUE`` for each ``:NAME`` it binds (values
are bound, never pasted into the SQL); ``password=`` (kept in the site's 0600 registry) or
``password_env=NAME`` (read from the environment when the dataset is opened); ``db.NAME=VALUE`` passed to the
driver (``db.sslmode=require``); and the parameters every tabular source takes (``label``, ``id``,
``schema``, ``test_fraction``, ``seed``, ``standardize``). A table is read ordered by its id column (by every
column when it has none), so a row's number in a message is stable.

MySQL and MariaDB are read with pymysql (``sql+mysql+pymysql://`` or ``sql+mariadb+pymysql://``, the
``mysql`` extra); ``db_schema=`` is then the database of a ``table=``.

Read-only, twice over: a query must be one ``SELECT`` (or ``WITH ... SELECT``) statement, without ``INTO``
or row locks, checked before it is sent, and the driver runs one statement at most (psycopg sends it
prepared; sqlite3 and pymysql refuse more, and on MySQL a query is read only through a pymysql connection
without the multi-statement flag), so a ``COMMIT`` the check missed cannot end the transaction; and
everything runs in a transaction the database itself holds read-only (``SET TRANSACTION READ ONLY`` on
PostgreSQL and MySQL, ``PRAGMA query_only`` on SQLite), then rolled back. Other databases get the statement
check and the rollback only.

Errors are translated here, once: an unreachable server or a refused login is a
:class:`SourceUnavailableError` / :class:`CredentialsRefusedError`, a missing table or column a
:class:`SchemaError`, a write an :class:`UnsafeQueryError`. No message carries the password: the URL is shown
with ``***`` and the driver's text is scrubbed of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from fedhealth.core import ConfigError, DatasetError
from fedhealth.data._connector import (
    REDACTED,
    TABLE_PARAMS,
    DatasetURI,
    TabularConnector,
    table_options,
)
from fedhealth.data._errors import (
    CredentialsRefusedError,
    SchemaError,
    SourceUnavailableError,
    UnsafeQueryError,
)
from fedhealth.data._table import SourceTable, TableOptions

SQL_PARAMS = frozenset({"table", "query", "query_file", "db_schema", "password", "password_env"})
_PARAM_PREFIX = "param."
_DRIVER_PREFIX = "db."
_CONNECT_TIMEOUT_S = 10
# the extra that installs a dialect's tested driver
_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}
_MYSQL = ("mysql", "mariadb")
_MYSQL_MULTI_STATEMENTS = 1 << 16  # CLIENT_MULTI_STATEMENTS in the MySQL protocol's capability flags


@dataclass(frozen=True, slots=True, kw_only=True)
class Database:
    """A database a dataset URI names: its SQLAlchemy URL (with the password) and how messages show it."""

    url: sa.URL
    shown: str
    secrets: tuple[str, ...] = ()

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, REDACTED)
        return text


def database_of(uri: DatasetURI, prefix: str) -> Database:
    """The database after ``<prefix>+`` in the URI's scheme, with its password from the URI's user part,
    ``password=`` or ``password_env=``, and ``db.NAME=VALUE`` driver options."""
    driver = uri.scheme.removeprefix(prefix + "+")
    if driver == uri.scheme or not driver:
        raise ConfigError(
            f"dataset URI {uri.raw!r}: name the database after {prefix}+, like "
            f"{prefix}+postgresql+psycopg://user@host/db"
        )
    netloc = urlsplit(f"//{uri.host}")
    password = uri.secret("password", env_key="password_env")
    if password is not None and uri.password is not None:
        raise ConfigError(
            f"dataset URI {uri.raw!r}: the password is given twice (in the URI and as a parameter)"
        )
    password = password if password is not None else uri.password
    username = netloc.username
    host = netloc.hostname
    try:
        port = netloc.port
    except ValueError:
        raise ConfigError(f"dataset URI {uri.raw!r}: the port is not a number") from None
    database = unquote(uri.path[1:]) if uri.path.startswith("/") else unquote(uri.path)
    query = uri.prefixed(_DRIVER_PREFIX)
    if driver.startswith("postgresql") and "connect_timeout" not in query:
        query["connect_timeout"] = str(
            _CONNECT_TIMEOUT_S
        )  # an unreachable host fails in seconds, not minutes
    try:
        url = sa.URL.create(
            driver,
            username=unquote(username) if username else None,
            password=password,
            host=host,
            port=port,
            database=database or None,
            query=query,
        )
        sa.create_engine(url, poolclass=NullPool).dispose()  # checks the dialect and driver are installed
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        extra = next((e for k, e in _EXTRAS.items() if driver.startswith(k)), None)
        install = f" (pip install 'fedhealth[{extra}]')" if extra and isinstance(exc, ImportError) else ""
        raise ConfigError(
            f"dataset URI {uri.raw!r}: {driver!r} is not a usable SQLAlchemy database{install}: {exc}"
        ) from exc
    shown = url.set(query={}).render_as_string(hide_password=True)  # no driver options in messages
    # every secret the URI carries (a db.password= too) is scrubbed from the driver's messages, longest first
    secrets = sorted({s for s in (password, *uri.secrets.values()) if s}, key=len, reverse=True)
    return Database(url=url, shown=shown, secrets=tuple(secrets))


@contextmanager
def read_only(db: Database, where: str) -> Iterator[sa.Connection]:
    """A connection in a transaction the database holds read-only, rolled back at the end; every
    driver error inside is translated (see the module docstring)."""
    engine = sa.create_engine(db.url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            transaction = conn.begin()
            try:
                _hold_read_only(conn)
                yield conn
            finally:
                transaction.rollback()  # nothing a dataset read does is ever committed
    except sa.exc.DBAPIError as exc:
        raise translate_error(exc, db, where) from exc
    finally:
        engine.dispose()


def _hold_read_only(conn: sa.Connection) -> None:
    dialect = conn.dialect.name
    if dialect == "postgresql" or dialect in _MYSQL:
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    elif dialect == "sqlite":
        conn.exec_driver_sql("PRAGMA query_only = ON")


_CREDENTIALS = (
    "password authentication failed",
    "no password supplied",
    'role "',
    "access denied",
    "permission denied",
    "pg_hba.conf",
    "authentication failed",
)


def translate_error(exc: sa.exc.DBAPIError, db: Database, where: str) -> DatasetError:
    """One clear error for a driver's: what failed, where, and what to do (the password scrubbed)."""
    orig = exc.orig if exc.orig is not None else exc
    # MySQL's drivers raise (error number, message); the number is the reliable part
    args = getattr(orig, "args", ())
    code = args[0] if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str) else None
    message = args[1] if code is not None else str(orig)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = db.scrub(lines[0] if lines else type(orig).__name__)
    lowered = text.lower()
    state = str(getattr(orig, "sqlstate", "") or "")
    read_only_refused = code == 1792 or "read-only transaction" in lowered or "readonly database" in lowered
    if state == "25006" or read_only_refused:
        return UnsafeQueryError(
            f"{where}: the query tried to write, and its read-only transaction refused ({text})"
        )
    # the driver's refusal of several statements (psycopg's prepared query, sqlite3): see _one_statement_only
    if "cannot insert multiple commands" in lowered or "one statement at a time" in lowered:
        return UnsafeQueryError(
            f"{where}: the query holds more than one statement, and the database refused it"
        )
    # MySQL: 1146 no such table, 1054 no such column
    missing = code in (1146, 1054) or "no such table" in lowered or "no such column" in lowered
    if state in ("42P01", "3F000", "42703") or missing:
        return SchemaError(f"{where}: {text}", hint="check the tables and columns the dataset names")
    # MySQL: 1045 the login, 1044 the database, 1142 and 1143 a table or column the user may not read
    refused = code in (1044, 1045, 1142, 1143)
    if state in ("42501", "28000", "28P01") or refused or any(words in lowered for words in _CREDENTIALS):
        return CredentialsRefusedError(
            f"the database at {db.shown} refuses this site's credentials: {text}",
            hint="check the user name and the password (password_env=NAME reads it from the environment), "
            "and that the user may read what the dataset names",
        )
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return SourceUnavailableError(
            f"cannot reach the database at {db.shown}: {text}",
            hint="is the database server running and reachable from this host? check the host, the port and "
            "the database name",
        )
    return DatasetError(f"{where}: {text}")


# --- the statement check ------------------------------------------------------------------------------------

_QUOTED_AND_COMMENTS = r"""
      (?P<line>--[^\n\r]*)          # a line comment (PostgreSQL ends one at \r too)
    | (?P<block>/\*.*?\*/)          # a block comment
    | (?P<quoted>
        '(?:[^']|'')*'              # a string
      | "(?:[^"]|"")*"              # a quoted identifier (a string on MySQL)
      | `(?:[^`]|``)*`              # a MySQL quoted identifier
      )
"""
# PostgreSQL's dollar-quoted string: its tag starts with a letter or "_", and "$" after a name's character is
# part of the name (a$b$ is an identifier), so no string starts there
_DOLLAR_QUOTED = r"""
    | (?<![\w$])\$(?P<tag>(?:[^\W\d]\w*)?)\$.*?\$(?P=tag)\$
"""
# Two readings of a query, each blanking what one family of databases reads as a string or a comment: on
# MySQL, MariaDB and SQLite "$" is part of a name, so a$b$ ... $b$ is SQL there, not PostgreSQL's string.
# The check refuses what either reading refuses (it does not know which database the query is for).
_READINGS = (
    re.compile(_QUOTED_AND_COMMENTS + _DOLLAR_QUOTED, re.VERBOSE | re.DOTALL),
    re.compile(_QUOTED_AND_COMMENTS, re.VERBOSE | re.DOTALL),
)
# A keyword starts after anything but a letter or "_": MySQL reads 1e1INTO as the number 1e1, then INTO
_KEYWORD = r"(?<![^\W\d])"
_WRITES_INSIDE = re.compile(
    _KEYWORD + r"(INTO|FOR\s+(UPDATE|SHARE|NO\s+KEY\s+UPDATE|KEY\s+SHARE)|LOCK\s+IN\s+SHARE\s+MODE)\b",
    re.IGNORECASE,
)


def check_read_only_sql(sql: str) -> None:
    """Refuse anything but one ``SELECT`` (or ``WITH ... SELECT``) statement without ``INTO`` or row locks.
    A writing ``WITH`` (``WITH d AS (DELETE ...) SELECT``) passes this check and is stopped by the
    read-only transaction. A backslash in a quoted string or name, and a comment inside a comment, are
    refused: databases read them differently, so they could hide a second statement from this check. The
    query is read as PostgreSQL reads it and as MySQL does (no dollar-quoted strings there), and refused if
    either reading finds what this refuses."""
    for reading in _READINGS:
        _check_reading(reading.sub(_blank_literal, sql).strip())


def _check_reading(body: str) -> None:
    body = body[:-1].rstrip() if body.endswith(";") else body
    if not body:
        raise UnsafeQueryError("the dataset query is empty")
    if ";" in body:
        raise UnsafeQueryError("the dataset query holds more than one statement")
    if "#" in body:  # a comment to the end of the line on MySQL: it could hide what this check reads
        raise UnsafeQueryError(
            'the dataset query has "#" outside quotes (a comment on MySQL); write it without'
        )
    first = body.split(None, 1)[0].upper()
    if first not in ("SELECT", "WITH"):
        raise UnsafeQueryError(f"the dataset query is a {first} statement; only SELECT is run")
    found = _WRITES_INSIDE.search(body)
    if found:
        raise UnsafeQueryError(f"the dataset query uses {found.group(0).upper()}; a dataset query only reads")


def _blank_literal(found: re.Match[str]) -> str:
    # A backslash escapes a quote in PostgreSQL's E'...' and in MySQL's strings, so such a string ends
    # elsewhere than this scanner reads it (E'\'' hides what follows); PostgreSQL's block comments nest.
    # Either could hide a second statement: refused rather than read per dialect.
    quoted, block, line = found.group("quoted"), found.group("block"), found.group("line")
    if quoted is not None and "\\" in quoted:
        raise UnsafeQueryError(
            "the dataset query has a backslash inside a quoted string or name; write it without one "
            "(bind a value with :NAME and param.NAME=)"
        )
    if block is not None and "/*" in block[2:]:
        raise UnsafeQueryError("the dataset query has a comment inside a comment; write them apart")
    # MySQL runs a /*! ... */ comment's text (MariaDB a /*M! ... */ one's too), and reads "--" as a comment
    # only before a space (--1 is minus minus one): either would run text this check took for a comment
    if block is not None and (block.startswith("/*!") or block[2:4].upper() == "M!"):
        raise UnsafeQueryError(
            "the dataset query has a /*! or /*M! comment, which MySQL or MariaDB runs; write it without"
        )
    if line is not None and line[2:3] not in ("", " ", "\t", "\r"):
        raise UnsafeQueryError(
            'the dataset query has "--" without a space after it; write "-- " for a comment'
        )
    return " "


# --- the connector ------------------------------------------------------------------------------------------


class SqlConnector(TabularConnector):
    """``sql+<sqlalchemy-url>?table=...|query=...``: see the module docstring."""

    def read(self, uri: DatasetURI, data_dir: Path) -> tuple[SourceTable, TableOptions]:
        del data_dir
        allowed = {k for k in uri.params if k.startswith((_PARAM_PREFIX, _DRIVER_PREFIX))}
        uri.check_params(TABLE_PARAMS | SQL_PARAMS | allowed)
        options = table_options(uri, label_required=True)
        db = database_of(uri, "sql")
        sources = [k for k in ("table", "query", "query_file") if k in uri.params]
        if len(sources) != 1:
            raise ConfigError(f"dataset URI {uri.raw!r}: give exactly one of table=, query= or query_file=")
        binds = uri.prefixed(_PARAM_PREFIX)
        db_schema = uri.params.get("db_schema")
        if "table" in uri.params:
            if binds:
                raise ConfigError(f"dataset URI {uri.raw!r}: param.NAME= goes with query=, not table=")
            table = uri.params["table"]
            where = f"table {table!r} at {db.shown}"
            frame = read_sql_table(db, table, db_schema=db_schema, id_column=options.id_column, where=where)
            return SourceTable(name=table, where=where, frame=frame), options
        query = uri.params.get("query")
        if query is None:
            query = _query_file(uri, uri.params["query_file"])
        where = f"the dataset query at {db.shown}"
        frame = read_sql_query(db, query, binds, db_schema=db_schema, where=where)
        return SourceTable(name="query", where=where, frame=frame), options


def _query_file(uri: DatasetURI, text: str) -> str:
    path = Path(text)
    if not path.is_absolute():
        raise ConfigError(f"dataset URI {uri.raw!r}: query_file={text!r} must be an absolute path")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"dataset URI {uri.raw!r}: query file {path} cannot be read ({exc})") from exc


def read_sql_table(
    db: Database, table: str, *, db_schema: str | None, id_column: str | None, where: str
) -> pd.DataFrame:
    """Every row of a table (ordered by ``id_column``, else by every column) in a read-only transaction."""
    with read_only(db, where) as conn:
        try:
            reflected = sa.Table(table, sa.MetaData(), schema=db_schema, autoload_with=conn)
        except sa.exc.NoSuchTableError:
            qualified = f"{db_schema}.{table}" if db_schema else table
            raise SchemaError(
                f"table {qualified!r} does not exist at {db.shown} (or this user cannot see it)",
                hint="check table= and db_schema=, and that the user may see the table",
            ) from None
        has_id = id_column is not None and id_column in reflected.c
        order = [reflected.c[id_column]] if has_id else list(reflected.c)
        result = conn.execute(sa.select(reflected).order_by(*order))
        return _frame(result)


def read_sql_query(
    db: Database, query: str, binds: dict[str, str], *, db_schema: str | None, where: str
) -> pd.DataFrame:
    """A checked ``SELECT`` with its bound parameters, in a read-only transaction."""
    check_read_only_sql(query)
    statement = sa.text(query)
    wanted = set(statement.compile().params)
    missing, extra = sorted(wanted - binds.keys()), sorted(binds.keys() - wanted)
    if missing:
        raise ConfigError(
            f"{where}: the query binds {[':' + m for m in missing]}: give param.NAME=VALUE for each"
        )
    if extra:
        raise ConfigError(f"{where}: param.{extra[0]}= names no :{extra[0]} of the query")
    with read_only(db, where) as conn:
        if db_schema is not None:
            if conn.dialect.name != "postgresql":
                raise ConfigError(f"{where}: db_schema= goes with table= here; name the schema in the query")
            conn.execute(sa.select(sa.func.set_config("search_path", db_schema, True)))
        _one_statement_only(conn, where)
        return _frame(conn.execute(statement, binds))


def _one_statement_only(conn: sa.Connection, where: str) -> None:
    """Have the driver send the dataset query so that the server runs one statement at most: the second layer
    under :func:`check_read_only_sql` (a ``COMMIT`` it missed would end the read-only transaction).

    psycopg sends a query without parameters by the simple protocol, which runs every statement in it;
    prepared (the extended protocol), the server refuses more than one. sqlite3 refuses more than one
    itself. On MySQL and MariaDB the server runs several only for a connection that asked to (the
    multi-statement capability): pymysql does not unless its ``client_flag`` says so, which is refused here;
    other drivers (mysqlclient asks for it by default) are refused for a query, as this cannot be checked."""
    driver = conn.connection.driver_connection
    assert driver is not None  # an open connection has its driver's
    if conn.dialect.driver == "psycopg":
        driver.prepare_threshold = 0  # every query from now on is prepared
    elif conn.dialect.name in _MYSQL:
        if conn.dialect.driver != "pymysql":
            raise UnsafeQueryError(
                f"{where}: on MySQL and MariaDB a dataset query is read with the pymysql driver only "
                f"(sql+{conn.dialect.name}+pymysql://...), which runs one statement at a time; "
                f"{conn.dialect.driver} may run several"
            )
        if int(getattr(driver, "client_flag", 0)) & _MYSQL_MULTI_STATEMENTS:
            raise UnsafeQueryError(
                f"{where}: the connection lets the server run several statements in one query (its "
                "client_flag asks for multi-statements); drop that option from db.client_flag="
            )


def _frame(result: sa.CursorResult[Any]) -> pd.DataFrame:
    columns = list(result.keys())
    rows = result.fetchall()
    return pd.DataFrame.from_records([tuple(r) for r in rows], columns=columns)
