"""An attacker's audit of the connectors' guarantees (docs/connectors.md): SQL reaching the warehouse, a
hostile or broken FHIR server, and secrets in what the site shows.

Who controls what: the orchestrator and the study spec name a dataset only by its registered name (a
``Name``); every URI, query, mapping and path is the site's. So the SQL tests attack what a site's own query
file or URI may carry (the statement check and the read-only transaction are the documented defences), and
the FHIR tests play a server that lies, loops, floods or echoes what it was sent.

Tests marked ``xfail(strict=True, reason="DEFECT: ...")`` show a guarantee that does not hold today; they
flip to failures (XPASS) once it is fixed.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import sqlalchemy as sa
from pydantic import ValidationError
from site_cli import cli, make_site_home

from fedhealth.core import ConfigError, DatasetError
from fedhealth.data import (
    FhirClient,
    SourceUnavailableError,
    UnsafeQueryError,
    check_read_only_sql,
    open_dataset,
)
from fedhealth.protocol import StudySpec
from support import POSTGRES_URL, logreg_recipe

TOKEN = "tok-ATTACK-5e1c7"
PATIENT = "PAT-ATTACK-91d2"

# --- SQL: the statement check and the read-only transaction -------------------------------------------------


def _victim(engine: sa.Engine, schema: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE TABLE "{schema}".victim (patient_id int, x float, y int)')
        conn.exec_driver_sql(
            f'INSERT INTO "{schema}".victim SELECT g, g * 1.5, mod(g, 2) FROM generate_series(1, 20) g'
        )


def _victim_rows(engine: sa.Engine, schema: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f'SELECT count(*) FROM "{schema}".victim').scalar_one())


@pytest.mark.postgres
def test_the_victim_table_reads_as_a_dataset_and_stays_whole(pg):
    """The control of the SQL tests below: the table and the count are what they say."""
    engine, schema = pg
    _victim(engine, schema)
    dataset = open_dataset(f"sql+{POSTGRES_URL}?table=victim&db_schema={schema}&label=y&id=patient_id")
    assert dataset.num_train + dataset.num_test == 20
    assert _victim_rows(engine, schema) == 20


@pytest.mark.postgres
def test_a_query_hiding_statements_after_an_escape_string_cannot_write(pg):
    engine, schema = pg
    _victim(engine, schema)
    query = (
        f"SELECT E'\\'' AS pad; COMMIT; DELETE FROM \"{schema}\".victim; "
        f'SELECT patient_id, x, y FROM "{schema}".victim; --\''
    )
    with suppress(DatasetError, ConfigError):
        open_dataset(f"sql+{POSTGRES_URL}?query={quote(query)}&label=y&id=patient_id")
    assert _victim_rows(engine, schema) == 20, "the dataset query deleted the warehouse's rows"
    with pytest.raises(UnsafeQueryError):
        check_read_only_sql(query)


@pytest.mark.postgres
@pytest.mark.parametrize("prefix", ["", "SELECT 1 AS pad; ", "SELECT 1 AS pad; COMMIT; "])
def test_the_database_runs_one_statement_even_if_the_statement_check_missed_a_second(pg, monkeypatch, prefix):
    """The second layer: were the statement check fooled, the server still refuses a query of several
    statements (psycopg sends it prepared), so a COMMIT cannot end the read-only transaction."""
    engine, schema = pg
    _victim(engine, schema)
    monkeypatch.setattr("fedhealth.data._sql.check_read_only_sql", lambda sql: None)
    query = f'{prefix}DELETE FROM "{schema}".victim; SELECT patient_id, x, y FROM "{schema}".victim'
    with pytest.raises(UnsafeQueryError, match="more than one statement"):
        open_dataset(f"sql+{POSTGRES_URL}?query={quote(query)}&label=y&id=patient_id")
    assert _victim_rows(engine, schema) == 20


def test_sqlite_runs_one_statement_even_if_the_statement_check_missed_a_second(tmp_path, monkeypatch):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE victim (patient_id int, x float, y int)")
        conn.exec_driver_sql("INSERT INTO victim VALUES (1, 1.5, 0), (2, 3.0, 1)")
    monkeypatch.setattr("fedhealth.data._sql.check_read_only_sql", lambda sql: None)
    query = quote("SELECT 1 AS pad; COMMIT; DELETE FROM victim; SELECT patient_id, x, y FROM victim")
    with pytest.raises(UnsafeQueryError, match="more than one statement"):
        open_dataset(f"sql+sqlite:///{tmp_path / 'w.db'}?query={query}&label=y&id=patient_id")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM victim").scalar_one() == 2
    engine.dispose()


@pytest.mark.parametrize(
    "query",
    [
        "SELECT 1; COMMIT; DELETE FROM victim",
        "SELECT E'\\'' AS pad; COMMIT; DELETE FROM victim; SELECT 1 --'",
        "SELECT 'a\\' AS pad; COMMIT; DELETE FROM victim; SELECT 1 --'",
        "SELECT `a'` AS pad; COMMIT; DELETE FROM victim; SELECT 'b`",
        "SELECT 1 /* /* */ ' */; COMMIT; DELETE FROM victim; -- '",
        "SELECT 1 /* a comment */; DELETE FROM victim",
        "SELECT 'it''s' AS a; DELETE FROM victim",
        "SELECT $q$;$q$ AS a; DELETE FROM victim",
        "SELECT 1 -- comment\n; DELETE FROM victim",
        "SELECT 1 --1; COMMIT; DELETE FROM victim",  # MySQL: 1 - -1, then two more statements
        "SELECT 1 /*!; COMMIT; DELETE FROM victim */",  # MySQL runs a /*! comment's text
        "SELECT 1 # comment\n, 2",  # MySQL: a comment; refused rather than read per dialect
        "SELECT * INTO copy FROM victim",
        "SELECT * FROM victim FOR UPDATE",
        "COMMIT",
        "DELETE FROM victim",
    ],
)
def test_the_statement_check_refuses_a_second_statement_or_a_write_outside_quotes(query):
    with pytest.raises(UnsafeQueryError):
        check_read_only_sql(query)


@pytest.mark.postgres
@pytest.mark.parametrize(
    "params",
    [
        {"table": 'victim"; DELETE FROM victim; --'},
        {"table": "victim; DELETE FROM victim"},
        {"table": "victim", "id": 'patient_id"; DELETE FROM victim; --'},
        {"table": "victim", "db_schema": 'x"; DELETE FROM victim; --'},
        {"query": "SELECT patient_id, x, y FROM victim", "db_schema": "x'); DELETE FROM victim; --"},
    ],
    ids=["table-quote", "table-semicolon", "id-column", "db-schema-table", "db-schema-query"],
)
def test_identifiers_in_the_uri_are_quoted_or_bound_never_pasted_into_sql(pg, params):
    engine, schema = pg
    _victim(engine, schema)
    params = {"db_schema": schema, "label": "y", **params}
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    with suppress(DatasetError, ConfigError):
        open_dataset(f"sql+{POSTGRES_URL}?{query}")
    assert _victim_rows(engine, schema) == 20


@pytest.mark.parametrize(
    "name",
    [
        "cohort'; DROP TABLE cohort; --",
        "../../etc/passwd",
        "/etc/passwd",
        "file:///etc/passwd",
        "sql+postgresql://x@evil/db?table=t",
        "fhir+http://evil.test/r4",
        "Cohort",
        ".hidden",
        "a" * 64,
        "cohort\n",
    ],
)
def test_a_study_can_name_a_dataset_only_by_a_plain_registered_name(name):
    """The spec's ``dataset`` is the only data selector the orchestrator sends: a name, never a path or a
    URI (the agent looks it up in the site's registry)."""
    with pytest.raises(ValidationError):
        StudySpec(name="s", dataset=name, recipe=logreg_recipe(2), rounds=1, train_sites=["hospital-a"])


# --- secrets in what the site shows -------------------------------------------------------------------------

SECRET = "S3cretPW-ATTACK"
COUNT_QUERY = quote("SELECT g AS patient_id, g * 1.5 AS x, mod(g, 2) AS y FROM generate_series(1, 20) g")


@pytest.mark.postgres
@pytest.mark.parametrize(
    "uri",
    [
        f"sql+postgresql+psycopg://postgres:{SECRET}@127.0.0.1:5432/test?query={COUNT_QUERY}&label=y&id=patient_id",
        f"sql+postgresql+psycopg://postgres@127.0.0.1:5432/test?password={SECRET}&query={COUNT_QUERY}&label=y",
        f"sql+postgresql+psycopg://postgres@127.0.0.1:5432/test?pass%77ord={SECRET}&query={COUNT_QUERY}&label=y",
    ],
    ids=["userinfo", "password-param", "percent-encoded-key"],
)
def test_a_password_given_in_the_uri_is_in_the_private_registry_and_in_no_output(tmp_path, uri):
    home = make_site_home(tmp_path)
    outputs = [cli("site", "dataset", "add", "cohort", uri, "--home", home)]
    assert outputs[0].exit_code == 0, outputs[0].output
    outputs.append(cli("site", "dataset", "list", "--home", home))
    outputs.append(cli("site", "dataset", "list", "--json", "--home", home))
    outputs.append(cli("site", "dataset", "check", "cohort", "--json", "--home", home))
    for result in outputs:
        assert SECRET not in result.output
    registry = home / "datasets.json"
    assert SECRET in registry.read_text()  # the control: it is kept, privately
    assert stat.S_IMODE(registry.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "schemas").stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((home / "schemas" / "cohort.json").stat().st_mode) == 0o600


@pytest.mark.postgres
def test_a_registry_left_readable_by_others_is_rewritten_private(tmp_path):
    home = make_site_home(tmp_path)
    registry = home / "datasets.json"
    registry.write_text("{}\n")
    os.chmod(registry, 0o666)
    uri = f"sql+postgresql+psycopg://postgres:{SECRET}@127.0.0.1:5432/test?query={COUNT_QUERY}&label=y"
    result = cli("site", "dataset", "add", "cohort", uri, "--home", home)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(registry.stat().st_mode) == 0o600


@pytest.mark.postgres
@pytest.mark.parametrize(
    "uri",
    [
        f"sql+postgresql+psycopg://postgres@127.0.0.1:5432/test?db.password={SECRET}&query={COUNT_QUERY}&label=y",
        f"sql+postgresql+psycopg://postgres@127.0.0.1:5432/test?PASSWORD={SECRET}&query={COUNT_QUERY}&label=y",
    ],
    ids=["driver-option", "mis-cased-key"],
)
def test_a_password_under_another_key_is_not_shown_either(tmp_path, uri):
    home = make_site_home(tmp_path)
    outputs = [cli("site", "dataset", "add", "cohort", uri, "--home", home)]
    outputs.append(cli("site", "dataset", "list", "--home", home))
    outputs.append(cli("site", "dataset", "check", "--home", home))
    for result in outputs:
        assert SECRET not in result.output, result.output


# --- a hostile or broken FHIR server ------------------------------------------------------------------------

MAPPING = """\
index_date = 2024-01-01

[label]
name = "outcome"
resource = "Condition"
codes = ["http://snomed.info/sct|22298006"]
window = [1, 365]

[[features]]
name = "age"
kind = "age"
"""

N_PATIENTS = 20


def _patient(i: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"p{i:03d}", "birthDate": f"{1940 + i}-05-01", "gender": "male"}


def _condition(i: int) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": f"c{i:03d}",
        "subject": {"reference": f"Patient/p{i:03d}"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "22298006"}]},
        "onsetDateTime": "2024-03-01",
    }


