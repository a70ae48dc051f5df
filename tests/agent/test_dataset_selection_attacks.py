"""An attacker's audit of how a task selects data at a site (docs/connectors.md: "the orchestrator receives
one code"): the orchestrator names a dataset the site never registered, and a site's FHIR server answers a
task with an error that carries a patient id and echoes the bearer token. Only a code goes upstream."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from site_fixtures import SITE, agent, approve, make_home, task

from fedhealth.protocol import FailureCode, StudySpec
from support import logreg_recipe

PATIENT = "PAT-TASK-4b7e"
TOKEN = "tok-TASK-0c9d"


def spec(dataset: str) -> StudySpec:
    return StudySpec(name="probe", dataset=dataset, recipe=logreg_recipe(1), rounds=1, train_sites=[SITE])


def sent(client) -> str:
    return "\n".join(m.model_dump_json() for m in (*client.failures, *client.results, *client.evaluations))


@pytest.fixture
def hostile_fhir() -> Iterator[tuple[str, list[str]]]:
    """A FHIR server that answers every request with an OperationOutcome naming a patient and echoing the
    Authorization header it received; yields its base URL and the headers it saw."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization") or ""
            seen.append(auth)
            text = f"patient {PATIENT} is locked; request carried {auth}"
            body = json.dumps(
                {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "diagnostics": text}]}
            ).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_task_naming_a_dataset_the_site_never_registered_opens_nothing_and_sends_a_code(tmp_path, caplog):
    home = make_home(tmp_path / "site")
    secret_folder = tmp_path / f"ward-{PATIENT}"
    study = spec("builtin")  # a registered scheme's name, never a registered dataset
    approve(home, study)
    site_agent, client = agent(home, {"cohort": f"file://{secret_folder}/cohort.csv?label=y"})
    caplog.set_level(logging.INFO, logger="fedhealth.agent")
    site_agent.handle(task(study))
    [failure] = client.failures
    assert failure.code is FailureCode.DATASET_UNAVAILABLE
    assert PATIENT not in sent(client)
    assert "cohort" not in sent(client)
    assert "no dataset named 'builtin'" in caplog.text  # the control: the detail stayed in the site's log


def test_a_hostile_fhir_server_at_task_time_reaches_the_orchestrator_as_a_code(
    tmp_path, hostile_fhir, caplog
):
    base, seen = hostile_fhir
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        'index_date = 2024-01-01\n[label]\nname = "y"\nresource = "Condition"\ncodes = ["1"]\n'
        'window = [1, 365]\n[[features]]\nname = "age"\nkind = "age"\n'
    )
    home = make_home(tmp_path / "site")
    study = spec("cohort")
    approve(home, study)
    uri = f"fhir+{base}?mapping={mapping}&token={TOKEN}&retries=0&timeout_s=5"
    site_agent, client = agent(home, {"cohort": uri})
    caplog.set_level(logging.INFO, logger="fedhealth.agent")
    site_agent.handle(task(study))
    [failure] = client.failures
    assert failure.code is FailureCode.DATASET_UNAVAILABLE
    assert set(failure.model_dump(exclude_none=True)) <= {"code", "attestation"}
    upstream = sent(client)
    for marker in (PATIENT, TOKEN, base):
        assert marker not in upstream
    assert seen
    assert PATIENT in caplog.text
