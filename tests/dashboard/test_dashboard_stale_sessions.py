"""Stale or stolen dashboard sessions, in process (docs/dashboard.md, "Signing in, roles, CSRF" and "The site
dashboard"): what tests/dashboard/test_dashboard_views.py and test_dashboard_site_pages.py do not try.

The orchestrator's dashboard: its session cookie is the operator token, re-authenticated on every request,
so a revoked user, a replaced API key or a changed role takes effect at the next click, an expired session
signs in again and a signed-out one opens nothing, from a copy of its cookie either; a CSRF token is bound
to its session (another user's is refused). Its Prometheus listener binds 127.0.0.1 unless told otherwise.

The site dashboard: the sign-in link opens one session only, and a session cookie or CSRF token of an
earlier dashboard process opens nothing in the next one.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from dashboard_support import add_user, csrf_of, seed, sign_in

from fedhealth.agent import SiteGovernance, SiteHome
from fedhealth.cli._services import orchestrator_serve
from fedhealth.core import ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.dashboard import DashboardExtension, MetricsExtension, site_dashboard_app
from fedhealth.dashboard._session import SESSION_COOKIE
from fedhealth.orchestrator import OrchestratorSettings, Services, create_app, default_extensions
from fedhealth.orchestrator._db import users
from fedhealth.protocol import Role
from support import TestClient

LOCAL = "http://127.0.0.1:8765"  # the site dashboard answers only a loopback Host with its own port

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@dataclass
class Dash:
    client: TestClient
    svc: Services
    clock: ManualClock


@pytest.fixture
def dash(tmp_path) -> Iterator[Dash]:
    clock = ManualClock(T0)
    settings = OrchestratorSettings(
        state_dir=tmp_path / "state", signing_key=IdentityKey.generate(), rate_per_s=0, clock=clock
    )
    app = create_app(settings, extensions=[*default_extensions(), DashboardExtension()])
    with TestClient(app, base_url="https://testserver") as client:
        yield Dash(client=client, svc=app.state.services, clock=clock)


def _signed_in(dash: Dash, name: str, role: Role) -> str:
    key = add_user(dash.svc, name, role)
    assert sign_in(dash.client, name, key).status_code == 200
    return key


def _sent_to_sign_in(dash: Dash, path: str = "/ui/federation", cookie: str | None = None) -> bool:
    """Whether a request (with the client's cookies, or with ``cookie`` alone as the session: a Cookie header
    of its own wins over the client's jar) is sent to sign in."""
    headers = {"Cookie": f"{SESSION_COOKIE}={cookie}"} if cookie is not None else None
    response = dash.client.get(path, headers=headers, follow_redirects=False)
    return response.status_code == 303 and response.headers["location"] == "/ui/login"


def test_a_revoked_users_session_is_refused_at_the_next_click(dash):
    seed(dash.svc, sites=1, studies=0, rounds=1)
    _signed_in(dash, "root", Role.ADMIN)
    page = dash.client.get("/ui/federation")
    assert page.status_code == 200
    assert dash.svc.store.revoke_user("root", T0)
    assert _sent_to_sign_in(dash)
    # and its open form does nothing: the session is gone before the CSRF token is even looked at
    response = dash.client.post(
        "/ui/sites/site-000/revoke", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False
    )
    assert response.status_code == 303
    assert dash.svc.store.get_site("site-000").status.value == "pending"


def test_a_session_opened_with_a_since_replaced_api_key_is_refused_at_the_next_click(dash):
    old = _signed_in(dash, "rita", Role.RESEARCHER)
    assert dash.client.get("/ui/studies").status_code == 200
    stolen = dash.client.cookies.get(SESSION_COOKIE)
    assert stolen
    assert not _sent_to_sign_in(dash, "/ui/studies", cookie=stolen)  # the copy works, for now
    new = dash.svc.auth.new_api_key("rita")  # `fedhealth user new-key rita`: the old key leaked
    assert _sent_to_sign_in(dash, "/ui/studies")
    dash.client.cookies.clear()
    assert sign_in(dash.client, "rita", old).status_code == 401  # the leaked key no longer signs in
    assert sign_in(dash.client, "rita", new).status_code == 200
    assert dash.client.get("/ui/studies").status_code == 200
    assert _sent_to_sign_in(dash, "/ui/studies", cookie=stolen)  # the thief's copy


def test_a_role_taken_away_counts_at_the_next_click(dash):
    seed(dash.svc, sites=1, studies=0, rounds=1)
    _signed_in(dash, "ann", Role.ADMIN)
    page = dash.client.get("/ui/federation").text
    assert "/revoke" in page
    with dash.svc.store.engine.begin() as c:  # demoted to a reader
        c.execute(sa.update(users).where(users.c.name == "ann").values(role=Role.AUDITOR.value))
    assert "/revoke" not in dash.client.get("/ui/federation").text
    refused = dash.client.post("/ui/sites/site-000/revoke", data={"csrf_token": csrf_of(page)})
    assert refused.status_code == 403
    assert dash.svc.store.get_site("site-000").status.value == "pending"


def test_a_session_expires_with_its_operator_token(dash):
    _signed_in(dash, "audrey", Role.AUDITOR)
    dash.clock.advance(14 * 60)
    assert dash.client.get("/ui/federation").status_code == 200
    dash.clock.advance(70)  # 15 minutes and 10 seconds after sign-in (beyond the 5 s leeway)
    assert _sent_to_sign_in(dash)


def test_a_csrf_token_of_another_users_session_is_refused(dash):
    seed(dash.svc, sites=1, studies=0, rounds=1)
    _signed_in(dash, "reader", Role.AUDITOR)
    foreign = csrf_of(dash.client.get("/ui/federation").text)  # the logout form's token of the reader
    dash.client.cookies.clear()
    _signed_in(dash, "root", Role.ADMIN)
    refused = dash.client.post("/ui/sites/site-000/revoke", data={"csrf_token": foreign})
    assert refused.status_code == 403
    assert "CSRF" in refused.text
    assert dash.svc.store.get_site("site-000").status.value == "pending"


def test_a_session_cookie_copied_before_sign_out_opens_nothing_after_it(dash):
    _signed_in(dash, "root", Role.ADMIN)
    page = dash.client.get("/ui/federation").text
    copied = dash.client.cookies.get(SESSION_COOKIE)
    assert copied
    out = dash.client.post("/ui/logout", data={"csrf_token": csrf_of(page)}, follow_redirects=False)
    assert out.status_code == 303
    assert _sent_to_sign_in(dash)  # the browser's cookie is gone
    assert _sent_to_sign_in(dash, cookie=copied)
    # the token in the cookie is an operator token: signed out for the REST API too
    dash.client.cookies.clear()
    api = dash.client.get("/api/v1/studies", headers={"Authorization": f"Bearer {copied}"})
    assert api.status_code == 401
    assert "signed out" in api.text


def test_the_prometheus_listener_binds_the_loopback_interface_unless_told_otherwise(tmp_path):
    assert inspect.signature(orchestrator_serve).parameters["metrics_host"].default == "127.0.0.1"
    metrics = MetricsExtension(0)
    settings = OrchestratorSettings(state_dir=tmp_path / "state", signing_key=IdentityKey.generate())
    app = create_app(settings, extensions=[*default_extensions(), metrics])
    with TestClient(app, base_url="https://testserver"):
        assert metrics._server is not None
        try:
            assert metrics._server.server_address[0] == "127.0.0.1"
        finally:
            metrics._server.shutdown()
            metrics._server.server_close()


# --- the site dashboard ------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> SiteHome:
    home = SiteHome(tmp_path / "site")
    home.root.mkdir(mode=0o700)
    IdentityKey.generate().save(home.identity_path)
    home.settings_path.write_text(json.dumps({"site": "solo", "orchestrator": "https://127.0.0.1:1"}))
    return home


def test_the_site_dashboards_sign_in_link_opens_one_session_only(home):
    app = site_dashboard_app(home, token="the-link", steward="dana")
    with TestClient(app, base_url=LOCAL) as steward, TestClient(app, base_url=LOCAL) as intruder:
        assert steward.get("/login?token=the-link", follow_redirects=False).status_code == 303
        assert steward.get("/overview").status_code == 200
        # the same link again, from the terminal's scrollback or a shell history, opens nothing
        replay = intruder.get("/login?token=the-link", follow_redirects=False)
        assert replay.status_code == 401
        assert "already used" in replay.text
        assert intruder.get("/overview").status_code == 401
        assert steward.get("/login?token=the-link", follow_redirects=False).status_code == 401
        assert steward.get("/overview").status_code == 200  # the session it opened stays


def test_a_site_dashboard_session_or_csrf_token_of_an_earlier_process_opens_nothing(home):
    with SiteGovernance(home) as governance:
        governance.consent().withdraw("patient-0", "research")  # so the overview has a form to post
    first = site_dashboard_app(home, token="first", steward="dana")
    with TestClient(first, base_url=LOCAL) as client:
        client.get("/login?token=first", follow_redirects=False)
        old_cookie = dict(client.cookies)
        old_csrf = csrf_of(client.get("/overview").text)
    second = site_dashboard_app(home, token="second", steward="dana")  # the dashboard restarted
    with TestClient(second, base_url=LOCAL, cookies=old_cookie) as stale:
        assert stale.get("/overview").status_code == 401
        refused = stale.post("/overview/withdrawals", data={"csrf_token": old_csrf}, follow_redirects=False)
        assert refused.status_code == 401
    with TestClient(second, base_url=LOCAL) as client:
        client.get("/login?token=second", follow_redirects=False)
        assert client.get("/overview").status_code == 200
        refused = client.post("/overview/withdrawals", data={"csrf_token": old_csrf}, follow_redirects=False)
        assert refused.status_code == 403  # refused before the orchestrator is contacted
        assert "CSRF" in refused.text
