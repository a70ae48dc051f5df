"""The drift page in process: a finished statistics study is compared with its dataset's reference (the
earliest, or the one an admin designated), the comparison is an audit entry and a row of the page; only an
admin designates a reference, with a CSRF token, and only a completed statistics study; the page reads a
bounded number of SQL statements; each site's validation metrics are drawn across model versions."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from dashboard_support import Dashboard, add_user, csrf_of, dashboard_app, figure_of, seed, sign_in
from sqlalchemy import event

from fedhealth.dashboard._drift import DriftPolicy, DriftThresholds
from fedhealth.dashboard._drift_watch import DriftObserver
from fedhealth.governance import AuditEventType, ModelProvenance, ProvenanceStore
from fedhealth.orchestrator import NewRound
from fedhealth.protocol import RecipeSpec, Role, RoundStatus, StudyStatus, TaskKind
from support import breast_spec, postgres_schema

SITES = ["a", "b"]
EDGES = [0.0, 1.0, 2.0]  # four bins


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def dash(request, tmp_path):
    if request.param == "sqlite":
        with dashboard_app(tmp_path / "state") as d:
            yield d
    else:
        with postgres_schema() as url, dashboard_app(tmp_path / "state", database_url=url) as d:
            yield d


def _cell(value: int | None) -> dict[str, Any]:
    return {"value": None, "suppressed": True} if value is None else {"value": value, "suppressed": False}


def _report(per_site: dict[str, list[int | None]]) -> dict[str, Any]:
    pooled = [sum(h[i] or 0 for h in per_site.values()) for i in range(len(EDGES) + 1)]
    strata = [(None, pooled), *per_site.items()]
    return {
        "kind": "federated-statistics",
        "sites": SITES,
        "features": ["x"],
        "bins": {"x": EDGES},
        "min_cell_count": 5,
        "strata": [
            {
                "stratum": {"label": None, "site": site},
                "rows": _cell(sum(v or 0 for v in hist)),
                "features": {"x": {"histogram": [_cell(v) for v in hist]}},
            }
            for site, hist in strata
        ],
        "session": {"calls": 3},
    }


def stats_study(dash: Dashboard, name: str, report: dict[str, Any]) -> str:
    """A completed one-round study whose result is ``report`` (as a stats session's is kept)."""
    store, now = dash.svc.store, dash.svc.settings.clock.now()
    known = {s.name for s in store.list_sites()}
    for site in SITES:
        if site not in known:
            store.create_site(site, now)
    spec = breast_spec(
        SITES, rounds=1, name=name, recipe=RecipeSpec(name="stats", params={"features": ["x"]})
    )
    first = NewRound(
        number=1,
        kind=TaskKind.TRAIN,
        sites=SITES,
        model_in_digest="0" * 64,
        deadline_at=now + timedelta(hours=1),
    )
    study, r = store.create_study(spec=spec, model_digest="0" * 64, state_digest=None, first=first, when=now)
    assert r is not None
    store.finish_round(
        r.id,
        status=RoundStatus.COMPLETED,
        reason=None,
        when=now,
        metrics=report,
        model_out="0" * 64,
        version=None,
        next_round=None,
        study_status=StudyStatus.COMPLETED,
        study_reason=None,
    )
    return study.id


def finish(dash: Dashboard, study_id: str, thresholds: DriftThresholds | DriftPolicy | None = None) -> None:
    """What the orchestrator's round engine does when a study ends: tell the drift observer."""
    DriftObserver(dash.svc.store, dash.svc.settings, thresholds or DriftThresholds()).study_finished(
        dash.svc.store.get_study(study_id)
    )


def drift_entries(
    dash: Dashboard, kind: AuditEventType = AuditEventType.DRIFT_CHECKED
) -> list[dict[str, Any]]:
    return [e.payload for e in dash.svc.audit.entries() if e.type == kind]


def _admin(dash: Dashboard) -> None:
    key = add_user(dash.svc, "root", Role.ADMIN)
    assert sign_in(dash.client, "root", key).status_code == 200


STEADY = {"a": [20, 30, 30, 20], "b": [20, 30, 30, 20]}
SHIFTED = {"a": [20, 30, 30, 20], "b": [2, 8, 30, 60]}


def test_the_first_stats_study_is_the_reference_and_a_shift_is_an_alert_on_the_page(dash):
    _admin(dash)
    reference = stats_study(dash, "ref", _report(STEADY))
    finish(dash, reference)
    assert drift_entries(dash) == []  # nothing to compare with yet
    assert "No drift comparison yet" in dash.client.get("/ui/drift").text

    later = stats_study(dash, "later", _report(SHIFTED))
    finish(dash, later)
    [entry] = drift_entries(dash)
    assert entry["reference_study_id"] == reference
    assert entry["study_id"] == later
    assert entry["level"] == "alert"
    levels = {(f["site"], f["feature"]): f["level"] for f in entry["findings"]}
    # all sites together: b's shift diluted by a's steady half is a warning
    assert levels == {(None, "x"): "warn", ("a", "x"): "ok", ("b", "x"): "alert"}

    page = dash.client.get("/ui/drift").text
    assert 'data-alert="breast-cancer"' in page
    assert '<tr data-site="b" data-feature="x" data-level="alert">' in page
    assert '<tr data-site="a" data-feature="x" data-level="ok">' in page


def test_suppressed_bins_are_counted_on_the_page_and_left_out_of_the_index(dash):
    _admin(dash)
    finish(dash, stats_study(dash, "ref", _report({"a": [20, 30, 30, 20], "b": [3, 30, 30, 20]})))
    assert drift_entries(dash) == []
    # b's first bin is suppressed in the reference (3 < k) and its count there differs: left out of both
    later = stats_study(dash, "later", _report({"a": [20, 30, 30, 20], "b": [None, 30, 30, 20]}))
    finish(dash, later)
    [entry] = drift_entries(dash)
    b = next(f for f in entry["findings"] if f["site"] == "b")
    assert b["bins_left_out"] == 1
    assert b["psi"] == pytest.approx(0.0)
    assert b["level"] == "ok"


def test_an_admin_designates_the_reference_and_later_studies_compare_with_it(dash):
    _admin(dash)
    first = stats_study(dash, "first", _report(STEADY))
    shifted = stats_study(dash, "shifted", _report(SHIFTED))
    page = dash.client.get("/ui/drift")
    done = dash.client.post(
        "/ui/drift/reference",
        data={"study_id": shifted, "csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert done.status_code == 303
    [designation] = drift_entries(dash, AuditEventType.DRIFT_REFERENCE)
    assert designation == {"study_id": shifted, "dataset": "breast-cancer", "by": "root"}
    ui = [e for e in drift_entries(dash, AuditEventType.UI_ACTION) if e["action"] == "drift reference"]
    assert ui == [{"action": "drift reference", "by": "root", "study_id": shifted}]

    again = stats_study(dash, "again", _report(SHIFTED))
    finish(dash, again)
    [entry] = drift_entries(dash)
    assert entry["reference_study_id"] == shifted  # not the earlier `first`
    assert entry["level"] == "ok"
    page = dash.client.get("/ui/drift").text
    assert shifted in page.split('id="drift-references"')[1]
    assert first not in page


def test_only_an_admin_designates_a_completed_stats_study_with_a_csrf_token(dash):
    _admin(dash)
    ref = stats_study(dash, "ref", _report(STEADY))
    training = seed(dash.svc, sites=2, studies=1, rounds=1)[0]
    token = csrf_of(dash.client.get("/ui/drift").text)
    assert dash.client.post("/ui/drift/reference", data={"study_id": ref}).status_code == 403  # no CSRF
    unknown = dash.client.post("/ui/drift/reference", data={"study_id": "st_nope", "csrf_token": token})
    assert unknown.status_code == 404
    not_stats = dash.client.post("/ui/drift/reference", data={"study_id": training, "csrf_token": token})
    assert not_stats.status_code == 409
    assert "not a completed statistics study" in not_stats.text

    reader_key = add_user(dash.svc, "ann", Role.AUDITOR)
    dash.client.cookies.clear()
    assert sign_in(dash.client, "ann", reader_key).status_code == 200
    page = dash.client.get("/ui/drift").text
    assert 'action="/ui/drift/reference"' not in page  # no form for a reader
    refused = dash.client.post("/ui/drift/reference", data={"study_id": ref, "csrf_token": csrf_of(page)})
    assert refused.status_code == 403
    assert drift_entries(dash, AuditEventType.DRIFT_REFERENCE) == []
    actions = [e["action"] for e in drift_entries(dash, AuditEventType.UI_ACTION)]
    assert "drift reference refused" in actions


def _statements(dash: Dashboard, path: str) -> int:
    count = 0

    def counter(*_: object) -> None:
        nonlocal count
        count += 1

    engine = dash.svc.store.engine
    event.listen(engine, "before_cursor_execute", counter)
    try:
        assert dash.client.get(path).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", counter)
    return count


def test_the_drift_page_reads_a_bounded_number_of_statements_and_draws_validation_metrics(dash):
    _admin(dash)
    finish(dash, stats_study(dash, "ref", _report(STEADY)))
    finish(dash, stats_study(dash, "s1", _report(SHIFTED)))
    small = _statements(dash, "/ui/drift")
    for i in range(4):
        finish(dash, stats_study(dash, f"s{i + 2}", _report(SHIFTED if i % 2 else STEADY)))
    provenance = ProvenanceStore(dash.svc.store.engine)
    versions = [f"{n + 1:064x}" for n in range(3)]
    for n, digest in enumerate(versions):
        provenance.record(
            ModelProvenance(
                model_digest=digest,
                parent_digest=None if n == 0 else versions[n - 1],
                study_id="st_train",
                round=n + 1,
                n_sites=2,
                dataset_fingerprints={"site-000": "f0", "site-001": "f1"},
                consent_snapshots={"site-000": "a" * 64, "site-001": "b" * 64},
                spec_hash="c" * 64,
                software_version="test",
                created_at=dash.svc.settings.clock.now() + timedelta(seconds=n),
            )
        )
        for site in ("site-000", "site-001"):
            provenance.record_metrics(digest, site, {"auc": 0.6 + n / 10, "num_samples": 10})
    assert _statements(dash, "/ui/drift") == small
    assert len(drift_entries(dash)) == 5
    page = dash.client.get("/ui/drift").text
    figure = figure_of(page, "validation-figure-1")
    assert {t["name"] for t in figure["data"]} == {"site-000", "site-001"}
    assert [len(t["y"]) for t in figure["data"]] == [len(versions)] * 2
    assert json.dumps(figure).count("num_samples") == 0  # counts are not drawn as quality


def test_serve_takes_the_drift_thresholds_and_refuses_disordered_ones():
    from fedhealth.cli._errors import CliError
    from fedhealth.cli._services import _serve_extensions
    from fedhealth.dashboard import DashboardExtension

    served = _serve_extensions(dashboard=True, metrics_port=None, metrics_host="127.0.0.1", drift=(0.2, 0.5))
    [dashboard] = [e for e in served if isinstance(e, DashboardExtension)]
    assert dashboard.drift == DriftPolicy(default=DriftThresholds(warn=0.2, alert=0.5))
    with pytest.raises(CliError, match=r"--drift-warn/--drift-alert: drift thresholds must satisfy 0 < warn"):
        _serve_extensions(dashboard=True, metrics_port=None, metrics_host="127.0.0.1", drift=(0.3, 0.2))
    with pytest.raises(CliError, match=r"^--drift-dataset: drift thresholds 'heart-disease=0.2': write"):
        _serve_extensions(
            dashboard=True,
            metrics_port=None,
            metrics_host="127.0.0.1",
            drift=(0.1, 0.2),
            drift_datasets=["breast-cancer=0.2,0.4", "heart-disease=0.2"],
        )
    served = _serve_extensions(
        dashboard=True, metrics_port=None, metrics_host="127.0.0.1", drift_datasets=["icu=0.05,0.1"]
    )
    [dashboard] = [e for e in served if isinstance(e, DashboardExtension)]
    assert dashboard.drift.for_dataset("icu") == DriftThresholds(0.05, 0.1)
    assert dashboard.drift.for_dataset("other") == DriftThresholds()


def test_serve_stops_at_start_with_one_line_on_malformed_dataset_thresholds(tmp_path):
    from typer.testing import CliRunner

    from fedhealth.cli import app

    result = CliRunner().invoke(
        app,
        ["orchestrator", "serve", "--home", str(tmp_path / "none"), "--drift-dataset", "icu=0.5,0.1"],
    )
    assert result.exit_code == 2  # before the (missing) home is even looked at
    lines = result.output.strip().splitlines()
    assert lines == [
        "error: --drift-dataset: dataset 'icu': drift thresholds must satisfy 0 < warn <= alert "
        "(got warn=0.5, alert=0.1)"
    ]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_each_dataset_is_rated_with_its_own_thresholds_and_the_page_shows_them(tmp_path, backend):
    policy = DriftPolicy(
        default=DriftThresholds(0.1, 0.25), datasets={"breast-cancer": DriftThresholds(0.3, 2.0)}
    )
    with (
        postgres_schema() if backend == "postgres" else _no_database() as url,
        dashboard_app(tmp_path / "state", database_url=url, drift=policy) as dash,
    ):
        _admin(dash)
        finish(dash, stats_study(dash, "ref", _report(STEADY)), policy)
        finish(dash, stats_study(dash, "later", _report(SHIFTED)), policy)
        [entry] = drift_entries(dash)
        # under the default thresholds this is an alert (b) and a warning (all sites): see the first test
        assert entry["thresholds"] == {"warn": 0.3, "alert": 2.0}
        assert entry["level"] == "warn"
        levels = {(f["site"], f["feature"]): f["level"] for f in entry["findings"]}
        assert levels == {(None, "x"): "ok", ("a", "x"): "ok", ("b", "x"): "warn"}
        page = dash.client.get("/ui/drift").text
        assert "data-alert=" not in page
        table = page.split('id="drift-thresholds"')[1].split("</table>")[0]
        assert '<tr data-dataset="breast-cancer"><td>breast-cancer</td><td>0.3</td><td>2.0</td>' in table
        assert "every other dataset</td><td>0.1</td><td>0.25</td>" in table
        assert "warn at PSI ≥ 0.3, alert at PSI ≥ 2.0" in page


@contextlib.contextmanager
def _no_database() -> Iterator[None]:
    yield None
