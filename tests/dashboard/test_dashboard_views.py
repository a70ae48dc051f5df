"""The dashboard in process (the orchestrator's app with the dashboard extension, seeded through its store):
every page renders its data for a signed-in operator, reads with a bounded number of SQL statements however
many sites, studies and rounds there are, and the session, CSRF and role rules hold."""

from __future__ import annotations

import re

import pytest
from dashboard_support import Dashboard, add_user, csrf_of, dashboard_app, figure_of, seed, sign_in
from sqlalchemy import event

from fedhealth.governance import AuditEventType
from fedhealth.protocol import Role

PAGES = ["/ui/federation", "/ui/studies", "/ui/privacy", "/ui/models", "/ui/audit", "/ui/audit/verify"]


@pytest.fixture
def dash(tmp_path):
    with dashboard_app(tmp_path / "state") as d:
        yield d


def _admin(dash: Dashboard) -> None:
    key = add_user(dash.svc, "root", Role.ADMIN)
    assert sign_in(dash.client, "root", key).status_code == 200


def _statements(dash: Dashboard, path: str) -> int:
    count = 0

    def counter(*_: object) -> None:
        nonlocal count
        count += 1

    engine = dash.svc.store.engine
    dash.client.get(path)  # warm: what a process reads once (and caches) is not a page's cost
    event.listen(engine, "before_cursor_execute", counter)
    try:
        response = dash.client.get(path)
    finally:
        event.remove(engine, "before_cursor_execute", counter)
    assert response.status_code == 200, response.text
    return count


def test_each_page_reads_a_bounded_number_of_statements_however_large_the_federation(dash):
    _admin(dash)
    first = seed(dash.svc, sites=3, studies=2, rounds=3)
    small = {p: _statements(dash, p) for p in [*PAGES, f"/ui/studies/{first[0]}"]}
    more = seed(dash.svc, sites=8, studies=6, rounds=6)
    large = {p: _statements(dash, p) for p in [*PAGES, f"/ui/studies/{first[0]}"]}
    large_study = _statements(dash, f"/ui/studies/{more[-1]}")
    assert large == small  # no query per site, study, round or entry
    assert large_study == small[f"/ui/studies/{first[0]}"]
    assert max(large.values()) <= 16


def test_the_pages_show_sites_studies_metrics_budgets_and_audit_entries(dash):
    _admin(dash)
    [study_id] = seed(dash.svc, sites=3, studies=1, rounds=3)
    federation = dash.client.get("/ui/federation").text
    assert "site-000" in federation
    assert "3 pending" in federation
    studies = dash.client.get("/ui/studies").text
    assert study_id in studies
    assert "3/3" in studies
    page = dash.client.get(f"/ui/studies/{study_id}").text
    metrics = figure_of(page, "metrics-figure")
    loss = next(t for t in metrics["data"] if t["name"] == "train_loss")
    assert loss["x"] == [1, 2, 3]
    assert loss["y"] == pytest.approx([1.0, 0.5, 1 / 3])
    participation = figure_of(page, "participation-figure")
    dropped = next(t for t in participation["data"] if t["name"] == "dropped or refused")
    assert dropped["y"] == [1, 0, 0]  # site-002 timed out in round 1
    assert "no result by the deadline" in page
    privacy = dash.client.get("/ui/privacy").text
    spent = figure_of(privacy, "budget-figure")["data"][0]
    assert spent["y"] == pytest.approx([0.1, 0.2, 0.3])
    audit = dash.client.get("/ui/audit", params={"type": "budget.spent"}).text
    assert audit.count('data-type="budget.spent"') == 3
    assert 'data-type="ui.action"' not in audit
    verify = dash.client.get("/ui/audit/verify").text
    assert 'class="ok"' in verify
    assert "Verified" in verify


def test_pages_need_a_session_and_sign_in_is_an_audit_entry(dash):
    assert dash.client.get("/ui/studies", follow_redirects=False).headers["location"] == "/ui/login"
    key = add_user(dash.svc, "alice", Role.AUDITOR)
    refused = sign_in(dash.client, "alice", "fhk_wrong")
    assert refused.status_code == 401
    assert "wrong API key" in refused.text
    response = sign_in(dash.client, "alice", key)
    assert response.status_code == 200
    assert "alice (auditor)" in response.text
    cookie = response.history[0].headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "Secure" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/ui" in cookie
    actions = [e.payload for e in dash.svc.audit.entries() if e.type == AuditEventType.UI_ACTION]
    assert [(a["action"], a["by"]) for a in actions] == [("sign-in refused", "alice"), ("sign-in", "alice")]


def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(dash):
    _admin(dash)
    seed(dash.svc, sites=2, studies=0, rounds=1)
    for data in ({}, {"csrf_token": "forged"}):
        response = dash.client.post("/ui/sites/site-000/revoke", data=data)
        assert response.status_code == 403
        assert "CSRF" in response.text
    assert dash.svc.store.get_site("site-000").status.value == "pending"
    # the sign-in form too: a token that is not the one of the browser's cookie
    dash.client.cookies.clear()
    response = dash.client.post("/ui/login", data={"user": "root", "api_key": "x", "csrf_token": "guess"})
    assert response.status_code == 403


