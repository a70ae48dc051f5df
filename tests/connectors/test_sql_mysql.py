"""The SQL connector against the test MySQL/MariaDB server (pymysql): the same dataset as the CSV file of the
same rows, bound query values, the read-only transaction and the one-statement rule holding against what the
statement check cannot see, and one clear error for every way it can go wrong."""

from __future__ import annotations

import sys
import uuid
from urllib.parse import quote

import numpy as np
import pytest
import sqlalchemy as sa
from heart_sources import FLAT_SCHEMA, load_flat_table, patients, write_csv

import fedhealth.data._sql as sql_module
from fedhealth.core import ConfigError, DatasetError
from fedhealth.data import (
    CredentialsRefusedError,
    SchemaError,
    SourceUnavailableError,
    UnsafeQueryError,
    open_dataset,
)
from support import MYSQL_URL, mysql_admin, mysql_database

pytestmark = pytest.mark.mysql

SERVER = sa.engine.make_url(MYSQL_URL)


@pytest.fixture
def heart_table(heart_dir, tmp_path):
    """Hungary's patients as a table in a throwaway database, and as a CSV file, with the schema reading
    both; yields the admin engine, the database's name, the schema file and the CSV file."""
    engine = mysql_admin()
    people = patients(1, heart_dir)
    with mysql_database("conn") as database:
        load_flat_table(engine, database, "heart", people)
        schema_file = tmp_path / "heart.toml"
        schema_file.write_text(FLAT_SCHEMA)
        yield engine, database, schema_file, write_csv(tmp_path / "heart.csv", people)


def sql_uri(database: str, *, user: str | None = None, dialect: str = "mysql", **params: str) -> str:
    url = SERVER.set(drivername=f"{dialect}+pymysql", database=database)
    if user is not None:
        url = url.set(username=user, password=None)
    query = "&".join(f"{k}={quote(v, safe='/:')}" for k, v in params.items())
    return f"sql+{url.render_as_string(hide_password=False)}?{query}"


def rows_in(engine: sa.Engine, database: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM `{database}`.heart").scalar_one())


@pytest.mark.parametrize("dialect", ["mysql", "mariadb"])
def test_a_table_gives_the_same_dataset_as_the_csv_file_of_its_rows(heart_table, dialect):
    _, database, schema_file, csv = heart_table
    from_sql = open_dataset(sql_uri(database, dialect=dialect, table="heart", schema=str(schema_file)))
    from_csv = open_dataset(f"file://{csv}?schema={schema_file}")
    assert from_sql.fingerprint == from_csv.fingerprint
    np.testing.assert_array_equal(from_sql.X_train, from_csv.X_train)
    np.testing.assert_array_equal(from_sql.y_test, from_csv.y_test)
    assert from_sql.num_train + from_sql.num_test == 261


def test_a_decimal_column_reads_as_the_same_numbers(heart_table):
    """Warehouses keep measurements as DECIMAL, which the driver returns as Decimal objects."""
    engine, database, schema_file, csv = heart_table
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE `{database}`.heart MODIFY oldpeak DECIMAL(4, 1)")
    from_sql = open_dataset(sql_uri(database, table="heart", schema=str(schema_file)))
    from_csv = open_dataset(f"file://{csv}?schema={schema_file}")
    np.testing.assert_array_equal(from_sql.X_train, from_csv.X_train)


def test_a_parameterized_query_binds_its_values(heart_table):
    engine, database, schema_file, _ = heart_table
    query = "SELECT * FROM heart WHERE birth_date <= :born_by AND sex = :sex"
    d = open_dataset(
        sql_uri(
            database,
            query=query,
            schema=str(schema_file),
            **{"param.born_by": "1965-12-31", "param.sex": "male"},
        )
    )
    with engine.connect() as conn:
        expected = conn.exec_driver_sql(
            f"SELECT count(*) FROM `{database}`.heart WHERE birth_date <= '1965-12-31' AND sex = 'male'"
        ).scalar_one()
    assert d.num_train + d.num_test == expected
    assert 0 < expected < 261
    # bound, never pasted: a quote in the value is a value that matches nothing
    with pytest.raises(SchemaError, match="no data rows"):
        open_dataset(
            sql_uri(database, query=query, schema=str(schema_file),
                    **{"param.born_by": "1965-12-31", "param.sex": "x' OR '1'='1"})
        )  # fmt: skip


def test_a_write_the_statement_check_cannot_see_is_stopped_by_the_read_only_transaction(heart_table):
    """A SELECT calling a function that deletes passes the statement check (it cannot know what a
    function does); the transaction the server holds read-only refuses the write."""
    engine, database, _, _ = heart_table
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE FUNCTION `{database}`.wipe() RETURNS INT MODIFIES SQL DATA "
            f"BEGIN DELETE FROM `{database}`.heart; RETURN 1; END"
        )
    with pytest.raises(UnsafeQueryError, match=r"read-only transaction refused \(Cannot execute statement"):
        open_dataset(sql_uri(database, query="SELECT wipe() AS y, 1 AS x", label="y"))
    assert rows_in(engine, database) == 261


