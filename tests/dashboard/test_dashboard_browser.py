"""The dashboard in Debian's chromium (driven by Playwright) against a real orchestrator and real agents that
just ran a study with differential privacy: each page renders its data and its charts draw and passes an
axe-core check (no serious or critical violation), a reader sees no admin action and is refused one (403), a
form without its CSRF token is refused.

The browser is /usr/bin/chromium (``.ci/run`` installs it); a missing browser fails these tests. With
``FEDHEALTH_DASHBOARD_SCREENSHOTS=1`` the screenshots of docs/dashboard.md are written to docs/dashboard/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashboard_support import assert_accessible, copy_screenshots
from playwright.sync_api import Browser, Page, sync_playwright

from fedhealth.protocol import OperatorCredential, PrivacySpec, StudyStatus
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, breast_spec, logreg_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SITES = ["hospital-a", "hospital-b", "hospital-c"]
DATASET = "bc-dash"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "dashboard"


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Iterator[tuple[LocalFederation, str, str]]:
    """A federation of three sites that ran one DP-SGD study; yields it, the study id and a reader's key."""
    with LocalFederation(tmp_path_factory.mktemp("dashboard")) as fed:
        fed.start_orchestrator()
        for site in SITES:
            fed.add_site(site)
            fed.set_budget(site, DATASET, 10.0, 1e-5)
            fed.start_agent(site, {DATASET: BREAST_SITES[site]})
        fed.wait_for_sites(SITES)
        spec = breast_spec(
            SITES,
            rounds=3,
            name="dashboard-dp",
            dataset=DATASET,
            recipe=logreg_recipe(30, learning_rate=0.5),
            privacy=PrivacySpec(
                delta=1e-5, target_epsilon=1.0, max_grad_norm=1.0, sample_rate=0.1, steps_per_round=5
            ),
        )
        study = fed.create_study(spec)
        final = fed.wait_for_study(study.study_id, timeout=300)
        assert final.status is StudyStatus.COMPLETED, final.reason
        reader = fed.operator.add_user("reader", "auditor").api_key
        yield fed, study.study_id, reader


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "the browser tests need Debian's chromium: apt-get install chromium"
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield launched
        launched.close()


def _page(browser: Browser, url: str) -> Page:
    # bypass_csp: the accessibility check injects axe-core inline; the pages themselves forbid inline script
    context = browser.new_context(
        base_url=url, ignore_https_errors=True, viewport={"width": 1100, "height": 800}, bypass_csp=True
    )
    return context.new_page()


def _sign_in(page: Page, user: str, api_key: str) -> None:
    page.goto("/ui/login")
    assert_accessible(page)
    page.fill("#user", user)
    page.fill("#api_key", api_key)
    page.click("button[type=submit]")
    page.wait_for_selector("#whoami")


def _admin(fed: LocalFederation) -> OperatorCredential:
    return OperatorCredential.model_validate_json(fed.home.admin_credential.read_text())


def _shot(page: Page, name: str, shots: Path) -> None:
    """A screenshot of the page, after axe-core found no serious or critical accessibility violation."""
    assert_accessible(page)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=False)