def bundle(resources: list[dict[str, Any]], next_url: str | None = None, mode: str = "match") -> dict:
    out: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": mode}} for r in resources],
    }
    if next_url is not None:
        out["link"] = [{"relation": "next", "url": next_url}]
    return out


CAPABILITY = {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "status": "active"}

# path (without the query) -> (status, headers, body); a callable gets the full request path
Answer = tuple[int, dict[str, str], bytes]


class StubServer:
    """A tiny HTTP server on loopback that answers each GET with ``answer(path)`` and records every request
    with its Authorization header."""

    def __init__(self, answer: Callable[[str], Answer]) -> None:
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Authorization")))
                status, headers, body = answer(self.path)
                self.send_response(status)
                for key, value in {"Content-Type": "application/fhir+json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@contextmanager
def stub(answer: Callable[[str], Answer]) -> Iterator[StubServer]:
    server = StubServer(answer)
    try:
        yield server
    finally:
        server.close()


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    return status, headers or {}, json.dumps(body).encode()


def fhir_answers(patients: Callable[[str], Answer]) -> Callable[[str], Answer]:
    """A FHIR server: its capability statement, ``patients`` for the Patient search, one Condition for every
    other patient."""

    def answer(path: str) -> Answer:
        if path.startswith("/fhir/metadata"):
            return _json(CAPABILITY)
        if path.startswith("/fhir/Patient"):
            return patients(path)
        if path.startswith("/fhir/Condition"):
            return _json(bundle([_condition(i) for i in range(0, N_PATIENTS, 2)]))
        return _json({"resourceType": "OperationOutcome"}, status=404)

    return answer


@pytest.fixture
def mapping(tmp_path) -> Path:
    path = tmp_path / "mapping.toml"
    path.write_text(MAPPING)
    return path


def fhir_uri(server: StubServer, mapping: Path, extra: str = "") -> str:
    return f"fhir+{server.origin}/fhir?mapping={mapping}&token={TOKEN}&retries=0&timeout_s=5{extra}"


def test_a_well_behaved_stub_server_reads_as_a_dataset(mapping):
    """The control of the FHIR tests: the stub serves a dataset the connector reads, with the token."""
    with stub(fhir_answers(lambda path: _json(bundle([_patient(i) for i in range(N_PATIENTS)])))) as fhir:
        dataset = open_dataset(fhir_uri(fhir, mapping))
    assert dataset.num_train + dataset.num_test == N_PATIENTS
    assert {auth for _, auth in fhir.requests} == {f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    "next_of",
    [
        lambda evil: f"{evil}/fhir/Patient?page=2",
        lambda evil: "//" + evil.removeprefix("http://") + "/fhir/Patient?page=2",
        lambda evil: evil.replace("127.0.0.1", "localhost") + "/fhir/Patient?page=2",
        lambda evil: evil.replace("http://", "http://127.0.0.1:1@") + "/fhir/Patient?page=2",
        lambda evil: evil.replace("http://", "HTTP://") + "/fhir/Patient?page=2",
    ],
    ids=["other-port", "scheme-relative", "other-hostname", "userinfo-trick", "upper-case-scheme"],
)
def test_a_next_link_to_another_origin_is_refused_and_the_token_goes_nowhere_else(mapping, next_of):
    with stub(lambda path: _json(bundle([_patient(99)]))) as evil:
        first_page = bundle([_patient(i) for i in range(N_PATIENTS)], next_url=next_of(evil.origin))
        refused = pytest.raises(SourceUnavailableError, match="another origin")
        with stub(fhir_answers(lambda path: _json(first_page))) as fhir, refused:
            open_dataset(fhir_uri(fhir, mapping))
        assert evil.requests == []


def test_a_redirect_to_another_host_is_not_followed_with_the_token(mapping):
    with stub(lambda path: _json(bundle([_patient(99)]))) as evil:

        def patients(path: str) -> Answer:
            return 302, {"Location": f"{evil.origin}/steal"}, b""

        with stub(fhir_answers(patients)) as fhir, pytest.raises(SourceUnavailableError):
            open_dataset(fhir_uri(fhir, mapping))
        assert evil.requests == []


def test_a_server_echoing_the_token_in_its_error_does_not_put_it_in_the_message(mapping):
    def answer(path: str) -> Answer:
        diagnostics = f"forbidden; the request carried Authorization: Bearer {TOKEN}"
        issue = {"severity": "error", "code": "forbidden", "diagnostics": diagnostics}
        return _json({"resourceType": "OperationOutcome", "issue": [issue]}, status=400)

    with stub(answer) as fhir, pytest.raises(SourceUnavailableError) as caught:
        open_dataset(fhir_uri(fhir, mapping))
    assert "HTTP 400" in str(caught.value)  # the control: it is the server's error
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    "body",
    [b"{not json " + PATIENT.encode(), b"[1, 2, 3]", b"", b'"' + PATIENT.encode() + b'"'],
    ids=["broken", "a-list", "empty", "a-string"],
)
def test_a_page_that_is_not_json_is_one_line_naming_no_content(mapping, body):
    refused = pytest.raises(SourceUnavailableError, match="not a FHIR JSON resource")
    with stub(fhir_answers(lambda path: (200, {}, body))) as fhir, refused as caught:
        open_dataset(fhir_uri(fhir, mapping))
    message = str(caught.value)
    assert "\n" not in message
    assert PATIENT not in message


