"""The site dashboard's data-quality page and consent-withdrawal flags, in process (no browser, no
orchestrator): each registered dataset's report with missing values, ranges, far-out values and schema pin,
kept until its source changes; the studies that trained on data of patients who withdrew later, as counts,
never a patient id. The site's database is its own SQLite file (``site.sqlite``): there is no PostgreSQL
variant of it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from fedhealth.agent import DatasetSummary, SiteDatasets, SiteGovernance, SiteHome, csv_uri
from fedhealth.core import ManualClock
from fedhealth.crypto import IdentityKey
from fedhealth.dashboard import site_dashboard_app
from fedhealth.dashboard._site_consent import WithdrawalFlags
from fedhealth.dashboard._site_quality import QualityCache, source_snapshot
from fedhealth.governance import (
    GOVERNANCE_METADATA,
    AuditEventType,
    ConsentDecision,
    ConsentRecord,
    spec_hash,
)
from support import TestClient, breast_spec

LOCAL = "http://127.0.0.1:8765"  # the site dashboard answers only a loopback Host with its own port

PURPOSE = "HRESCH"


@pytest.fixture
def home(tmp_path: Path) -> SiteHome:
    home = SiteHome(tmp_path / "site")
    home.root.mkdir()
    IdentityKey.generate().save(home.identity_path)
    home.settings_path.write_text(json.dumps({"site": "solo", "orchestrator": "https://127.0.0.1:1"}))
    return home


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def ui(home: SiteHome, clock: ManualClock) -> Iterator[tuple[TestClient, QualityCache]]:
    cache = QualityCache(clock=clock)
    app = site_dashboard_app(home, token="sign-in", steward="dana", quality=cache)
    with TestClient(app, base_url=LOCAL) as client:
        # not followed: the approvals page would try the (absent) orchestrator
        assert client.get("/login?token=sign-in", follow_redirects=False).status_code == 303
        yield client, cache


SCHEMA = """
id = "pid"
label = "label"
[columns.age]
missing = "median"
[columns.bmi]
type = "numeric"
[columns.smoker]
type = "categorical"
categories = ["never", "current"]
"""


def _cohort(path: Path, rows: int) -> Path:
    lines = ["pid,age,bmi,smoker,label"]
    for i in range(rows):
        age = "" if i % 5 == 0 else str(40 + i % 17)  # every fifth age missing
        bmi = "400" if i == 3 else f"{22 + (i % 7) * 0.5}"  # one far-out value
        lines.append(f"P-{i:04d},{age},{bmi},{'current' if i % 4 == 0 else 'never'},{i % 2}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _register(home: SiteHome, tmp_path: Path, rows: int) -> Path:
    csv = _cohort(tmp_path / "cohort.csv", rows)
    schema = tmp_path / "cohort.toml"
    schema.write_text(SCHEMA)
    SiteDatasets(home).add("cohort", csv_uri(csv, label=None, schema=schema))
    return csv


def _touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_the_quality_page_shows_each_features_missing_values_ranges_and_far_out_values(ui, home, tmp_path):
    client, cache = ui
    _register(home, tmp_path, 40)
    page = client.get("/datasets")
    assert page.status_code == 200
    html = page.text
    section = html.split('data-dataset="cohort"')[1]
    assert '<span class="ok">ok</span>' in section.split("</h2>")[0]
    assert '<tr data-feature="age">' in section
    assert '<tr data-feature="bmi">' in section
    age = section.split('<tr data-feature="age">')[1].split("</tr>")[0]
    assert '<td class="missing">8</td><td>20.0</td>' in age  # 8 of 40 missing
    bmi = section.split('<tr data-feature="bmi">')[1].split("</tr>")[0]
    assert '<td class="outliers">1</td>' in bmi
    assert "<td>400</td>" in bmi
    smoker = section.split('<tr data-feature="smoker">')[1].split("</tr>")[0]
    assert "never: 30, current: 10" in smoker
    assert "40 (" in section.split('class="rows">')[1]  # rows
    assert "pinned (declared)" in section
    assert "2026-01-01 00:00:00 UTC" in section  # the last checked time
    assert "P-0003" not in html  # no patient id on the page (the id column is never a feature)
    assert cache.reads == 1


def test_a_report_is_read_again_only_when_its_file_changes_or_on_request(ui, home, tmp_path, clock):
    client, cache = ui
    csv = _register(home, tmp_path, 40)
    client.get("/datasets")
    clock.advance(5 * 3600)
    client.get("/datasets")
    assert cache.reads == 1  # unchanged file: the kept report, however old
    _cohort(csv, 50)
    _touch_later(csv)
    html = client.get("/datasets").text
    assert cache.reads == 2
    assert "50 (" in html.split('class="rows">')[1]
    assert "05:00:00 UTC" in html  # checked again now
    client.get("/datasets?refresh=1")
    assert cache.reads == 3
    _touch_later(home.root / "schemas" / "cohort.json")  # the pinned schema rewritten (dataset add --replace)
    client.get("/datasets")
    assert cache.reads == 4


def test_a_dataset_that_no_longer_checks_is_shown_failed_with_its_hint(ui, home, tmp_path):
    client, _ = ui
    csv = _register(home, tmp_path, 30)
    # a column renamed after the schema was pinned
    csv.write_text(csv.read_text().replace("pid,age,", "pid,years,", 1))
    _touch_later(csv)
    html = client.get("/datasets").text
    section = html.split('data-dataset="cohort"')[1]
    assert "check FAILED" in section
    assert "add the dataset again with --replace" in section  # the pinned schema's hint
    assert "Traceback" not in html


def test_sources_without_a_cheap_snapshot_are_read_again_after_the_maximum_age(home, tmp_path, clock):
    (home.root / "datasets.json").write_text(
        json.dumps({"remote": {"uri": "sql+postgresql://db.example/cdm?table=cohort&label=y"}})
    )
    calls: list[str] = []

    def check(name: str, uri: str, data_dir: Any, *, pinned: bool) -> DatasetSummary:
        calls.append(name)
        return DatasetSummary(
            name=name, uri=uri, rows=10, train_rows=8, features=("x",), label="y", id_column=None
        )

    cache = QualityCache(clock=clock, max_age_s=600, check=check)
    [first] = cache.reports(SiteDatasets(home))
    assert first.summary is not None
    assert first.summary.quality is None
    assert not first.pinned
    clock.advance(599)
    cache.reports(SiteDatasets(home))
    assert calls == ["remote"]
    clock.advance(2)
    cache.reports(SiteDatasets(home))
    assert calls == ["remote", "remote"]
    assert source_snapshot("builtin://breast-cancer/0?sites=4").expires is False
    assert source_snapshot(f"file://{tmp_path}").expires is True  # a folder
    (home.root / "datasets.json").write_text("{}")
    assert cache.reports(SiteDatasets(home)) == []  # unregistered: gone from the page


def _train(governance: SiteGovernance, study_id: str, spec_digest: str, patients: list[str], rounds: int):
    """What the governance gate logs for each training round of a study at this site."""
    registry = governance.consent()
    for r in range(1, rounds + 1):
        task_id = f"{study_id}-t{r}"
        governance.log.append(
            AuditEventType.TASK_RECEIVED,
            {"task_id": task_id, "study_id": study_id, "round": r, "kind": "train",
             "spec_hash": spec_digest, "dataset": "cohort"},
        )  # fmt: skip
        result = registry.filter(
            patients, PURPOSE, governance.log.clock.now(), task_id=task_id, study_id=study_id
        )
        governance.log.append(
            AuditEventType.UPDATE_SENT,
            {"task_id": task_id, "study_id": study_id, "round": r, "model_in": "0" * 64,
             "dataset_fingerprint": "f" * 64, "consent_snapshot": result.snapshot_hash},
        )  # fmt: skip


def test_the_overview_flags_the_studies_trained_on_patients_who_withdrew_as_counts(ui, home):
    client, _ = ui
    patients = [f"patient-{i}" for i in range(8)]
    spec = breast_spec(["solo"], rounds=2, name="sepsis-risk")
    with SiteGovernance(home) as governance:
        governance.consent().add(
            [ConsentRecord(patient_id=p, purpose=PURPOSE, decision=ConsentDecision.PERMIT) for p in patients]
        )
        governance.submit(spec)
        _train(governance, "st-1", spec_hash(spec.model_dump(mode="json")), patients, rounds=2)
        _train(governance, "st-2", "9" * 64, patients[1:], rounds=1)  # never saw patient-0
    html = client.get("/overview").text
    assert "No study trained on data of a patient who withdrew later" in html

    with SiteGovernance(home) as governance:
        governance.consent().withdraw("patient-0", PURPOSE)
    html = client.get("/overview").text
    flags = html.split('id="site-flags"')[1].split("</table>")[0]
    assert 'data-study="st-2"' not in flags
    row = flags.split('data-study="st-1"')[1].split("</tr>")[0]
    assert "sepsis-risk" in row  # the approved spec's name
    assert '<td class="withdrawals">1</td><td class="patients">1</td><td class="updates">2</td>' in row
    assert "every version from round 1 on" in row
    assert "patient-0" not in html

    with SiteGovernance(home) as governance:  # a second withdrawal: only the new entries are read
        governance.consent().withdraw("patient-5", PURPOSE)
        governance.consent().withdraw("patient-5", "OTHER")  # no snapshot of that purpose: flags nothing new
    html = client.get("/overview").text
    flags = html.split('id="site-flags"')[1].split("</table>")[0]
    assert '<td class="withdrawals">2</td><td class="patients">2</td>' in flags.split('data-study="st-1"')[1]
    st2 = flags.split('data-study="st-2"')[1].split("</tr>")[0]
    assert '<td class="withdrawals">1</td><td class="patients">1</td><td class="updates">1</td>' in st2
    assert "(spec not registered here)" in st2
    assert "3 withdrawal(s) logged" in html
    assert "patient-5" not in html


def test_withdrawal_flags_fold_each_log_entry_once(home):
    flags = WithdrawalFlags()
    with SiteGovernance(home) as governance:
        governance.consent().add(
            [ConsentRecord(patient_id=p, purpose=PURPOSE, decision=ConsentDecision.PERMIT) for p in "ab"]
        )
        _train(governance, "st-1", "1" * 64, ["a", "b"], rounds=1)
        log_id = governance.log.log_id
        assert flags.flags(governance.engine, log_id) == ([], 0)
        governance.consent().withdraw("a", PURPOSE)
        [flag], withdrawals = flags.flags(governance.engine, log_id)
        assert (flag.study_id, flag.patients, flag.rounds, withdrawals) == ("st-1", 1, (1,), 1)
        statements: list[str] = []
        from sqlalchemy import event

        def count(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
            statements.append(sql)

        event.listen(governance.engine, "before_cursor_execute", count)
        try:
            again, _ = flags.flags(governance.engine, log_id)
        finally:
            event.remove(governance.engine, "before_cursor_execute", count)
        assert again == [flag]
        # one read of the new entries (none) and one of the approvals' names: the log is not read again
        assert len(statements) == 2


def test_the_overview_loads_the_logs_verification_after_the_page_and_shows_a_tampered_entry(ui, home):
    client, _ = ui
    overview = client.get("/overview").text
    assert 'hx-get="/overview/verify"' in overview
    assert 'id="site-verify"' not in overview  # not verified while the page is drawn
    fragment = client.get("/overview/verify").text
    assert '<p id="site-verify" class="ok">Verified: ' in fragment
    entries = GOVERNANCE_METADATA.tables["gov_audit_entries"]
    with SiteGovernance(home) as governance, governance.engine.begin() as conn:
        conn.execute(update(entries).where(entries.c.seq == 1).values(payload='{"site": "forged"}'))
    assert "Verification FAILED" in client.get("/overview/verify").text


def test_the_form_that_sends_withdrawal_notices_needs_its_csrf_token(ui, home):
    client, _ = ui
    assert 'id="send-withdrawals"' not in client.get("/overview").text  # nothing to send yet
    with SiteGovernance(home) as governance:
        governance.consent().withdraw("patient-0", PURPOSE)
    page = client.get("/overview").text
    assert 'id="send-withdrawals"' in page
    assert 'name="csrf_token" value="' in page.split('action="/overview/withdrawals"')[1]
    for form in ({}, {"csrf_token": "forged"}):
        refused = client.post("/overview/withdrawals", data=form, follow_redirects=False)
        assert refused.status_code == 403  # refused before the orchestrator is contacted
        assert "CSRF" in refused.text
