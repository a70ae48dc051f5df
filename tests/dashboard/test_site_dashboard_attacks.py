"""The site dashboard (``fedhealth site dashboard``: the data steward's approvals queue, consent flags and
data quality) attacked as a web application: docs/dashboard.md, "The site dashboard".

In process (no orchestrator; the queue's fetch from the orchestrator is stubbed where a page would wait for
it): every HTML answer forbids inline script and framing; what a researcher writes in a spec (name, owner,
description, fields this release does not know), what a dataset's header holds (column names), a consent
purpose and a steward's reason are escaped where drawn; the one-time sign-in link is refused when wrong or
empty and spent on first use, even by requests that race for it; its cookie is ``HttpOnly``,
``SameSite=Strict`` and not ``Secure``; every state-changing form refuses a missing, forged or query-string
CSRF token and changes nothing (no decision, no log entry, nothing sent); GET/HEAD/OPTIONS change nothing;
a decision needs the spec to have been read; nothing is answered without a session; the static route serves
its four names only; no patient id reaches a page. As a process: it listens on the loopback interface, and
the sign-in token is not in its command line or environment (which other local users can read).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from fedhealth.agent import SiteDatasets, SiteGovernance, SiteHome
from fedhealth.crypto import IdentityKey
from fedhealth.dashboard import site_dashboard_app
from fedhealth.dashboard._site import SITE_COOKIE
from fedhealth.governance import AuditEventType, ConsentDecision, ConsentRecord, spec_hash
from support import TestClient, breast_spec

XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_SCRIPT = "</script><script>alert(2)</script>"
XSS_SVG = "<svg onload=alert(3)>"
RAW = ("<img src=x onerror", "<script>alert", "<svg onload")
PATIENT = "MRN-90210-SECRET"
TOKEN = "the-one-time-token"
LOCAL = "http://127.0.0.1:8765"  # the dashboard answers only a loopback Host with its own port
COOKIE = f"{SITE_COOKIE}_8765"  # named per port


@pytest.fixture
def home(tmp_path: Path) -> SiteHome:
    home = SiteHome(tmp_path / "site")
    home.root.mkdir(mode=0o700)
    IdentityKey.generate().save(home.identity_path)
    home.settings_path.write_text(json.dumps({"site": "solo", "orchestrator": "https://127.0.0.1:1"}))
    return home


@pytest.fixture
def no_orchestrator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue's fetch from the orchestrator answers at once (as if it had nothing new)."""
    monkeypatch.setattr("fedhealth.dashboard._site._sync", lambda governance: None)


@pytest.fixture
def steward(home: SiteHome, no_orchestrator: None) -> Iterator[TestClient]:
    app = site_dashboard_app(home, token=TOKEN, steward="dana")
    with TestClient(app, base_url=LOCAL) as client:
        assert client.get(f"/login?token={TOKEN}", follow_redirects=False).status_code == 303
        yield client


def _pending(home: SiteHome, **overrides: object) -> str:
    body = breast_spec(["solo"], rounds=1, name="sepsis-risk").model_dump(mode="json") | overrides
    with SiteGovernance(home) as governance:
        governance.submit(body)
    return spec_hash(body)


def _log(home: SiteHome) -> list:
    with SiteGovernance(home) as governance:
        return list(governance.log.entries())


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))


def _assert_hardened(response) -> None:
    assert response.headers["content-type"].startswith("text/html")
    policy = {}
    for directive in filter(
        None, (d.strip() for d in response.headers["content-security-policy"].split(";"))
    ):
        name, *values = directive.split()
        policy[name] = values
    assert policy.get("script-src") == ["'self'"], policy
    assert policy.get("frame-ancestors") == ["'none'"], policy
    assert policy.get("form-action") == ["'self'"], policy
    assert policy.get("base-uri") == ["'none'"], policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    dom = _Dom()
    dom.feed(response.text)
    for tag, attrs in dom.elements:
        if tag == "script":
            assert attrs.get("src", "").startswith("/static/") or attrs.get("type") == "application/json", (
                attrs
            )
        assert tag not in {"img", "svg", "iframe", "object", "embed", "base", "math"}, (tag, attrs)
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        for name in {"href", "src", "action", "formaction"} & attrs.keys():
            assert (
                not attrs[name].strip().lower().startswith(("javascript:", "data:text", "vbscript:", "//"))
            ), attrs


# --- headers and escaping ---------------------------------------------------------------------------------