def test_an_admin_revokes_a_site_from_the_page_with_an_audit_entry(dash):
    _admin(dash)
    seed(dash.svc, sites=2, studies=0, rounds=1)
    page = dash.client.get("/ui/federation").text
    assert 'aria-label="Revoke site site-001"' in page
    response = dash.client.post("/ui/sites/site-001/revoke", data={"csrf_token": csrf_of(page)})
    assert response.status_code == 200
    assert dash.svc.store.get_site("site-001").status.value == "revoked"
    entries = dash.svc.audit.entries()
    assert any(e.type == AuditEventType.SITE_REVOKED and e.payload["site"] == "site-001" for e in entries)
    assert any(e.type == AuditEventType.UI_ACTION and e.payload["action"] == "revoke site" for e in entries)


def test_a_reader_sees_no_admin_button_and_gets_403_for_the_admin_action(dash):
    seed(dash.svc, sites=2, studies=0, rounds=1)
    key = add_user(dash.svc, "reader", Role.AUDITOR)
    sign_in(dash.client, "reader", key)
    page = dash.client.get("/ui/federation").text
    assert "site-000" in page
    assert "/revoke" not in page
    assert '<button class="danger"' not in page
    response = dash.client.post("/ui/sites/site-000/revoke", data={"csrf_token": csrf_of(page)})
    assert response.status_code == 403
    assert "needs admin" in response.text
    assert dash.svc.store.get_site("site-000").status.value == "pending"
    refused = [e.payload for e in dash.svc.audit.entries() if e.type == AuditEventType.UI_ACTION]
    assert refused[-1]["action"] == "revoke site refused"


def test_a_researcher_sees_the_details_of_own_studies_only(dash):
    [own] = seed(dash.svc, sites=2, studies=1, rounds=1, owner="rita")
    [other] = seed(dash.svc, sites=2, studies=1, rounds=1, owner="admin")
    key = add_user(dash.svc, "rita", Role.RESEARCHER)
    sign_in(dash.client, "rita", key)
    listing = dash.client.get("/ui/studies").text
    assert f'href="/ui/studies/{own}"' in listing
    assert f'href="/ui/studies/{other}"' not in listing
    assert dash.client.get(f"/ui/studies/{own}").status_code == 200
    assert dash.client.get(f"/ui/studies/{other}").status_code == 403


def test_an_unknown_study_is_a_404_page_and_assets_come_from_installed_packages(dash):
    _admin(dash)
    assert dash.client.get("/ui/studies/st_nope").status_code == 404
    htmx = dash.client.get("/ui/static/htmx.min.js")
    assert htmx.status_code == 200
    assert b"htmx" in htmx.content[:2000]
    plotly = dash.client.get("/ui/static/plotly.min.js")
    assert plotly.status_code == 200
    assert len(plotly.content) > 1_000_000
    assert dash.client.get("/ui/static/../../etc/passwd").status_code == 404
    page = dash.client.get("/ui/federation")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert not re.search(r"<script(?![^>]*(src=|application/json))", page.text)  # no inline script


def test_the_dashboard_benchmark_seeds_a_federation_and_times_every_page():
    from fedhealth.dashboard import benchmark_dashboard

    result = benchmark_dashboard(sites=4, studies=2, rounds=6, sites_per_study=3, repeats=1)
    assert (result.sites, result.studies, result.rounds, result.tasks) == (4, 2, 6, 18)
    assert result.audit_entries == 6
    pages = [p.page for p in result.pages]
    for page in [
        "/ui/federation",
        "/ui/studies",
        "/ui/privacy",
        "/ui/models",
        "/ui/audit",
        "/ui/audit/verify",
    ]:
        assert page in pages
    assert any(p.startswith("/ui/studies/st_") for p in pages)
    assert all(p.bytes > 0 and p.requests == 1 for p in result.pages)


def test_the_budget_chart_draws_at_most_its_point_limit_and_always_the_latest(dash):
    from fedhealth.dashboard._views import CHART_POINTS

    _admin(dash)
    n_entries = 3 * CHART_POINTS + 1

    def attest(n: int) -> None:
        dash.svc.audit.append(
            AuditEventType.BUDGET_SPENT,
            {"task_id": f"t{n}", "study_id": "st_x", "site": "site-a", "dataset": "d", "round": n,
             "total_epsilon": n / 10_000, "budget_epsilon": 5.0, "task_epsilon": 0.0001},
        )  # fmt: skip

    with dash.svc.audit.batch():
        for n in range(1, n_entries + 1):
            attest(n)
    page = dash.client.get("/ui/privacy").text
    spent = next(t for t in figure_of(page, "budget-figure")["data"] if t["name"].endswith("spent"))
    assert len(spent["y"]) == CHART_POINTS
    assert spent["y"][0] == pytest.approx(0.0001)
    assert spent["y"][-1] == pytest.approx(n_entries / 10_000)
    assert f"<td>{n_entries / 10_000:.4f}</td>" in page  # the table: the latest total
    assert f"<td>{n_entries}</td>" in page  # every charge counted, drawn or not
    attest(n_entries + 1)  # a new attestation shows at the next view (parsed entries are kept, new ones read)
    page = dash.client.get("/ui/privacy").text
    assert f"<td>{(n_entries + 1) / 10_000:.4f}</td>" in page
    assert f"<td>{n_entries + 1}</td>" in page


def test_a_missing_asset_package_or_file_is_one_clear_error():
    from fedhealth.dashboard import MissingAsset
    from fedhealth.dashboard._assets import _package_file

    with pytest.raises(MissingAsset, match=r"pip install 'fedhealth\[dashboard\]'"):
        _package_file("no_such_asset_package", "x.js")
    with pytest.raises(MissingAsset, match=r"static/nothing\.js is missing"):
        _package_file("fedhealth.dashboard", "static", "nothing.js")
