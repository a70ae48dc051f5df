"""Attacks on the guarantees of docs/connectors.md that the other connector tests did not try to break: a
secret written unencoded into a dataset URI, a query kept in a file, OMOP schema names in the URI, and a FHIR
server that asks the client to wait for ever.

Who controls what: every URI, query file and definition is the site's own (a steward may mistype one); the
FHIR server's answers are the server's, which may be broken or hostile.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
from heart_sources import OMOP_DEFINITION
from site_cli import cli, make_site_home

from fedhealth.core import ConfigError, DatasetError
from fedhealth.data import (
    FhirClient,
    SourceUnavailableError,
    UnsafeQueryError,
    compile_cohort_query,
    load_definition,
    open_dataset,
)
from fedhealth.data._connector import DatasetURI, redact_uri
from fedhealth.data._omop import _cdm_tables
from support import POSTGRES_URL

# the two halves of a secret either side of the character that breaks the URI: neither may be shown
LEFT, RIGHT = "Zq7LeftHalf", "Rk9RightHalf"


def _assert_hidden(text: str) -> None:
    assert LEFT not in text, text
    assert RIGHT not in text, text


def _victim(engine: sa.Engine, schema: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE TABLE "{schema}".victim (patient_id int, x float, y int)')
        conn.exec_driver_sql(
            f'INSERT INTO "{schema}".victim SELECT g, g * 1.5, mod(g, 2) FROM generate_series(1, 20) g'
        )


def _victim_rows(engine: sa.Engine, schema: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f'SELECT count(*) FROM "{schema}".victim').scalar_one())


# --- secrets: "Every URI fedhealth shows (listings, messages, logs) has the secret replaced by ***" ---


@pytest.mark.parametrize(
    "breaker", ["/", "?", "#", "@x/"], ids=["slash", "question-mark", "hash", "at-slash"]
)
def test_a_password_holding_an_unencoded_slash_question_mark_or_hash_is_never_shown(tmp_path, breaker):
    """A steward pasting a password without URL-encoding it: the user part ends early (``u:pa/ss@host`` reads
    as host ``u``, port ``pa``), so a redaction that hides only a well-formed user part shows the password."""
    secret = f"{LEFT}{breaker}{RIGHT}"
    uri = f"sql+postgresql+psycopg://postgres:{secret}@127.0.0.1:5432/test?table=victim&label=y"
    home = make_site_home(tmp_path)
    outputs = [
        cli("site", "dataset", "add", "cohort", uri, "--home", home),
        cli("site", "dataset", "list", "--home", home),
        cli("site", "dataset", "check", "--home", home),
    ]
    shown = [redact_uri(uri), *(result.output for result in outputs)]
    for attempt in (open_dataset, DatasetURI.parse):
        try:
            attempt(uri)
        except (ConfigError, DatasetError) as exc:
            shown.append(str(exc))
    for text in shown:
        _assert_hidden(text)
    assert "***@127.0.0.1:5432/test" in redact_uri(uri)  # the control: where the data is is still shown


@pytest.mark.parametrize(
    "uri",
    [
        f"fhir+https://fhir.test/r4?mapping=/m.toml&token={LEFT}#{RIGHT}",
        f"file:///x.csv?label=y&api_KEY={LEFT}#{RIGHT}",
        f"file:///x.csv?label=y&client_secret={LEFT}{RIGHT}",
    ],
    ids=["token-with-hash", "api-key-with-hash", "client-secret"],
)
def test_a_secret_parameter_cut_by_a_hash_is_not_shown_as_a_fragment(uri):
    with pytest.raises(ConfigError) as info:
        open_dataset(uri)
    for text in (str(info.value), redact_uri(uri)):
        _assert_hidden(text)


# --- SQL: a query kept in a file is checked like one in the URI ---------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM victim",
        "SELECT * FROM victim; DELETE FROM victim",
        "SELECT 1 AS patient_id, 1.0 AS x, 1 AS y; COMMIT; DELETE FROM victim",
        "SELECT * INTO victim_copy FROM victim",
    ],
    ids=["delete", "second-statement", "commit-then-delete", "select-into"],
)
def test_a_query_file_is_held_to_the_statement_check_and_cannot_write(pg, tmp_path, query):
    """``query_file=`` is the same query as ``query=`` (docs: "A query must be one SELECT ... anything else is
    refused before it is sent"), so a file may not carry what the URI may not."""
    engine, schema = pg
    _victim(engine, schema)
    path = tmp_path / "cohort.sql"
    path.write_text(query.replace("victim", f'"{schema}".victim'))
    with pytest.raises(UnsafeQueryError):
        open_dataset(f"sql+{POSTGRES_URL}?query_file={path}&label=y&id=patient_id")
    assert _victim_rows(engine, schema) == 20
    with engine.connect() as conn:
        assert not sa.inspect(conn).has_table("victim_copy", schema=schema)
    # the control: the same file holding a plain SELECT reads the rows
    path.write_text(f'SELECT * FROM "{schema}".victim')
    dataset = open_dataset(f"sql+{POSTGRES_URL}?query_file={path}&label=y&id=patient_id")
    assert dataset.num_train + dataset.num_test == 20


# --- OMOP: the schema names in the URI are quoted, never pasted into SQL ------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("key", ["cdm_schema", "vocabulary_schema"])
def test_omop_schema_names_in_the_uri_are_quoted_never_pasted_into_sql(pg, tmp_path, key):
    engine, schema = pg
    _victim(engine, schema)
    definition = tmp_path / "cohort.toml"
    definition.write_text(OMOP_DEFINITION)
    hostile = f'{schema}"; DROP TABLE "{schema}".victim; --'
    params = {"definition": str(definition), "cdm_schema": schema, key: hostile}
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    with pytest.raises(DatasetError):
        open_dataset(f"omop+{POSTGRES_URL}?{query}")
    assert _victim_rows(engine, schema) == 20
    # the connector stops at its table check; the cohort query itself, sent as it is, quotes the name too
    names = {"cdm_schema": schema, "vocabulary_schema": None, key: hostile}
    cohort, _ = compile_cohort_query(
        load_definition(definition),
        _cdm_tables(names["cdm_schema"], names["vocabulary_schema"]),
        "postgresql",
    )
    with pytest.raises(sa.exc.ProgrammingError, match="does not exist"), engine.connect() as conn:
        conn.execute(cohort)
    assert _victim_rows(engine, schema) == 20


# --- FHIR: "Retry-After honoured" cannot stall the site ----------------------------------------------------


@pytest.mark.parametrize("retry_after", ["1e12", "inf", "nan", "-5", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_a_server_asking_to_wait_for_ever_is_waited_on_for_a_bounded_time(retry_after):
    """A server that answers 503 with an enormous Retry-After would hold a task (and the site's agent) for
    ever if it were honoured as sent: each wait is capped, and the server that stays down is one line."""
    slept: list[float] = []
    client = FhirClient(
        "https://fhir.test/r4",
        retries=3,
        transport=httpx.MockTransport(
            lambda request: httpx.Response(503, headers={"Retry-After": retry_after})
        ),
        sleep=slept.append,
    )
    with pytest.raises(SourceUnavailableError, match="HTTP 503"):
        client.get("metadata")
    assert len(slept) == 3
    assert all(0.0 <= wait <= 30.0 for wait in slept), slept