def test_every_site_page_and_error_forbids_inline_script_and_framing(steward, home):
    digest = _pending(home)
    for path in ("/approvals", f"/approvals/{digest}", "/overview", "/overview/verify", "/datasets"):
        page = steward.get(path)
        assert page.status_code == 200, path
        _assert_hardened(page)
    for path, status in [(f"/approvals/{'0' * 64}", 404), ("/approvals/nothex", 404)]:
        error = steward.get(path)
        assert error.status_code == status, path
        _assert_hardened(error)
    forged = steward.post(f"/approvals/{digest}/decide", data={"decision": "approve", "reason": "x"})
    assert forged.status_code == 403
    _assert_hardened(forged)
    stranger = TestClient(steward.app, base_url=LOCAL).get("/approvals")
    assert stranger.status_code == 401
    _assert_hardened(stranger)


def test_what_a_researcher_writes_in_a_spec_is_escaped_in_the_queue_and_the_spec(steward, home):
    # a spec as an orchestrator may relay it: a name, owner and fields this release cannot validate
    odd = _pending(home, name=XSS_SVG, owner=XSS_IMG, description=XSS_SCRIPT, extra={XSS_IMG: XSS_SCRIPT})
    # a valid spec whose free-text description goes into the plain-language summary
    valid = _pending(home, description=f"{XSS_SCRIPT} {XSS_IMG}")
    queue = steward.get("/approvals")
    assert queue.status_code == 200
    for raw in RAW:
        assert raw not in queue.text
    assert "&lt;svg onload=alert(3)&gt;" in queue.text  # drawn, as text
    for digest in (odd, valid):
        page = steward.get(f"/approvals/{digest}")
        assert page.status_code == 200
        for raw in RAW:
            assert raw not in page.text, (digest, raw)
        _assert_hardened(page)
    summary = steward.get(f"/approvals/{valid}").text.split('id="summary"')[1].split("</ul>")[0]
    assert "&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in summary
    # the steward's own reason, shown in the decided list
    form = steward.get(f"/approvals/{valid}").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    decided = steward.post(
        f"/approvals/{valid}/decide",
        data={"csrf_token": token, "decision": "refuse", "reason": XSS_IMG},
        follow_redirects=False,
    )
    assert decided.status_code == 303
    queue = steward.get("/approvals")
    assert XSS_IMG not in queue.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in queue.text.split('id="decided"')[1]
    _assert_hardened(queue)


def test_column_names_values_and_consent_purposes_are_escaped_and_no_patient_id_is_shown(
    steward, home, tmp_path
):
    csv = tmp_path / "cohort.csv"
    column = '"><img src=x onerror=alert(1)>'
    lines = ["pid,age,label"] + [f"{PATIENT}-{i},{40 + i},{i % 2}" for i in range(30)]
    csv.write_text("\n".join(lines) + "\n")
    SiteDatasets(home).add("cohort", f"file://{csv}?label=label&id=pid")
    with SiteGovernance(home) as governance:
        governance.consent().add(
            [ConsentRecord(patient_id=f"{PATIENT}-{i}", purpose="research", decision=ConsentDecision.PERMIT)
             for i in range(3)]
        )  # fmt: skip
        governance.consent().add(
            [ConsentRecord(patient_id=f"{PATIENT}-9", purpose=XSS_SVG, decision=ConsentDecision.DENY)]
        )
        governance.consent().withdraw(f"{PATIENT}-0", "research")
    ok = steward.get("/datasets")
    assert ok.status_code == 200
    assert PATIENT not in ok.text
    _assert_hardened(ok)
    # a header cell an attacker wrote, and a failed check quoting a cell: escaped
    csv.write_text(csv.read_text().replace("pid,age,label", f"pid,{column},label", 1))
    st = csv.stat()
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    failed = steward.get("/datasets?refresh=1")
    assert failed.status_code == 200
    assert "check FAILED" in failed.text
    assert "<img src=x onerror" not in failed.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in failed.text  # drawn, as text
    _assert_hardened(failed)
    overview = steward.get("/overview")
    assert overview.status_code == 200
    assert PATIENT not in overview.text
    assert "<svg onload" not in overview.text
    assert "&lt;svg onload=alert(3)&gt;" in overview.text.split('id="site-consent"')[1]
    _assert_hardened(overview)


# --- the one-time sign-in link and the session -------------------------------------------------------------


def test_a_wrong_empty_or_spent_sign_in_token_opens_nothing(home, no_orchestrator):
    app = site_dashboard_app(home, token=TOKEN, steward="dana")
    with TestClient(app, base_url=LOCAL) as intruder:
        for query in ("", "?token=", "?token=x", f"?token={TOKEN[:-1]}", f"?token={TOKEN}x", f"?tok={TOKEN}"):
            answer = intruder.get(f"/login{query}", follow_redirects=False)
            assert answer.status_code == 401, query
            assert "set-cookie" not in answer.headers
        # the token sent where a browser would not put it
        assert intruder.post("/login", data={"token": TOKEN}).status_code == 405
        assert intruder.get("/approvals", headers={"Cookie": f"{COOKIE}={TOKEN}"}).status_code == 401
    with TestClient(app, base_url=LOCAL) as steward:  # the link still works once for its steward
        assert steward.get(f"/login?token={TOKEN}", follow_redirects=False).status_code == 303
        assert steward.get("/approvals").status_code == 200
    with TestClient(app, base_url=LOCAL) as late:
        assert late.get(f"/login?token={TOKEN}", follow_redirects=False).status_code == 401
        assert late.get("/approvals").status_code == 401


