"""A collective study on the dashboard's study page (federated boosting): the session's released figures and
the features by total gain as a chart; the model itself is not on the page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from dashboard_support import add_user, dashboard_app, figure_of, sign_in

from fedhealth.crypto import IdentityKey
from fedhealth.orchestrator import NewRound
from fedhealth.protocol import (
    RecipeSpec,
    Role,
    RoundStatus,
    SecureAggregationSpec,
    SiteMetrics,
    StudyStatus,
    TaskKind,
)
from support import breast_spec

SITES = ["site-a", "site-b", "site-c"]
FEATURES = [f"lab_{j:02d}" for j in range(25)]  # more than the chart shows


def _importance() -> list[dict[str, object]]:
    gains = [100.0 - 3.0 * j for j in range(len(FEATURES))]  # lab_00 first, as finish() orders them
    return [
        {"feature": name, "index": j, "total_gain": gain, "splits": 40 - j}
        for j, (name, gain) in enumerate(zip(FEATURES, gains, strict=True))
    ]


def _seed_boosting_study(svc) -> str:
    store, now = svc.store, svc.settings.clock.now()
    for name in SITES:
        store.create_site(name, now)
    keys = {s: IdentityKey.generate().public().fingerprint for s in SITES}
    spec = breast_spec(
        SITES,
        rounds=1,
        name="sepsis-gbdt",
        recipe=RecipeSpec(name="lightgbm", params={"n_features": len(FEATURES)}),
        secure_aggregation=SecureAggregationSpec(site_keys=keys),
    )
    first = NewRound(
        number=1,
        kind=TaskKind.COLLECTIVE,
        sites=SITES,
        model_in_digest="0" * 64,
        deadline_at=now + timedelta(1),
    )
    study, r = store.create_study(spec=spec, model_digest="0" * 64, state_digest=None, first=first, when=now)
    assert r is not None
    for t in store.tasks_of_round(r.id):
        store.complete_task(t.id, digest=None, num_samples=0, when=now, metrics=SiteMetrics(num_samples=0))
    store.finish_round(
        r.id,
        status=RoundStatus.COMPLETED,
        reason=None,
        when=now,
        metrics={
            "model": "tree\nversion=v4\nTHE-MODEL-TEXT",
            "binning": {"low": [-1.0], "high": [1.0], "grid_cells": 4, "starts": [[0, 2]]},
            "trees": 8,
            "sites": 3,
            "test_rows": 120,
            "accuracy": 0.8125,
            "log_loss": 0.43,
            "feature_importance": _importance(),
            "session": {"calls": 250, "attempt": "a1"},
        },
        study_status=StudyStatus.COMPLETED,
        study_reason=None,
    )
    return study.id


def test_a_boosting_study_page_shows_its_result_and_its_features_by_gain(tmp_path):
    with dashboard_app(tmp_path / "state") as dash:
        key = add_user(dash.svc, "root", Role.ADMIN)
        assert sign_in(dash.client, "root", key).status_code == 200
        study_id = _seed_boosting_study(dash.svc)
        page = dash.client.get(f"/ui/studies/{study_id}")
        assert page.status_code == 200, page.text
        html = page.text
        assert "Collective session (round 1)" in html
        result = html.split('id="session-result"')[1].split("</table>")[0]
        assert '<th scope="row">accuracy</th><td>0.8125</td>' in result
        assert '<th scope="row">test_rows</th><td>120</td>' in result
        assert "THE-MODEL-TEXT" not in html  # the model is in its package, not on the page
        assert "grid_cells" not in html
        [bars] = figure_of(html, "importance-figure")["data"]
        assert bars["orientation"] == "h"
        assert bars["y"] == FEATURES[:20][::-1]  # the top 20, the largest gain at the top
        assert bars["x"] == pytest.approx([100.0 - 3.0 * j for j in range(20)][::-1])
        assert bars["customdata"] == [40 - j for j in range(20)][::-1]


def test_a_training_study_page_has_no_session_section(tmp_path):
    from dashboard_support import seed

    with dashboard_app(tmp_path / "state") as dash:
        key = add_user(dash.svc, "root", Role.ADMIN)
        assert sign_in(dash.client, "root", key).status_code == 200
        [study_id] = seed(dash.svc, sites=3, studies=1, rounds=2)
        html = dash.client.get(f"/ui/studies/{study_id}").text
        assert "metrics-figure" in html
        assert "Collective session" not in html
        assert "importance-figure" not in html
