"""The SQL connector against the test PostgreSQL server: tables and parameterized read-only queries, the
same dataset as the CSV file of the same rows, and one clear error for every way it can go wrong."""

from __future__ import annotations

import uuid
from urllib.parse import quote

import numpy as np
import pytest
import sqlalchemy as sa
from heart_sources import FLAT_SCHEMA, load_flat_table, patients, write_csv

from fedhealth.core import ConfigError
from fedhealth.data import (
    CredentialsRefusedError,
    DatasetURI,
    NonNumericColumnError,
    SchemaError,
    SourceUnavailableError,
    UnsafeQueryError,
    check_read_only_sql,
    open_dataset,
)
from support import POSTGRES_URL

pytestmark = pytest.mark.postgres


@pytest.fixture
def heart_table(pg, heart_dir, tmp_path):
    """Hungary's patients as a PostgreSQL table and as a CSV file, with the schema that reads both."""
    engine, schema = pg
    people = patients(1, heart_dir)
    load_flat_table(engine, schema, "heart", people)
    schema_file = tmp_path / "heart.toml"
    schema_file.write_text(FLAT_SCHEMA)
    csv = write_csv(tmp_path / "heart.csv", people)
    return engine, schema, schema_file, csv


def sql_uri(db_schema: str, **params: str) -> str:
    query = "&".join(f"{k}={quote(v, safe='/:')}" for k, v in params.items())
    return f"sql+{POSTGRES_URL}?db_schema={db_schema}&{query}"


def rows_in(engine: sa.Engine, schema: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f'SELECT count(*) FROM "{schema}".heart').scalar_one())


def test_a_table_gives_the_same_dataset_as_the_csv_file_of_its_rows(heart_table):
    _, schema, schema_file, csv = heart_table
    from_sql = open_dataset(sql_uri(schema, table="heart", schema=str(schema_file)))
    from_csv = open_dataset(f"file://{csv}?schema={schema_file}")
    assert from_sql.fingerprint == from_csv.fingerprint
    np.testing.assert_array_equal(from_sql.X_train, from_csv.X_train)
    assert from_sql.feature_names[:3] == ("age", "sex=male", "trestbps")
    assert from_sql.num_train + from_sql.num_test == 261


def test_a_parameterized_query_binds_its_values(heart_table):
    engine, schema, schema_file, _ = heart_table
    query = "SELECT * FROM heart WHERE birth_date <= :born_by AND sex = :sex"
    d = open_dataset(
        sql_uri(
            schema,
            query=query,
            **{"param.born_by": "1965-12-31", "param.sex": "male"},
            schema=str(schema_file),
        )
    )
    with engine.connect() as conn:
        expected = conn.exec_driver_sql(
            f"SELECT count(*) FROM \"{schema}\".heart WHERE birth_date <= '1965-12-31' AND sex = 'male'"
        ).scalar_one()
    assert d.num_train + d.num_test == expected
    assert 0 < expected < 261
    # the value is bound, never pasted into the SQL: a quote in it is just a value that matches nothing
    with pytest.raises(SchemaError, match="no data rows"):
        open_dataset(
            sql_uri(schema, query=query, **{"param.born_by": "1965-12-31", "param.sex": "x' OR '1'='1"},
                    schema=str(schema_file))
        )  # fmt: skip


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("DELETE FROM heart", "is a DELETE statement; only SELECT is run"),
        ("SELECT * FROM heart; DROP TABLE heart", "more than one statement"),
        ("SELECT * INTO copy_of_heart FROM heart", "uses INTO"),
        ("SELECT * FROM heart FOR UPDATE", "uses FOR UPDATE"),
        ("UPDATE heart SET chol = 0 RETURNING *", "is a UPDATE statement"),
    ],
)
def test_a_query_that_writes_is_refused_before_it_runs(heart_table, query, match):
    engine, schema, _, _ = heart_table
    with pytest.raises(UnsafeQueryError, match=match):
        open_dataset(sql_uri(schema, query=query, label="disease"))
    assert rows_in(engine, schema) == 261


def test_a_writing_cte_is_stopped_by_the_read_only_transaction(heart_table):
    engine, schema, _, _ = heart_table
    query = "WITH gone AS (DELETE FROM heart RETURNING *) SELECT * FROM gone"
    with pytest.raises(UnsafeQueryError, match=r"read-only transaction refused \(cannot execute"):
        open_dataset(sql_uri(schema, query=query, label="disease"))
    assert rows_in(engine, schema) == 261


