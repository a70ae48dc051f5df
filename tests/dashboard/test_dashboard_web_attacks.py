"""The governance dashboard (``/ui`` on the orchestrator) attacked as a web application, in process:
docs/dashboard.md ("Signing in, roles, CSRF", and the Content-Security-Policy of the install paragraph) and
docs/security.md ("Operators", "Mutual TLS").

- Stored XSS: every string a researcher, a site or an unauthenticated visitor controls (a software version, a
  failure reason, a cancel reason, a round metric's name, a validation metric's name, a drift finding's
  feature and dataset, a budget entry's site and dataset, a refused sign-in's user name) is escaped where a
  page draws it, and survives JSON-in-``<script>`` (``</script>``, U+2028) as data.
- Headers: every HTML answer carries a CSP with ``script-src 'self'`` (no inline script), ``frame-ancestors
  'none'``, ``nosniff`` and ``no-store``; the pages hold no inline script.
- CSRF and methods: every state-changing form refuses a missing token, another session's token (same user),
  a token of a signed-out session, a token sent in the query string; GET/HEAD/OPTIONS change nothing and no
  CORS header is granted to another origin; sign-in has no open redirect and refuses a session swap.
- Sessions: the cookie's flags (session and sign-in cookies, and their deletion at sign-out); a cookie planted
  before sign-in is replaced; a session cookie does not authenticate the REST API (it is a bearer only).
- Roles: a researcher or auditor reaches no admin or other owner's action through the dashboard.
- Mutual TLS: the certificate must name the token's subject (docs/security.md): the dashboard's sign-in and
  session must hold to it as the REST API does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
import sqlalchemy as sa
from dashboard_support import (
    Dashboard,
    add_user,
    csrf_of,
    dashboard_app,
    figure_of,
    rita_under_mtls,
    seed,
    sign_in,
)

from fedhealth.dashboard._session import LOGIN_CSRF_COOKIE, SESSION_COOKIE
from fedhealth.governance import AuditEventType, ModelProvenance, ProvenanceStore
from fedhealth.orchestrator._db import rounds, studies, tasks
from fedhealth.protocol import Role
from support import TestClient

XSS_IMG = "<img src=x onerror=alert(1)>"  # 28 characters: fits a software version (40)
XSS_SCRIPT = "</script><script>alert(2)</script>"
XSS_SVG = "<svg onload=alert(3)>"
# a JSON string that would break out of a <script> element, and the line separators that end a JS string
XSS_JSON = "</script><script>alert(4)</script>\u2028\u2029"
RAW = ("<img src=x onerror", "<script>alert", "<svg onload")


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[Dashboard]:
    with dashboard_app(tmp_path / "state") as d:
        yield d


def _as(dash: Dashboard, name: str, role: Role) -> str:
    key = add_user(dash.svc, name, role)
    assert sign_in(dash.client, name, key).status_code == 200
    return key


def _other_browser(dash: Dashboard) -> TestClient:
    """A second browser on the same orchestrator (its own cookie jar; the app's lifespan already runs)."""
    return TestClient(dash.client.app, base_url="https://testserver")


def _released(dash: Dashboard, study_id: str, n: int = 1) -> str:
    """A model version of ``study_id`` in the provenance tables (what the Models page and cards read)."""
    digest = f"{n:064x}"
    ProvenanceStore(dash.svc.store.engine).record(
        ModelProvenance(
            model_digest=digest,
            parent_digest=None,
            study_id=study_id,
            round=1,
            n_sites=2,
            dataset_fingerprints={"site-000": "f0", "site-001": "f1"},
            consent_snapshots={"site-000": "a" * 64, "site-001": "b" * 64},
            spec_hash="c" * 64,
            software_version="test",
            created_at=dash.svc.settings.clock.now() + timedelta(seconds=n),
        )
    )
    return digest


def _ui_actions(dash: Dashboard) -> list[dict]:
    return [e.payload for e in dash.svc.audit.entries() if e.type == AuditEventType.UI_ACTION]


def _csp(response) -> dict[str, list[str]]:
    policy = response.headers.get("content-security-policy", "")
    out: dict[str, list[str]] = {}
    for directive in filter(None, (d.strip() for d in policy.split(";"))):
        name, *values = directive.split()
        out[name] = values
    return out


class _Dom(HTMLParser):
    """Every element and attribute of a page, as a browser's tokenizer sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))


# elements a page of the dashboard never holds in its HTML (Plotly draws its SVG at run time)
_FOREIGN = {
    "img",
    "svg",
    "iframe",
    "frame",
    "object",
    "embed",
    "base",
    "meta-refresh",
    "math",
    "video",
    "audio",
}
_URL_ATTRS = {"href", "src", "action", "formaction", "xlink:href", "data"}


def _assert_no_script_in(html: str) -> None:
    dom = _Dom()
    dom.feed(html)
    for tag, attrs in dom.elements:
        if tag == "script":
            assert (
                attrs.get("src", "").startswith("/ui/static/")
                or attrs.get("src", "").startswith("/static/")
                or attrs.get("type") == "application/json"
            ), f"an inline script: {attrs}"
        assert tag not in _FOREIGN, f"a <{tag}> element in the page: {attrs}"
        handlers = [a for a in attrs if a.startswith("on")]
        assert not handlers, f"an event handler on <{tag}>: {handlers}"
        for name in _URL_ATTRS & attrs.keys():
            assert not attrs[name].strip().lower().startswith(("javascript:", "data:text", "vbscript:")), (
                attrs
            )
        if tag == "meta":
            assert "http-equiv" not in attrs, attrs


def _assert_hardened(response) -> None:
    assert response.headers["content-type"].startswith("text/html")
    csp = _csp(response)
    assert csp.get("script-src") == ["'self'"], csp  # no 'unsafe-inline', 'unsafe-eval', data: or host
    assert csp.get("frame-ancestors") == ["'none'"], csp
    assert csp.get("base-uri") == ["'none'"], csp
    assert csp.get("form-action") == ["'self'"], csp
    assert "'unsafe-inline'" not in csp.get("default-src", [])
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    _assert_no_script_in(response.text)


# --- headers ----------------------------------------------------------------------------------------------


def test_every_html_answer_forbids_inline_script_and_framing(dash):
    login = dash.client.get("/ui/login")
    _assert_hardened(login)
    refused = dash.client.post(
        "/ui/login", data={"user": "x", "api_key": "y", "csrf_token": csrf_of(login.text)}
    )
    assert refused.status_code == 401
    _assert_hardened(refused)
    _as(dash, "root", Role.ADMIN)
    [study] = seed(dash.svc, sites=2, studies=1, rounds=2)
    digest = _released(dash, study)
    for path in [
        "/ui/federation",
        "/ui/studies",
        f"/ui/studies/{study}",
        "/ui/privacy",
        "/ui/models",
        f"/ui/models/{digest}/card",
        "/ui/drift",
        "/ui/audit",
        "/ui/audit/verify",
    ]:
        page = dash.client.get(path)
        assert page.status_code == 200, path
        _assert_hardened(page)
    for path, status in [("/ui/studies/st_unknown", 404), ("/ui/sites/nowhere/onboarding.zip", 404)]:
        error = dash.client.get(path)
        assert error.status_code == status, path
        _assert_hardened(error)
    forbidden = dash.client.post("/ui/sites/site-000/revoke", data={})
    assert forbidden.status_code == 403
    _assert_hardened(forbidden)


# --- stored XSS -------------------------------------------------------------------------------------------


def _plant(dash: Dashboard) -> str:
    """Strings an attacker controls, in every place a page draws them; returns the study's id."""
    svc = dash.svc
    [study] = seed(svc, sites=2, studies=1, rounds=2)
    svc.store.set_versions("site-000", software_version=XSS_IMG, protocol_version=1)
    with svc.store.engine.begin() as c:
        # a malicious site's failure reason, a cancel reason, a round metric's name (aggregated results)
        c.execute(sa.update(tasks).where(tasks.c.status != "completed").values(reason=XSS_SCRIPT))
        c.execute(sa.update(studies).where(studies.c.id == study).values(reason=XSS_SVG))
        c.execute(
            sa.update(rounds)
            .where(rounds.c.study_id == study)
            .values(metrics_json=json.dumps({XSS_JSON: 0.5, "accuracy": 0.75}))
        )
    last = _released(dash, study)
    ProvenanceStore(svc.store.engine).record_metrics(last, "site-001", {XSS_JSON: 0.9})
    svc.audit.append(
        AuditEventType.DRIFT_CHECKED,
        {
            "study_id": study,
            "study": XSS_IMG,
            "dataset": XSS_SVG,
            "reference_study_id": study,
            "reference": XSS_SCRIPT,
            "level": "alert",
            "thresholds": {"warn": 0.1, "alert": 0.25},
            "findings": [{"site": XSS_IMG, "feature": XSS_SCRIPT, "psi": 0.9, "level": "alert"}],
        },
    )
    svc.audit.append(
        AuditEventType.BUDGET_SPENT,
        {
            "study_id": study,
            "site": XSS_JSON,
            "dataset": XSS_SVG,
            "total_epsilon": 0.5,
            "budget_epsilon": 1.0,
            "task_epsilon": 0.5,
        },
    )
    return study, last


def test_strings_from_sites_researchers_and_visitors_are_escaped_on_every_page(dash):
    # an unauthenticated visitor's refused sign-in puts its user name in the audit log
    login = dash.client.get("/ui/login")
    dash.client.post("/ui/login", data={"user": XSS_SVG, "api_key": "x", "csrf_token": csrf_of(login.text)})
    _as(dash, "root", Role.ADMIN)
    study, digest = _plant(dash)
    pages = {
        p: dash.client.get(p)
        for p in [
            "/ui/federation",
            "/ui/studies",
            f"/ui/studies/{study}",
            "/ui/privacy",
            "/ui/models",
            f"/ui/models/{digest}/card",
            "/ui/drift",
            "/ui/audit",
            f"/ui/audit?actor={XSS_SVG}&text={XSS_IMG}",
        ]
    }
    for path, page in pages.items():
        assert page.status_code == 200, path
        for raw in RAW:
            assert raw not in page.text, f"{raw!r} unescaped on {path}"
        _assert_hardened(page)
    # drawn, escaped, where they belong
    assert "&lt;img src=x onerror=alert(1)&gt;" in pages["/ui/federation"].text
    study_page = pages[f"/ui/studies/{study}"].text
    assert "&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in study_page  # the dropout reason
    assert "&lt;svg onload=alert(3)&gt;" in study_page  # the study's reason
    assert "&lt;svg onload=alert(3)&gt;" in pages["/ui/audit"].text
    assert "&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in pages["/ui/drift"].text
    # JSON in <script type="application/json">: the element cannot be closed from inside, the data is intact
    metrics = figure_of(study_page, "metrics-figure")
    assert XSS_JSON in {t["name"] for t in metrics["data"]}
    budget = figure_of(pages["/ui/privacy"].text, "budget-figure")
    assert any(t["name"].startswith(XSS_JSON) for t in budget["data"])
    validation = figure_of(pages["/ui/drift"].text, "validation-figure-1")
    assert validation["layout"]["yaxis"]["title"]["text"] == XSS_JSON
    for page in (study_page, pages["/ui/privacy"].text, pages["/ui/drift"].text):
        for block in re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', page, re.S):
            assert "<" not in block
            assert "\u2028" not in block
            assert "\u2029" not in block


def test_a_reflected_study_id_or_filter_is_escaped(dash):
    _as(dash, "root", Role.ADMIN)
    missing = dash.client.get("/ui/studies/%3Cimg%20src=x%20onerror=alert(1)%3E")
    assert missing.status_code == 404
    assert "<img src=x onerror" not in missing.text
    _assert_hardened(missing)
    audit = dash.client.get(
        '/ui/audit?actor="><script>alert(1)</script>&text="autofocus onfocus=alert(1) x="'
    )
    assert audit.status_code == 200
    assert "<script>alert(1)" not in audit.text
    assert 'value="&#34;&gt;&lt;script&gt;' in audit.text or 'value="&quot;&gt;&lt;script&gt;' in audit.text
    _assert_hardened(audit)


# --- CSRF, methods, origins -------------------------------------------------------------------------------


def test_a_csrf_token_of_another_session_of_the_same_user_is_refused(dash):
    key = _as(dash, "root", Role.ADMIN)
    seed(dash.svc, sites=2, studies=0, rounds=1)
    mine = csrf_of(dash.client.get("/ui/federation").text)
    other = _other_browser(dash)
    assert sign_in(other, "root", key).status_code == 200
    theirs = csrf_of(other.get("/ui/federation").text)
    assert theirs != mine
    refused = other.post("/ui/sites/site-000/revoke", data={"csrf_token": mine})
    assert refused.status_code == 403
    assert "CSRF" in refused.text
    assert dash.svc.store.get_site("site-000").status.value == "pending"


def test_a_csrf_token_of_a_signed_out_session_opens_nothing_in_the_next_one(dash):
    key = _as(dash, "root", Role.ADMIN)
    [study] = seed(dash.svc, sites=2, studies=1, rounds=1)
    with dash.svc.store.engine.begin() as c:
        c.execute(sa.update(studies).where(studies.c.id == study).values(status="running"))
    old = csrf_of(dash.client.get("/ui/federation").text)
    old_cookie = dash.client.cookies.get(SESSION_COOKIE)
    signed_out = dash.client.post("/ui/logout", data={"csrf_token": old}, follow_redirects=False)
    assert signed_out.status_code == 303
    # the old cookie and token together: sent to sign in, nothing done
    for path in ("/ui/sites/site-000/revoke", f"/ui/studies/{study}/cancel"):
        answer = _other_browser(dash).post(
            path,
            data={"csrf_token": old},
            headers={"Cookie": f"{SESSION_COOKIE}={old_cookie}"},
            follow_redirects=False,
        )
        assert answer.status_code == 303
        assert answer.headers["location"] == "/ui/login"
    # a new session of the same user with the old session's token
    assert sign_in(dash.client, "root", key).status_code == 200
    for path in ("/ui/sites/site-000/revoke", f"/ui/studies/{study}/cancel", "/ui/logout"):
        answer = dash.client.post(path, data={"csrf_token": old})
        assert answer.status_code == 403, path
    assert dash.svc.store.get_site("site-000").status.value == "pending"
    assert dash.svc.store.get_study(study).status.value == "running"
    assert dash.client.get("/ui/federation", follow_redirects=False).status_code == 200  # not signed out


def test_a_csrf_token_in_the_query_string_or_a_repeated_field_is_refused(dash):
    _as(dash, "root", Role.ADMIN)
    seed(dash.svc, sites=2, studies=0, rounds=1)
    token = csrf_of(dash.client.get("/ui/federation").text)
    in_query = dash.client.post(f"/ui/sites/site-000/revoke?csrf_token={token}", data={})
    assert in_query.status_code == 403
    first_forged = dash.client.post(
        "/ui/sites/site-000/revoke",
        content=f"csrf_token=forged&csrf_token={token}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert first_forged.status_code == 403
    assert dash.svc.store.get_site("site-000").status.value == "pending"


def test_no_get_head_or_options_changes_state_and_no_other_origin_is_granted_cors(dash):
    _as(dash, "root", Role.ADMIN)
    [study] = seed(dash.svc, sites=2, studies=1, rounds=1)
    with dash.svc.store.engine.begin() as c:
        c.execute(sa.update(studies).where(studies.c.id == study).values(status="running"))
    token = csrf_of(dash.client.get("/ui/federation").text)
    before = len(dash.svc.audit.entries())
    evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
        for path in (
            f"/ui/sites/site-000/revoke?csrf_token={token}",
            f"/ui/studies/{study}/cancel?csrf_token={token}",
            f"/ui/drift/reference?study_id={study}&csrf_token={token}",
            f"/ui/logout?csrf_token={token}",
        ):
            answer = dash.client.request(method, path, headers=evil, follow_redirects=False)
            assert answer.status_code == 405, (method, path, answer.status_code)
            assert "access-control-allow-origin" not in answer.headers
            assert "access-control-allow-credentials" not in answer.headers
    page = dash.client.get("/ui/federation", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in page.headers
    assert dash.svc.store.get_site("site-000").status.value == "pending"
    assert dash.svc.store.get_study(study).status.value == "running"
    assert len(dash.svc.audit.entries()) == before
    assert dash.client.get("/ui/federation", follow_redirects=False).status_code == 200  # still signed in


def test_a_cross_site_form_without_the_sign_in_cookie_cannot_sign_the_victim_in(dash):
    """Login CSRF (the victim signed in to the attacker's account): the attacker's page has a token of its own
    but cannot send the double-submit cookie of the victim's browser."""
    key = add_user(dash.svc, "mallory", Role.RESEARCHER)
    attacker = _other_browser(dash)
    token = csrf_of(attacker.get("/ui/login").text)
    victim = _other_browser(dash)
    victim.get("/ui/login")  # the victim's own sign-in cookie, another value
    forged = victim.post(
        "/ui/login",
        data={"user": "mallory", "api_key": key, "csrf_token": token},
        headers={"Origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert forged.status_code == 403
    assert SESSION_COOKIE not in victim.cookies
    no_cookie = TestClient(dash.client.app, base_url="https://testserver")
    forged = no_cookie.post("/ui/login", data={"user": "mallory", "api_key": key, "csrf_token": token})
    assert forged.status_code == 403
    assert SESSION_COOKIE not in no_cookie.cookies


def test_sign_in_has_no_open_redirect(dash):
    key = add_user(dash.svc, "root", Role.ADMIN)
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example", "javascript:alert(1)"):
        page = dash.client.get("/ui/login", params={"next": target})
        assert target not in page.text
        answer = dash.client.post(
            "/ui/login",
            params={"next": target},
            data={"user": "root", "api_key": key, "csrf_token": csrf_of(page.text), "next": target},
            follow_redirects=False,
        )
        assert answer.status_code == 303
        assert answer.headers["location"] == "/ui/federation"
    for path in ("/ui", "/ui/"):
        assert dash.client.get(path, follow_redirects=False).headers["location"] == "/ui/federation"


def test_static_assets_are_served_by_name_only(dash):
    for path in (
        "/ui/static/..%2f_routes.py",
        "/ui/static/%2e%2e%2f%2e%2e%2f__init__.py",
        "/ui/static/..%5c_session.py",
        "/ui/static/dashboard.js%00.html",
        "/ui/static/templates%2fbase.html",
        "/ui/static/DASHBOARD.JS",
    ):
        answer = dash.client.get(path)
        assert answer.status_code == 404, path
        assert b"import " not in answer.content
        assert b"{%" not in answer.content
    js = dash.client.get("/ui/static/dashboard.js")
    assert js.status_code == 200
    assert js.headers["content-type"].startswith("text/javascript")
    assert js.headers["x-content-type-options"] == "nosniff"


# --- sessions and cookies ---------------------------------------------------------------------------------


def _cookie_header(response, name: str) -> str:
    for value in response.headers.get_list("set-cookie"):
        if value.startswith(f"{name}="):
            return value
    raise AssertionError(f"no Set-Cookie for {name}")


def test_the_sign_in_and_sign_out_cookies_are_scoped_and_hardened(dash):
    key = add_user(dash.svc, "root", Role.ADMIN)
    page = dash.client.get("/ui/login")
    login_cookie = _cookie_header(page, LOGIN_CSRF_COOKIE)
    for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/ui"):
        assert flag in login_cookie
    assert "Domain=" not in login_cookie
    answer = dash.client.post(
        "/ui/login",
        data={"user": "root", "api_key": key, "csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    session = _cookie_header(answer, SESSION_COOKIE)
    for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/ui"):
        assert flag in session
    assert "Domain=" not in session
    ttl = int(dash.svc.settings.auth.operator_token_ttl.total_seconds())
    assert f"Max-Age={ttl}" in session
    # the token is the session, not a secret shown to script
    assert dash.client.cookies.get(SESSION_COOKIE) not in dash.client.get("/ui/federation").text
    token = csrf_of(dash.client.get("/ui/federation").text)
    out = dash.client.post("/ui/logout", data={"csrf_token": token}, follow_redirects=False)
    cleared = _cookie_header(out, SESSION_COOKIE)
    assert "Max-Age=0" in cleared
    assert "Path=/ui" in cleared  # the browser deletes the cookie it holds (same path)


def test_a_cookie_planted_before_sign_in_is_replaced_by_a_fresh_session(dash):
    """Session fixation: the attacker's own valid session planted in the victim's browser does not survive
    the victim's sign-in, and the victim's session is not the attacker's."""
    mallory = add_user(dash.svc, "mallory", Role.RESEARCHER)
    attacker = _other_browser(dash)
    assert sign_in(attacker, "mallory", mallory).status_code == 200
    planted = attacker.cookies.get(SESSION_COOKIE)
    victim_key = add_user(dash.svc, "victim", Role.ADMIN)
    victim = _other_browser(dash)
    page = victim.get("/ui/login")
    jar = f"{SESSION_COOKIE}={planted}; {LOGIN_CSRF_COOKIE}={victim.cookies.get(LOGIN_CSRF_COOKIE)}"
    answer = victim.post(
        "/ui/login",
        data={"user": "victim", "api_key": victim_key, "csrf_token": csrf_of(page.text)},
        headers={"Cookie": jar},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    fresh = _cookie_header(answer, SESSION_COOKIE).split(";")[0].split("=", 1)[1]
    assert fresh != planted
    # the attacker's session still names the attacker, not the victim
    assert "mallory (researcher)" in attacker.get("/ui/federation").text


def test_a_forged_or_altered_session_cookie_opens_nothing(dash):
    _as(dash, "root", Role.ADMIN)
    real = dash.client.cookies.get(SESSION_COOKIE)
    header, payload, _signature = real.split(".") if real.count(".") == 2 else (real, "", "")
    forged = [
        "",
        "x",
        real + "x",
        real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB"),
        f"{header}.{payload}.",
    ]
    for cookie in forged:
        answer = _other_browser(dash).get(
            "/ui/federation", headers={"Cookie": f"{SESSION_COOKIE}={cookie}"}, follow_redirects=False
        )
        assert answer.status_code == 303, cookie
        assert answer.headers["location"] == "/ui/login"


def test_the_session_cookie_alone_does_not_authenticate_the_rest_api(dash):
    """The cookie is scoped to /ui, and the REST API takes bearer tokens only: a cross-site request that
    carries cookies reaches no operator route."""
    _as(dash, "root", Role.ADMIN)
    seed(dash.svc, sites=2, studies=0, rounds=1)
    cookie = dash.client.cookies.get(SESSION_COOKIE)
    api = _other_browser(dash)
    headers = {"Cookie": f"{SESSION_COOKIE}={cookie}"}
    assert api.get("/api/v1/sites", headers=headers).status_code == 401
    assert api.post("/api/v1/sites/site-000/revoke", headers=headers).status_code in (401, 404, 405)
    assert dash.svc.store.get_site("site-000").status.value == "pending"


# --- roles ------------------------------------------------------------------------------------------------


def test_a_researcher_reaches_no_admin_action_and_each_refusal_is_audited(dash):
    [own] = seed(dash.svc, sites=2, studies=1, rounds=1, owner="rita")
    [other] = seed(dash.svc, sites=2, studies=1, rounds=1, owner="admin")
    with dash.svc.store.engine.begin() as c:
        c.execute(sa.update(studies).values(status="running"))
    _as(dash, "rita", Role.RESEARCHER)
    page = dash.client.get("/ui/federation").text
    assert "/revoke" not in page
    assert "onboarding.zip" not in page
    assert 'action="/ui/drift/reference"' not in dash.client.get("/ui/drift").text
    token = csrf_of(page)
    attempts = [
        ("post", "/ui/sites/site-000/revoke", {"csrf_token": token}, "revoke site refused"),
        ("post", "/ui/drift/reference", {"csrf_token": token, "study_id": own}, "drift reference refused"),
        ("post", f"/ui/studies/{other}/cancel", {"csrf_token": token}, "cancel study refused"),
        ("get", "/ui/sites/site-000/onboarding.zip", None, "onboarding kit refused"),
    ]
    for method, path, data, action in attempts:
        answer = dash.client.request(method.upper(), path, data=data)
        assert answer.status_code == 403, path
        assert answer.headers["content-type"].startswith("text/html")
        assert _ui_actions(dash)[-1]["action"] == action
        assert _ui_actions(dash)[-1]["by"] == "rita"
    assert dash.svc.store.get_site("site-000").status.value == "pending"
    assert dash.svc.store.get_study(other).status.value == "running"
    kinds = {e.type for e in dash.svc.audit.entries()}
    assert AuditEventType.SITE_REVOKED not in kinds
    assert AuditEventType.DRIFT_REFERENCE not in kinds
    # a model card of another owner's study by its digest
    digest = _released(dash, other)
    assert dash.client.get(f"/ui/models/{digest}/card").status_code == 403
    # the own study: its page and its cancel button
    assert 'action="/ui/studies/' in dash.client.get(f"/ui/studies/{own}").text


def test_an_auditor_cancels_nothing_not_even_through_a_hand_made_form(dash):
    [study] = seed(dash.svc, sites=2, studies=1, rounds=1, owner="ann")
    with dash.svc.store.engine.begin() as c:
        c.execute(sa.update(studies).values(status="running"))
    _as(dash, "ann", Role.AUDITOR)  # an auditor named as the spec's owner still is an auditor
    page = dash.client.get(f"/ui/studies/{study}").text
    assert "/cancel" not in page
    answer = dash.client.post(f"/ui/studies/{study}/cancel", data={"csrf_token": csrf_of(page)})
    assert answer.status_code == 403
    assert dash.svc.store.get_study(study).status.value == "running"
    assert _ui_actions(dash)[-1]["action"] == "cancel study refused"


def test_a_forged_request_refused_for_its_csrf_token_is_an_audit_entry(dash):
    _as(dash, "root", Role.ADMIN)
    seed(dash.svc, sites=2, studies=0, rounds=1)
    before = len(_ui_actions(dash))
    forged = dash.client.post(
        "/ui/sites/site-000/revoke", data={}, headers={"Origin": "https://evil.example"}
    )
    assert forged.status_code == 403
    assert dash.svc.store.get_site("site-000").status.value == "pending"
    after = _ui_actions(dash)[before:]
    assert any("refused" in a["action"] and a.get("site") == "site-000" for a in after), after


def test_an_api_key_typed_in_the_user_field_is_not_written_to_the_audit_log(dash):
    admin_key = add_user(dash.svc, "root", Role.ADMIN)
    page = dash.client.get("/ui/login")
    # the fields swapped (a password manager's misfill, or a hurried paste): the key lands in "user"
    refused = dash.client.post(
        "/ui/login", data={"user": admin_key, "api_key": "root", "csrf_token": csrf_of(page.text)}
    )
    assert refused.status_code == 401
    assert admin_key not in refused.text
    auditor = _other_browser(dash)
    assert sign_in(auditor, "ann", add_user(dash.svc, "ann", Role.AUDITOR)).status_code == 200
    assert admin_key not in auditor.get("/ui/audit").text
    assert not any(admin_key in json.dumps(e.payload) + (e.actor or "") for e in dash.svc.audit.entries())


def test_a_refused_sign_in_says_the_same_for_an_unknown_user_and_a_wrong_key(dash):
    add_user(dash.svc, "root", Role.ADMIN)
    answers = []
    for user in ("root", "nobody"):
        page = dash.client.get("/ui/login")
        answer = dash.client.post(
            "/ui/login", data={"user": user, "api_key": "fhk_wrong", "csrf_token": csrf_of(page.text)}
        )
        assert answer.status_code == 401
        answers.append(re.search(r'<p class="error" role="alert">(.*?)</p>', answer.text).group(1))
    assert answers[0] == answers[1]


# --- mutual TLS ---------------------------------------------------------------------------------------------


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient, Dashboard]]:
    """An orchestrator whose every request arrives with the client certificate of the researcher ``rita``
    (as ``_serve`` adds it under ``--mtls``), and a plain client of the same app for set-up."""
    with rita_under_mtls(tmp_path, seeded=True) as clients:
        yield clients


def test_under_mtls_the_rest_api_refuses_another_principals_key_or_token(mtls):
    as_rita, _, dash = mtls
    admin_key = add_user(dash.svc, "root", Role.ADMIN)
    refused = as_rita.post("/api/v1/auth/token", json={"user": "root", "api_key": admin_key})
    assert refused.status_code == 403
    token, _ = dash.svc.auth.operator_token(user="root", api_key=admin_key)
    refused = as_rita.get("/api/v1/sites", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 403


def test_under_mtls_the_dashboard_sign_in_refuses_another_principals_api_key(mtls):
    as_rita, _, dash = mtls
    admin_key = add_user(dash.svc, "root", Role.ADMIN)
    answer = sign_in(as_rita, "root", admin_key)
    assert answer.status_code == 403
    assert SESSION_COOKIE not in as_rita.cookies


def test_under_mtls_the_dashboard_refuses_a_session_of_another_principal(mtls):
    as_rita, plain, dash = mtls
    admin_key = add_user(dash.svc, "root", Role.ADMIN)
    assert sign_in(plain, "root", admin_key).status_code == 200  # the admin's own browser
    stolen = plain.cookies.get(SESSION_COOKIE)
    token = csrf_of(plain.get("/ui/federation").text)
    headers = {"Cookie": f"{SESSION_COOKIE}={stolen}"}
    page = as_rita.get("/ui/federation", headers=headers, follow_redirects=False)
    revoke = as_rita.post("/ui/sites/site-000/revoke", data={"csrf_token": token}, headers=headers)
    assert dash.svc.store.get_site("site-000").status.value == "pending"
    assert page.status_code in (303, 403)
    assert revoke.status_code in (303, 403)