def test_a_search_answered_with_another_resource_type_is_refused(mapping):
    refused = pytest.raises(SourceUnavailableError, match="not a Bundle")
    with stub(fhir_answers(lambda path: _json(_patient(1)))) as fhir, refused:
        open_dataset(fhir_uri(fhir, mapping))


def test_resources_of_the_wrong_type_or_mode_and_repeated_patients_never_become_rows(mapping):
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"text": "x"},
    }

    def patients(path: str) -> Answer:
        if "page=2" in path:  # the second page repeats two patients of the first
            return _json(bundle([_patient(0), _patient(1)]))
        entries = bundle([_patient(i) for i in range(N_PATIENTS)], next_url="/fhir/Patient?page=2")
        entries["entry"].append({"resource": observation, "search": {"mode": "match"}})
        entries["entry"].append({"resource": _patient(500), "search": {"mode": "include"}})
        entries["entry"].append({"resource": _patient(501), "search": {"mode": "outcome"}})
        entries["entry"].append("not an entry")
        return _json(entries)

    with stub(fhir_answers(patients)) as fhir:
        dataset = open_dataset(fhir_uri(fhir, mapping, "&test_fraction=0.5"))
    ids = sorted((*dataset.patient_ids_train, *dataset.patient_ids_test))
    assert ids == [f"p{i:03d}" for i in range(N_PATIENTS)]


def test_a_next_link_that_loops_back_is_refused(mapping):
    served = 0
    cap = 1000

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal served
        served += 1
        if served >= cap:  # the test's own bound: a client without one reads every page we serve
            return httpx.Response(200, json=bundle([]))
        return httpx.Response(
            200, json=bundle([_patient(1)], next_url="https://fhir.test/r4/Patient?_getpages=x&page=1")
        )

    client = FhirClient("https://fhir.test/r4", token=TOKEN, transport=httpx.MockTransport(handler))
    with pytest.raises(SourceUnavailableError):
        list(client.search("Patient"))
    assert served < cap


def test_an_endless_response_is_refused_before_it_fills_memory():
    chunk = b" " * (1 << 20)
    limit = 96  # MiB the test will stream at most
    consumed = 0

    def endless() -> Iterator[bytes]:
        nonlocal consumed
        yield b'{"resourceType": "Bundle", "entry": ['
        for _ in range(limit):
            consumed += len(chunk)
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    client = FhirClient("https://fhir.test/r4", retries=0, transport=httpx.MockTransport(handler))
    with pytest.raises(SourceUnavailableError):
        list(client.search("Patient"))
    assert consumed <= 64 << 20, f"read {consumed >> 20} MiB of one page"