def test_the_statement_check_ignores_keywords_inside_strings_and_comments():
    check_read_only_sql("SELECT 'DELETE; INTO' AS x -- DROP TABLE heart;\n FROM t /* ; UPDATE */;")
    check_read_only_sql('WITH a AS (SELECT 1 AS "into") SELECT * FROM a')
    with pytest.raises(UnsafeQueryError):
        check_read_only_sql("/* SELECT */ DELETE FROM t")


def test_a_missing_table_is_one_clear_line(heart_table):
    _, schema, _, _ = heart_table
    with pytest.raises(SchemaError, match=rf"table '{schema}.admissions' does not exist at postgresql"):
        open_dataset(sql_uri(schema, table="admissions", label="disease"))
    with pytest.raises(SchemaError, match='relation "admissions" does not exist'):
        open_dataset(sql_uri(schema, query="SELECT * FROM admissions", label="disease"))


def test_an_unreachable_database_is_one_line_naming_it():
    with pytest.raises(
        SourceUnavailableError, match=r"cannot reach the database at .*127\.0\.0\.1:9"
    ) as info:
        open_dataset("sql+postgresql+psycopg://postgres@127.0.0.1:9/test?table=t&label=y")
    assert "\n" not in str(info.value)
    assert "running and reachable" in info.value.hint


def test_wrong_credentials_and_missing_permissions_are_refused_credentials(heart_table):
    engine, schema, _, _ = heart_table
    with pytest.raises(CredentialsRefusedError, match=r"refuses this site's credentials: .*role \"nobody_"):
        open_dataset(
            sql_uri(schema, table="heart", label="disease").replace(
                "postgres@", f"nobody_{uuid.uuid4().hex[:6]}@"
            )
        )
    role = f"reader_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
        conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
    try:
        with pytest.raises(CredentialsRefusedError, match="permission denied for table heart"):
            open_dataset(sql_uri(schema, table="heart", label="disease").replace("postgres@", f"{role}@"))
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'REVOKE ALL ON SCHEMA "{schema}" FROM "{role}"')
            conn.exec_driver_sql(f'DROP ROLE "{role}"')


def test_a_non_numeric_value_in_a_numeric_column_names_the_column(heart_table):
    engine, schema, schema_file, _ = heart_table
    with engine.begin() as conn:
        conn.exec_driver_sql(f'ALTER TABLE "{schema}".heart ALTER COLUMN chol TYPE text')
        conn.exec_driver_sql(f"UPDATE \"{schema}\".heart SET chol = 'high' WHERE patient_id = 'hd1-000005'")
    with pytest.raises(NonNumericColumnError, match=r"row \d+, column 'chol' holds 'high', not a number"):
        open_dataset(sql_uri(schema, table="heart", schema=str(schema_file)))


def test_a_password_is_never_in_a_message_or_a_repr(monkeypatch):
    secret = "s3cr3t-pa55"
    uri = f"sql+postgresql+psycopg://analyst:{secret}@127.0.0.1:9/test?table=t&label=y"
    parsed = DatasetURI.parse(uri)
    assert secret not in parsed.raw
    assert secret not in repr(parsed)
    assert parsed.password == secret
    with pytest.raises(SourceUnavailableError) as info:
        open_dataset(uri)
    assert secret not in str(info.value)
    assert "analyst:***@127.0.0.1:9" in str(info.value)
    monkeypatch.setenv("WAREHOUSE_PASSWORD", secret)
    with pytest.raises(SourceUnavailableError) as info:
        open_dataset(
            "sql+postgresql+psycopg://analyst@127.0.0.1:9/test?table=t&label=y&password_env=WAREHOUSE_PASSWORD"
        )
    assert secret not in str(info.value)
    with pytest.raises(
        ConfigError, match="password_env=NOT_SET_ANYWHERE names an environment variable that is not"
    ):
        open_dataset(
            "sql+postgresql+psycopg://analyst@127.0.0.1:9/test?table=t&label=y&password_env=NOT_SET_ANYWHERE"
        )
    with pytest.raises(ConfigError, match="the password is given twice"):
        open_dataset(f"{uri}&password_env=WAREHOUSE_PASSWORD")


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ("table=t&query=SELECT 1&label=y", "exactly one of table=, query= or query_file="),
        ("label=y", "exactly one of table=, query= or query_file="),
        ("table=t&label=y&colour=red", r"unknown parameter\(s\) \['colour'\]"),
        ("query=SELECT :a&label=y", r"binds \[':a'\]: give param.NAME=VALUE"),
        ("query=SELECT 1&param.b=2&label=y", "param.b= names no :b of the query"),
        ("query_file=relative.sql&label=y", "must be an absolute path"),
    ],
)
def test_bad_sql_uris_are_config_errors(params, match):
    with pytest.raises(ConfigError, match=match):
        open_dataset(f"sql+postgresql+psycopg://postgres@127.0.0.1:9/test?{params}")
