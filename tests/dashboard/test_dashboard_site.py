"""The site dashboard (``fedhealth site dashboard``) in chromium: a data steward signs in with the one-time
link, reads a pending spec, approves it with a reason, and the study that waited for this site starts and
completes; the decision is in the site's signed audit log, and the site's overview shows its budgets and
its own audit log verified. Once a patient whose data the study trained on withdraws, the overview flags the
study; the data-quality page shows the registered dataset's report. The sign-in link works once, and a
decision without its CSRF token is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashboard_support import assert_accessible, copy_screenshots
from playwright.sync_api import sync_playwright
from sqlalchemy import select

from fedhealth.agent import SiteDatasets, SiteGovernance
from fedhealth.governance import GOVERNANCE_METADATA, AuditEventType
from fedhealth.protocol import StudyStatus
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, breast_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
A, B = "hospital-a", "hospital-b"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "dashboard"


@pytest.fixture
def steward_ui(tmp_path) -> Iterator[tuple[LocalFederation, dict[str, str]]]:
    with LocalFederation(tmp_path / "fed") as fed:
        fed.start_orchestrator()
        for site in (A, B):
            fed.add_site(site)
            fed.set_budget(site, "bc-dp", 3.0, 1e-5)  # a budget for DP studies of another dataset
            fed.start_agent(site, {"breast-cancer": BREAST_SITES[site]})
        fed.wait_for_sites([A, B])
        ready = tmp_path / "site-ui.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedhealth", "site", "dashboard", "--home", str(fed.site_home(B).root),
             "--port", "0", "--steward", "dana", "--ready-file", str(ready)],
            env=fed.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                assert proc.poll() is None, f"the site dashboard exited with {proc.returncode}"
                assert time.monotonic() < deadline, "the site dashboard did not start"
                time.sleep(0.05)
            assert ready.stat().st_mode & 0o077 == 0  # it holds the sign-in token
            yield fed, json.loads(ready.read_text())
        finally:
            proc.terminate()
            proc.wait(timeout=15)


def test_a_steward_approves_a_pending_spec_in_the_browser_and_the_study_starts(steward_ui, tmp_path):
    fed, ui = steward_ui
    assert CHROMIUM.exists(), "the browser tests need Debian's chromium: apt-get install chromium"
    spec = breast_spec([A, B], rounds=1, name="steward-ui")
    fed.approve(A, spec)  # hospital-a's steward approved already, on the command line
    study = fed.create_study(spec, approve=False)
    assert fed.study(study.study_id).status is StudyStatus.AWAITING_APPROVAL
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 800}, bypass_csp=True)
        page.goto(ui["login_url"])
        assert page.text_content("#steward") == "dana"
        row = page.locator(f"#pending tr[data-spec='{study.spec_hash}']")
        assert "steward-ui" in row.inner_text()
        _shot(page, "site-approvals", tmp_path)
        row.locator("a").click()
        assert page.locator("#summary li").count() > 0
        assert study.spec_hash[:12] in page.text_content("h1")
        page.fill("#reason", "IRB 2026-17 approved this protocol")
        _shot(page, "site-spec", tmp_path)
        page.click("#approve")
        page.wait_for_selector(f"#decided tr[data-spec='{study.spec_hash}']")
        assert "approved" in page.locator(f"#decided tr[data-spec='{study.spec_hash}']").inner_text()
        page.click("#overview-link")  # the site's budgets, consent and its own audit log
        assert "3.0000" in page.locator("#site-budgets tr[data-dataset='bc-dp']").inner_text()
        page.wait_for_selector("#site-verify")  # loaded after the page (htmx)
        assert page.text_content("#site-verify").startswith("Verified")
        # the link was spent: a second use opens nothing
        other = browser.new_page()
        assert other.goto(ui["login_url"]).status == 401
        final = fed.wait_for_study(study.study_id, timeout=240)
        assert final.status is StudyStatus.COMPLETED, final.reason
        # a patient whose rows hospital-b trained on withdraws; the orchestrator flags the model versions,
        # the overview the study
        members = GOVERNANCE_METADATA.tables["gov_consent_snapshot_members"]
        with SiteGovernance(fed.site_home(B)) as governance:
            with governance.engine.connect() as conn:
                patient = conn.execute(select(members.c.patient_id).limit(1)).scalar_one()
            notice = governance.consent().withdraw(patient, spec.purpose)
        assert notice.snapshot_hashes
        page.reload()
        page.click("#send-withdrawals")  # the notice to the orchestrator, which flags the model versions
        sent = page.text_content("#withdrawals-sent")
        assert sent.startswith("Sent 1 withdrawal notice(s)")
        assert "flags 0 " not in sent
        flagged = page.locator(f"#site-flags tr[data-study='{study.study_id}']")
        assert "steward-ui" in flagged.inner_text()
        assert flagged.locator("td.withdrawals").inner_text() == "1"
        assert flagged.locator("td.patients").inner_text() == "1"
        assert f">{patient}<" not in page.content()
        page.wait_for_selector("#site-verify")
        _shot(page, "site-overview", tmp_path)
        SiteDatasets(fed.site_home(B)).add("breast-cancer", BREAST_SITES[B])  # what `site dataset add` does
        page.click("#datasets-link")  # each registered dataset's data-quality report
        quality = page.locator("section[data-dataset='breast-cancer']")
        assert quality.locator("table.quality tbody tr").count() == 30  # one row per feature
        assert "builtin dataset: fixed" in quality.locator(".checked").inner_text()
        _shot(page, "site-datasets", tmp_path)
        browser.close()
    with SiteGovernance(fed.site_home(B)) as governance:
        entries = governance.log.entries()
    approved = [e for e in entries if e.type == AuditEventType.STUDY_APPROVED]
    assert [(e.payload["steward"], e.payload["reason"]) for e in approved] == [
        ("dana", "IRB 2026-17 approved this protocol")
    ]
    assert any(e.type == AuditEventType.STUDY_REVIEWED and e.payload["steward"] == "dana" for e in entries)
    if os.environ.get("FEDHEALTH_DASHBOARD_SCREENSHOTS") == "1":
        copy_screenshots(tmp_path, DOCS)


def test_a_decision_without_its_csrf_token_is_refused_and_recorded_nowhere(steward_ui):
    fed, ui = steward_ui
    spec = breast_spec([A, B], rounds=1, name="steward-csrf")
    study = fed.create_study(spec, approve=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page()
        page.goto(ui["login_url"])
        page.locator(f"#pending tr[data-spec='{study.spec_hash}'] a").click()
        page.locator("#decision input[name=csrf_token]").evaluate("input => input.remove()")
        page.fill("#reason", "looks fine")
        page.click("#approve")
        page.wait_for_selector("#error")
        assert "CSRF" in page.text_content("#error")
        browser.close()
    with SiteGovernance(fed.site_home(B)) as governance:
        assert governance.approvals.get(study.spec_hash).status.value == "pending"
    assert fed.study(study.study_id).status is StudyStatus.AWAITING_APPROVAL


def _shot(page, name: str, folder: Path) -> None:
    assert_accessible(page)
    page.screenshot(path=str(folder / f"{name}.png"))
