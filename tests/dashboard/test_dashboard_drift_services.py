"""Drift through the real services: an orchestrator and three agents as processes run a statistics study with
per-site strata (the reference), then one site's feature distribution shifts and the same study runs again;
the orchestrator compares the second report with the first, the alert is on the dashboard's drift page and a
``drift.checked`` entry of level ``alert`` is in its audit log, naming the shifted site and feature only."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from dashboard_support import sign_in

from fedhealth.governance import AuditEventType
from fedhealth.protocol import OperatorCredential, RecipeSpec, SecureAggregationSpec, StudySpec, StudyStatus
from fedhealth.sim import LocalFederation

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SITES = ["north", "south", "west"]
SHIFTED = "west"
DATASET = "cohort"
AGE_BINS = [20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]
CHOL_BINS = [100.0, 150.0, 200.0, 250.0, 300.0, 400.0]
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]


def write_cohort(path: Path, seed: int, *, age_shift: float = 0.0) -> str:
    rng = np.random.default_rng(seed)
    n = 200
    age = rng.normal(52.0, 9.0, n) + age_shift
    chol = rng.normal(230.0, 40.0, n)
    label = (rng.random(n) < 0.4).astype(int)
    lines = ["age,chol,label", *(f"{a:.2f},{c:.2f},{y}" for a, c, y in zip(age, chol, label, strict=True))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # raw values: a site standardizing its own features would hide a shift of its mean from any histogram
    return f"file://{path}?label=label&standardize=false"


def stats_spec(fed: LocalFederation, name: str) -> StudySpec:
    return StudySpec(
        name=name,
        dataset=DATASET,
        recipe=RecipeSpec(
            name="stats",
            params={
                "features": ["age", "chol"],
                "bins": {"age": AGE_BINS, "chol": CHOL_BINS},
                "by_label": False,
                "by_site": True,
                "min_cell_count": 5,
            },
        ),
        rounds=1,
        train_sites=SITES,
        round_deadline_s=180,
        secure_aggregation=SecureAggregationSpec(site_keys=fed.site_keys(SITES)),
    )


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Iterator[LocalFederation]:
    data = tmp_path_factory.mktemp("cohorts")
    with LocalFederation(tmp_path_factory.mktemp("drift"), log_level="warning") as fed:
        fed.start_orchestrator()
        for i, site in enumerate(SITES):
            fed.add_site(site)
            fed.start_agent(site, {DATASET: write_cohort(data / f"{site}.csv", seed=i)})
        fed.wait_for_sites(SITES)
        fed.data_dir = data  # type: ignore[attr-defined]
        yield fed


def _run(fed: LocalFederation, name: str) -> str:
    study = fed.create_study(stats_spec(fed, name))
    final = fed.wait_for_study(study.study_id, timeout=300)
    assert final.status is StudyStatus.COMPLETED, final.reason
    return study.study_id


def _drift_entries(fed: LocalFederation) -> list[dict]:
    text = fed.operator.request("GET", "/api/v1/governance/audit").text
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in rows if r.get("type") == AuditEventType.DRIFT_CHECKED.value]


@pytest.fixture(scope="module")
def drifted(fed) -> tuple[str, str]:
    """Two statistics studies of the cohort: the reference, then the same after one site's ages shifted."""
    reference = _run(fed, "cohort-reference")
    assert _drift_entries(fed) == []  # the first statistics study of the dataset is its reference

    # the same records at two sites; at the third, every patient is 15 years older (its file rewritten)
    fed.stop_agent(SHIFTED)
    shifted = write_cohort(fed.data_dir / f"{SHIFTED}.csv", seed=SITES.index(SHIFTED), age_shift=15.0)
    fed.start_agent(SHIFTED, {DATASET: shifted})
    fed.wait_for_sites(SITES)
    return reference, _run(fed, "cohort-later")


def test_a_shifted_site_raises_a_psi_alert_on_the_drift_page_and_in_the_audit_log(fed, drifted):
    reference, later = drifted
    entries = _drift_entries(fed)
    assert len(entries) == 1
    payload = entries[0]["payload"]
    assert payload["study_id"] == later
    assert payload["reference_study_id"] == reference
    assert payload["dataset"] == DATASET
    assert payload["level"] == "alert", json.dumps(payload["findings"])
    findings = {(f["site"], f["feature"]): f for f in payload["findings"]}
    assert findings[(SHIFTED, "age")]["level"] == "alert"
    assert findings[(SHIFTED, "age")]["psi"] > 0.25
    for site in SITES:
        assert findings[(site, "chol")]["psi"] == pytest.approx(0.0, abs=1e-9)  # unchanged
        if site != SHIFTED:
            assert findings[(site, "age")]["level"] == "ok"
            assert findings[(site, "age")]["psi"] == pytest.approx(0.0, abs=1e-9)
    # nothing but sites, features, indices and levels: no value, no path
    assert str(fed.data_dir) not in json.dumps(payload)

    admin = OperatorCredential.model_validate_json(fed.home.admin_credential.read_text())
    client = fed.http
    assert sign_in(client, admin.user, admin.api_key).status_code in (200, 303)
    page = client.get("/ui/drift")
    assert page.status_code == 200
    assert f'data-alert="{DATASET}"' in page.text
    assert "Drift alert" in page.text
    row = re.search(rf'<tr data-site="{SHIFTED}" data-feature="age" data-level="(\w+)">', page.text)
    assert row is not None
    assert row.group(1) == "alert"
    assert re.search(r'<tr data-site="north" data-feature="age" data-level="ok">', page.text)
    # the audit page finds the alert by its type and level (the payload's keys are sorted)
    audit = client.get("/ui/audit", params={"type": "drift.checked", "text": '"level":"alert","reference"'})
    assert audit.status_code == 200
    assert audit.text.count('data-type="drift.checked"') == 1
    quiet = client.get("/ui/audit", params={"type": "drift.checked", "text": '"level":"ok","reference"'})
    assert 'data-type="drift.checked"' not in quiet.text


def test_the_drift_page_with_its_alert_passes_axe_core_in_chromium(fed, drifted, tmp_path):
    from dashboard_support import assert_accessible, copy_screenshots
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "the browser tests need Debian's chromium: apt-get install chromium"
    admin = OperatorCredential.model_validate_json(fed.home.admin_credential.read_text())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            context = browser.new_context(
                base_url=fed.url,
                ignore_https_errors=True,
                bypass_csp=True,
                viewport={"width": 1100, "height": 800},
            )
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto("/ui/login")
            page.fill("#user", admin.user)
            page.fill("#api_key", admin.api_key)
            page.click("button[type=submit]")
            page.wait_for_selector("#whoami")
            page.click("nav >> text=Drift")
            page.wait_for_selector(f"[data-alert='{DATASET}']")
            assert page.get_attribute("nav a[aria-current=page]", "href") == "/ui/drift"
            row = page.locator(f"tr[data-site='{SHIFTED}'][data-feature='age']")
            assert row.get_attribute("data-level") == "alert"
            assert_accessible(page)
            assert errors == []
            if os.environ.get("FEDHEALTH_DASHBOARD_SCREENSHOTS") == "1":  # docs/dashboard.md's screenshot
                page.screenshot(path=str(tmp_path / "drift.png"), full_page=False)
                copy_screenshots(tmp_path, Path(__file__).resolve().parents[2] / "docs" / "dashboard")
        finally:
            browser.close()
