"""Memory exhaustion without authentication (threat-model finding 11), against the real orchestrator process.

The orchestrator used to read and parse a JSON body before it checked the token and the rate; three parallel
64 MiB bodies to the challenge route took it to 1.1 GiB. Now every route has a body class (64 KiB JSON, 4 MiB
documents, uploads bounded by the model's size and streamed to disk), and credentials and rate are checked
from the headers, before a byte of the body is read.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from support_services import (
    KeyHolder,
    RssSampler,
    headers_only,
    memory_kb,
    poll_task,
    synthetic_spec,
    tls_verify,
    valid_update,
)

from fedhealth.sim import LocalFederation

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def approved(fed, spec):
    """Every site the spec names approves it first (its steward's part), so the study starts at once."""
    for site in dict.fromkeys([*spec.train_sites, *spec.evaluation_sites]):
        fed.approve(site, spec)
    return spec


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("limits")) as fed:
        fed.start_orchestrator()
        fed.add_site("lim-site")
        yield fed


def _json_flood(total: int, chunk: int = MiB):
    """A syntactically valid JSON body of ``total`` bytes (one huge string), produced lazily."""
    yield b'{"site": "'
    left = total - 12
    block = b"a" * chunk
    while left > 0:
        yield block[: min(chunk, left)]
        left -= chunk
    yield b'"}'


def _send(fed, path, *, size, declare_length, headers=None, results=None):
    headers = dict(headers or {})
    headers["Content-Type"] = "application/json"
    if declare_length:
        headers["Content-Length"] = str(size)
    try:
        with httpx.Client(base_url=fed.url, verify=tls_verify(fed), timeout=120) as http:
            response = http.post(path, content=_json_flood(size), headers=headers)
        results.append(response.status_code)
    except httpx.HTTPError as exc:  # the server answered and closed while we were still sending
        results.append(type(exc).__name__)


def test_a_flood_of_oversized_bodies_leaves_the_orchestrator_memory_flat(fed):
    pid = fed.orchestrator.pid
    # the recipes' libraries load beside the service at start (~130 MB): measure once they are in
    deadline = time.monotonic() + 120
    while (health := fed.http.get("/healthz").json())["libraries"] != "loaded":
        assert time.monotonic() < deadline, f"the orchestrator still loads its libraries: {health}"
        time.sleep(0.2)
    before = memory_kb(pid)
    results: list[object] = []
    jobs = []
    for path in ("/api/v1/agent/challenge", "/api/v1/auth/token", "/api/v1/enroll"):
        for declare in (True, False):  # with a Content-Length, and chunked (no length declared)
            jobs.append({"path": path, "declare_length": declare})
    jobs.append({"path": "/api/v1/studies", "declare_length": False})  # authenticated: no token sent
    jobs.append({"path": "/api/v1/agent/tasks/x/result", "declare_length": False})
    with RssSampler(pid) as sampler:
        threads = [
            threading.Thread(target=_send, args=(fed,), kwargs={"size": 64 * MiB, **job, "results": results})
            for job in jobs
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    after = memory_kb(pid)
    grew_to = max(sampler.peak_kb, after["VmHWM"] if after["VmHWM"] > before["VmHWM"] else 0)
    growth_mb = (grew_to - before["VmRSS"]) / 1024
    assert growth_mb < 100, f"the orchestrator grew by {growth_mb:.0f} MB under the flood ({results})"
    assert len(results) == len(jobs)
    assert all(r == 413 or r == 401 or isinstance(r, str) for r in results), results
    assert fed.orchestrator.poll() is None
    assert fed.http.get("/healthz").status_code == 200


def test_credentials_are_checked_before_the_body_is_read(fed):
    # a body is announced but never sent: the answer can only come from the headers
    for path in ("/api/v1/studies", "/api/v1/sites", "/api/v1/agent/tasks/x/failure"):
        status = headers_only(
            fed, "POST", path, {"Content-Type": "application/json", "Content-Length": "60000"}
        )
        assert status == 401, f"{path}: the orchestrator waited for the body of an unauthenticated request"
    status = headers_only(
        fed,
        "POST",
        "/api/v1/studies",
        {"Content-Type": "application/json", "Content-Length": "60000", "Authorization": "Bearer forged"},
    )
    assert status == 401


def test_a_declared_body_over_its_route_class_limit_is_refused_from_the_headers(fed):
    for path, length in (("/api/v1/agent/challenge", 65 * 1024), ("/api/v1/studies", 5 * MiB)):
        status = headers_only(
            fed, "POST", path, {"Content-Type": "application/json", "Content-Length": str(length)}
        )
        assert status == 413, path


def test_each_route_class_has_its_own_limit(fed):
    # JSON routes: 64 KiB, chunked or declared
    for declare in (True, False):
        results: list[object] = []
        _send(fed, "/api/v1/agent/challenge", size=70 * 1024, declare_length=declare, results=results)
        assert results[0] in (413, "RemoteProtocolError", "WriteError", "ReadError"), results
    # documents: a study spec of 200 kB (3,000 unknown sites) is read and judged on its content
    sites = [f"site-{i:05d}-{'x' * 48}" for i in range(3000)]
    spec = synthetic_spec("big", sites).model_dump(mode="json")
    response = fed.http.post("/api/v1/studies", json=spec, headers=fed.admin_headers())
    assert response.status_code == 422, response.text
    assert "unknown sites" in response.json()["detail"]
    # uploads: bounded by the task's model (64 float32 parameters here), not by the 512 MiB limit
    holder = KeyHolder(fed, "lim-site", fed.site_home("lim-site").identity())
    auth = holder.token_headers()
    study = fed.operator.create_study(approved(fed, synthetic_spec("upload-limit", ["lim-site"])))
    task = poll_task(holder.http, auth)
    oversized = valid_update(task) + b"\0" * (2 * MiB)
    response = holder.http.post(
        f"/api/v1/agent/tasks/{task.task_id}/result",
        content=oversized,
        headers={**auth, "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 413, response.text
    assert set(response.json()) == {"error", "detail"}
    response = holder.http.post(
        f"/api/v1/agent/tasks/{task.task_id}/result",
        content=valid_update(task),
        headers={**auth, "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text  # the task was not harmed by the refusal
    fed.operator.cancel_study(study.study_id)
    holder.close()


def test_the_rate_limit_applies_before_the_body_is_read(tmp_path):
    with LocalFederation(tmp_path, orchestrator_args=["--rate-limit", "1"]) as fed:
        fed.start_orchestrator()
        answers = [
            fed.http.post("/api/v1/agent/challenge", json={"site": "nobody"}).status_code for _ in range(6)
        ]
        assert 429 in answers, answers
        status = headers_only(
            fed,
            "POST",
            "/api/v1/agent/challenge",
            {"Content-Type": "application/json", "Content-Length": "200"},
        )
        assert status == 429