def test_the_server_runs_one_statement_even_if_the_statement_check_missed_a_second(heart_table, monkeypatch):
    engine, database, _, _ = heart_table
    monkeypatch.setattr(sql_module, "check_read_only_sql", lambda _sql: None)  # as if it had missed it
    with pytest.raises(DatasetError, match="error in your SQL syntax"):
        open_dataset(
            sql_uri(database, query="SELECT * FROM heart; COMMIT; DELETE FROM heart", label="disease")
        )
    assert rows_in(engine, database) == 261


def test_a_connection_set_to_run_several_statements_is_refused_before_the_query(heart_table, monkeypatch):
    engine, database, schema_file, _ = heart_table
    monkeypatch.setattr(sql_module, "check_read_only_sql", lambda _sql: None)
    multi = str(sql_module._MYSQL_MULTI_STATEMENTS)
    with pytest.raises(UnsafeQueryError, match=r"client_flag asks for multi-statements"):
        open_dataset(
            sql_uri(database, query="SELECT * FROM heart; DELETE FROM heart", label="disease",
                    **{"db.client_flag": multi})
        )  # fmt: skip
    assert rows_in(engine, database) == 261
    # a table is read by a SELECT SQLAlchemy builds: the flag cannot add a statement to it
    d = open_dataset(sql_uri(database, table="heart", schema=str(schema_file), **{"db.client_flag": multi}))
    assert d.num_train + d.num_test == 261


def test_a_missing_table_or_column_is_one_clear_line(heart_table):
    _, database, _, _ = heart_table
    with pytest.raises(SchemaError, match=rf"table '{database}.admissions' does not exist at mysql"):
        open_dataset(sql_uri(database, table="admissions", db_schema=database, label="disease"))
    with pytest.raises(
        SchemaError, match=rf"^the dataset query at .*: Table '{database}.admissions' doesn't"
    ):
        open_dataset(sql_uri(database, query="SELECT * FROM admissions", label="disease"))
    with pytest.raises(SchemaError, match=r"Unknown column 'weight'"):
        open_dataset(sql_uri(database, query="SELECT weight, disease FROM heart", label="disease"))


def test_an_unreachable_server_is_one_line_naming_it():
    with pytest.raises(
        SourceUnavailableError, match=r"cannot reach the database at .*127\.0\.0\.1:9"
    ) as info:
        open_dataset("sql+mysql+pymysql://root@127.0.0.1:9/test?table=t&label=y")
    assert "\n" not in str(info.value)
    assert "running and reachable" in info.value.hint


def test_wrong_credentials_and_missing_permissions_are_refused_credentials(heart_table):
    engine, database, _, _ = heart_table
    with pytest.raises(
        CredentialsRefusedError, match=r"refuses this site's credentials: Access denied for user"
    ):
        open_dataset(sql_uri(database, user=f"nobody_{uuid.uuid4().hex[:6]}", table="heart", label="disease"))
    user = f"reader_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY ''")
        conn.exec_driver_sql(f"CREATE USER '{user}'@'localhost' IDENTIFIED BY ''")
        for host in ("%%", "localhost"):
            conn.exec_driver_sql(f"GRANT SELECT (patient_id) ON `{database}`.heart TO '{user}'@'{host}'")
    try:
        # a column the user may not read: the server refuses the query
        with pytest.raises(CredentialsRefusedError, match=r"command denied to user"):
            open_dataset(
                sql_uri(database, user=user, query="SELECT chol, disease FROM heart", label="disease")
            )
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP USER '{user}'@'%%'")
            conn.exec_driver_sql(f"DROP USER '{user}'@'localhost'")


def test_a_password_is_never_in_a_message(heart_table, monkeypatch):
    engine, database, _, _ = heart_table
    secret = f"pw-{uuid.uuid4().hex[:10]}"
    user = f"reader_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        for host in ("%%", "localhost"):
            conn.exec_driver_sql(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{secret}-other'")
    try:
        uri = sql_uri(database, user=user, table="heart", label="disease").replace(
            f"{user}@", f"{user}:{secret}@"
        )
        with pytest.raises(CredentialsRefusedError) as info:
            open_dataset(uri)
        assert secret not in str(info.value)
        assert f"{user}:***@" in str(info.value)
        monkeypatch.setenv("WAREHOUSE_PASSWORD", secret)
        with pytest.raises(CredentialsRefusedError) as info:
            open_dataset(
                sql_uri(
                    database, user=user, table="heart", label="disease", password_env="WAREHOUSE_PASSWORD"
                )
            )
        assert secret not in str(info.value)
    finally:
        with engine.begin() as conn:
            for host in ("%%", "localhost"):
                conn.exec_driver_sql(f"DROP USER '{user}'@'{host}'")


def test_a_query_is_refused_through_a_driver_that_may_run_several_statements(monkeypatch):
    """mysqlclient asks the server for multi-statements by default: a query is not read through it, and
    the message names the driver that is."""

    class Dialect:
        name, driver = "mysql", "mysqldb"

    class Conn:
        dialect = Dialect()

        class connection:  # the attribute SQLAlchemy's connection has
            driver_connection = object()

    with pytest.raises(UnsafeQueryError, match=r"read with the pymysql driver only \(sql\+mysql\+pymysql://"):
        sql_module._one_statement_only(Conn(), "the dataset query")  # type: ignore[arg-type]


def test_a_mysql_uri_without_the_driver_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymysql", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'fedhealth\[mysql\]'"):
        open_dataset("sql+mysql+pymysql://reader@127.0.0.1:3306/warehouse?table=t&label=y")