def test_racing_requests_for_the_sign_in_link_open_one_session(home, no_orchestrator):
    app = site_dashboard_app(home, token=TOKEN, steward="dana")
    with TestClient(app, base_url=LOCAL) as client:
        answers: list[int] = []
        lock = threading.Lock()

        def attempt() -> None:
            status = (
                TestClient(app, base_url=LOCAL)
                .get(f"/login?token={TOKEN}", follow_redirects=False)
                .status_code
            )
            with lock:
                answers.append(status)

        threads = [threading.Thread(target=attempt) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(answers) == [303] + [401] * 11
        del client


def test_the_session_cookie_is_http_only_strict_and_scoped_to_this_host(home, no_orchestrator):
    app = site_dashboard_app(home, token=TOKEN, steward="dana")
    with TestClient(app, base_url=LOCAL) as client:
        answer = client.get(f"/login?token={TOKEN}&next=https://evil.example/", follow_redirects=False)
        assert answer.status_code == 303
        assert answer.headers["location"] == "/approvals"  # no open redirect
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Path=/" in cookie
        assert "Domain=" not in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would never come back
        session = cookie.split(";")[0].split("=", 1)[1]
        assert session != TOKEN
        assert len(session) >= 32
        assert session not in client.get("/approvals").text  # no script or page reads it
        for forged in ("", "x", session + "x", session[:-1], TOKEN):
            assert (
                TestClient(app, base_url=LOCAL)
                .get("/overview", headers={"Cookie": f"{COOKIE}={forged}"})
                .status_code
                == 401
            ), forged


def test_nothing_is_answered_or_recorded_without_a_session(home, no_orchestrator):
    digest = _pending(home)
    app = site_dashboard_app(home, token=TOKEN, steward="dana")
    before = len(_log(home))
    with TestClient(app, base_url=LOCAL) as stranger:
        for method, path in [
            ("GET", "/approvals"),
            ("GET", f"/approvals/{digest}"),
            ("GET", "/overview"),
            ("GET", "/overview/verify"),
            ("GET", "/datasets"),
            ("GET", "/datasets?refresh=1"),
            ("POST", f"/approvals/{digest}/decide"),
            ("POST", "/overview/withdrawals"),
        ]:
            answer = stranger.request(method, path, data={"decision": "approve", "reason": "r"})
            assert answer.status_code == 401, path
            assert "sepsis-risk" not in answer.text
            assert digest not in answer.text
            assert "set-cookie" not in answer.headers
    assert len(_log(home)) == before  # not even a study.reviewed
    with SiteGovernance(home) as governance:
        assert governance.approvals.get(digest).status.value == "pending"


# --- CSRF, methods, the read-before-deciding rule -----------------------------------------------------------


def test_a_decision_with_a_missing_forged_or_query_string_csrf_token_changes_nothing(steward, home):
    digest = _pending(home)
    page = steward.get(f"/approvals/{digest}").text  # read: only the token stands between it and a decision
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    before = len(_log(home))
    attempts = [
        (f"/approvals/{digest}/decide", {"decision": "approve", "reason": "forged"}),
        (f"/approvals/{digest}/decide", {"decision": "approve", "reason": "forged", "csrf_token": ""}),
        (
            f"/approvals/{digest}/decide",
            {"decision": "approve", "reason": "forged", "csrf_token": token[:-1]},
        ),
        (f"/approvals/{digest}/decide", {"decision": "approve", "reason": "forged", "csrf_token": TOKEN}),
        (f"/approvals/{digest}/decide?csrf_token={token}", {"decision": "approve", "reason": "forged"}),
    ]
    for path, data in attempts:
        answer = steward.post(
            path, data=data, headers={"Origin": "http://evil.example"}, follow_redirects=False
        )
        assert answer.status_code == 403, (path, data)
    repeated = steward.post(
        f"/approvals/{digest}/decide",
        content=f"csrf_token=forged&csrf_token={token}&decision=approve&reason=forged",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert repeated.status_code == 403
    assert len(_log(home)) == before
    with SiteGovernance(home) as governance:
        assert governance.approvals.get(digest).status.value == "pending"


def test_no_get_head_or_options_decides_or_sends_anything(steward, home):
    digest = _pending(home)
    page = steward.get(f"/approvals/{digest}").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    with SiteGovernance(home) as governance:
        governance.consent().withdraw("patient-0", "research")
    before = len(_log(home))
    for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
        for path in (
            f"/approvals/{digest}/decide?decision=approve&reason=r&csrf_token={token}",
            f"/overview/withdrawals?csrf_token={token}",
        ):
            answer = steward.request(method, path, headers={"Origin": "http://evil.example"})
            assert answer.status_code == 405, (method, path)
            assert "access-control-allow-origin" not in answer.headers
    assert len(_log(home)) == before
    with SiteGovernance(home) as governance:
        assert governance.approvals.get(digest).status.value == "pending"


def test_a_spec_not_read_cannot_be_decided_even_with_the_right_token(steward, home):
    read = _pending(home)
    unread = _pending(home, name="other-study")
    token = re.search(r'name="csrf_token" value="([^"]+)"', steward.get(f"/approvals/{read}").text).group(1)
    for decision in ("approve", "refuse"):
        answer = steward.post(
            f"/approvals/{unread}/decide",
            data={"csrf_token": token, "decision": decision, "reason": "looks fine"},
            follow_redirects=False,
        )
        assert answer.status_code == 409
        assert "read it before deciding" in answer.text
    for bad in ({"decision": "approve", "reason": ""}, {"decision": "maybe", "reason": "r"},
                {"decision": "approve", "reason": "r" * 2001}):  # fmt: skip
        assert steward.post(f"/approvals/{read}/decide", data={"csrf_token": token, **bad}).status_code == 400
    with SiteGovernance(home) as governance:
        assert governance.approvals.get(unread).status.value == "pending"
        assert governance.approvals.get(read).status.value == "pending"
    kinds = {e.type for e in _log(home)}
    assert AuditEventType.STUDY_APPROVED not in kinds
    assert AuditEventType.STUDY_REJECTED not in kinds


def test_static_assets_are_served_by_name_only(steward):
    for path in (
        "/static/..%2f_site.py",
        "/static/%2e%2e%2f%2e%2e%2f__init__.py",
        "/static/..%5c_site.py",
        "/static/dashboard.js%00.html",
        "/static/templates%2fbase.html",
        "/static/..%2f..%2f..%2f..%2fsite.json",
    ):
        answer = steward.get(path)
        assert answer.status_code == 404, path
        assert b"import " not in answer.content
        assert b"orchestrator" not in answer.content
    assert steward.get("/static/dashboard.css").headers["x-content-type-options"] == "nosniff"


# --- as a process ------------------------------------------------------------------------------------------


def test_the_dashboard_process_listens_on_loopback_and_keeps_its_token_out_of_argv_and_environ(
    home, tmp_path
):
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedhealth", "site", "dashboard", "--home", str(home.root), "--port", "0",
         "--steward", "dana", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():
            assert proc.poll() is None, f"the site dashboard exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the site dashboard did not start"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert ready.stat().st_mode & 0o077 == 0
        url = httpx.URL(info["url"])
        assert url.host == "127.0.0.1"
        token = httpx.URL(info["login_url"]).params["token"]
        assert len(token) >= 32
        # what another local user can read of the process
        for name in ("cmdline", "environ"):
            readable = Path(f"/proc/{proc.pid}/{name}")
            if readable.exists():
                assert token.encode() not in readable.read_bytes(), name
        with httpx.Client(base_url=info["url"], timeout=10) as stranger:
            assert stranger.get("/overview").status_code == 401
            assert stranger.get("/login", params={"token": token + "x"}).status_code == 401
        with httpx.Client(base_url=info["url"], timeout=10) as client:
            signed = client.get("/login", params={"token": token}, follow_redirects=False)
            assert signed.status_code == 303
            assert client.get("/datasets").status_code == 200
        with httpx.Client(base_url=info["url"], timeout=10) as replay:
            assert replay.get("/login", params={"token": token}, follow_redirects=False).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_a_decision_waits_only_briefly_on_an_orchestrator_out_of_reach(steward, home, monkeypatch):
    """The agent reports a decision again if the dashboard's report fails: the steward's page asks the
    orchestrator with a short wait, not the client's default 15 s."""
    waits: list[float] = []

    def report(home, spec_hash, *, approved, url=None, max_elapsed_s=15.0):
        waits.append(max_elapsed_s)
        raise httpx.ConnectError("connection refused")

    monkeypatch.setattr("fedhealth.dashboard._site.report_approval", report)
    digest = _pending(home)
    form = steward.get(f"/approvals/{digest}").text  # read before deciding
    token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    decided = steward.post(
        f"/approvals/{digest}/decide",
        data={"csrf_token": token, "decision": "approve", "reason": "fine"},
        follow_redirects=False,
    )
    assert decided.status_code == 303  # decided here; the orchestrator is told later
    assert len(waits) == 1
    assert waits[0] <= 3.0