def test_each_page_renders_its_data_and_its_charts_draw(fed, browser, tmp_path):
    federation, study_id, _ = fed
    errors: list[str] = []
    page = _page(browser, federation.url)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    admin = _admin(federation)
    _sign_in(page, admin.user, admin.api_key)
    assert page.text_content("#whoami") == f"{admin.user} (admin)"

    page.goto("/ui/federation")
    assert page.text_content("#site-counts").startswith("3 active")
    for site in SITES:
        row = page.locator(f"tr[data-site='{site}']")
        assert "active" in row.inner_text()
        assert row.locator("button.danger").count() == 1  # the admin's revoke action
    _shot(page, "federation", tmp_path)

    page.goto("/ui/studies")
    row = page.locator(f"tr[data-study='{study_id}']")
    assert "completed" in row.inner_text()
    assert "3/3" in row.inner_text()
    _shot(page, "studies", tmp_path)

    row.locator("a").click()
    page.wait_for_selector("#metrics-chart .main-svg")
    page.wait_for_selector("#participation-chart .main-svg")
    assert "completed" in page.text_content("#study-status")
    assert "Every named site approved" in page.text_content("#approvals-outstanding")
    assert "target_epsilon" in page.text_content("#dp-settings")
    assert page.locator("#dp-sites tbody tr").count() == len(SITES)
    assert page.locator("#evaluation tbody tr").count() == len(SITES) + 1  # each site and the mean
    _shot(page, "study", tmp_path)

    page.goto("/ui/privacy")
    page.wait_for_selector("#budget-chart .main-svg")
    rows = page.locator("#budgets tbody tr")
    assert rows.count() == len(SITES)
    assert DATASET in rows.first.inner_text()
    _shot(page, "privacy", tmp_path)

    page.goto("/ui/models")
    models = page.locator("#models tbody tr[data-model]")
    assert models.count() == 4  # the initial model and one version per training round
    assert "no withdrawal" in models.first.inner_text()
    models.first.locator("a").click()
    assert "Model card" in page.text_content("h1")
    assert study_id in page.text_content("#model-card")
    assert_accessible(page)
    page.go_back()
    _shot(page, "models", tmp_path)

    page.goto("/ui/audit")
    page.wait_for_selector("#verify-result")
    assert page.text_content("#verify-result").startswith("Verified")
    assert page.locator("#anchors tbody tr").count() == len(SITES)
    page.select_option("#type", "budget.spent")
    page.click("#audit-filters button")
    page.wait_for_url("**/ui/audit?type=budget.spent**")
    entries = page.locator("#audit-entries tbody tr")
    assert entries.count() >= len(SITES) * 3
    assert entries.count() == page.locator("#audit-entries tbody tr[data-type='budget.spent']").count()
    _shot(page, "audit", tmp_path)
    assert errors == []
    if os.environ.get("FEDHEALTH_DASHBOARD_SCREENSHOTS") == "1":
        copy_screenshots(tmp_path, DOCS)


def test_a_reader_sees_no_admin_action_and_is_refused_one(fed, browser):
    federation, study_id, reader_key = fed
    page = _page(browser, federation.url)
    _sign_in(page, "reader", reader_key)
    page.goto("/ui/federation")
    assert page.locator("tr[data-site]").count() == len(SITES)
    assert page.locator("button.danger").count() == 0
    page.goto(f"/ui/studies/{study_id}")  # an auditor reads every study, and cancels none
    assert page.locator("#metrics-chart").count() == 1
    assert page.locator("form[action$='/cancel']").count() == 0
    # the admin's form, sent with the reader's own valid CSRF token: refused by role
    csrf = page.locator("input[name=csrf_token]").first.get_attribute("value")
    status = page.evaluate(
        """async (csrf) => (await fetch('/ui/sites/hospital-a/revoke', {method: 'POST',
             headers: {'Content-Type': 'application/x-www-form-urlencoded'},
             body: 'csrf_token=' + encodeURIComponent(csrf)})).status""",
        csrf,
    )
    assert status == 403
    assert all(s.status == "active" for s in federation.operator.sites())


def test_a_form_without_its_csrf_token_is_refused(fed, browser):
    federation, _, _ = fed
    page = _page(browser, federation.url)
    admin = _admin(federation)
    _sign_in(page, admin.user, admin.api_key)
    page.goto("/ui/federation")
    form = page.locator("tr[data-site='hospital-c'] form")
    form.locator("input[name=csrf_token]").evaluate("input => input.remove()")
    form.locator("button").click()
    page.wait_for_selector("#error")
    assert "CSRF" in page.text_content("#error")
    assert all(s.status == "active" for s in federation.operator.sites())
