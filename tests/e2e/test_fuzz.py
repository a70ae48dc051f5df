"""Property-based fuzzing of the orchestrator's OpenAPI schema (agent and operator APIs): no input, however
malformed, may produce a 5xx. Requests go over HTTPS to a real orchestrator process, authenticated as a site
for the agent API and as the admin for everything else, so the fuzzer gets past authentication.

Schemathesis generates the cases from the served schema; Hypothesis drives them. (Schemathesis's pytest
plugin does not yet work with pytest 9, so the operations are driven with ``as_strategy`` directly.)
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from fedhealth.sim import LocalFederation
from support import RogueSite

pytestmark = pytest.mark.e2e
UNAUTHENTICATED = ("/api/v1/agent/challenge", "/api/v1/agent/token", "/api/v1/enroll", "/api/v1/auth/token")


@pytest.fixture(scope="module")
def fuzz_fed(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("fuzz"), log_level="warning") as fed:
        fed.start_orchestrator()
        fed.add_site("fuzz-site")
        yield fed


def test_no_request_to_any_endpoint_gets_a_server_error(fuzz_fed):
    ca = str(fuzz_fed.home.ca_cert)
    rogue = RogueSite(fuzz_fed, "fuzz-site")
    credentials = {"site": rogue.client.auth_headers(), "admin": fuzz_fed.admin_headers()}
    rogue.close()
    schema = schemathesis.openapi.from_url(f"{fuzz_fed.url}/openapi.json", verify=ca)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, "the schema should expose the whole agent and operator API"
    failures: list[str] = []
    session = requests.Session()  # one TLS connection for all cases
    session.verify = ca

    def fuzz_operation(operation, who):
        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            if operation.path == "/api/v1/agent/tasks/next":
                wait = (case.query or {}).get("wait")
                if wait is None or isinstance(wait, int | float):  # keep long polls short
                    case.query = {**(case.query or {}), "wait": min(wait or 0, 0.1)}
            headers = dict(credentials[who]) if who else {}
            response = case.call(session=session, headers=headers, verify=ca, timeout=30)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
                )
            elif response.status_code >= 400:
                assert set(response.json()) == {"error", "detail"}, response.text

        fuzz()

    for operation in operations:
        path = operation.path
        fuzz_operation(
            operation,
            None if path in UNAUTHENTICATED else "site" if path.startswith("/api/v1/agent/") else "admin",
        )
    session.close()
    assert not failures, "\n".join(failures[:20])
