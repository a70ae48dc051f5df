"""Prometheus metrics of a real orchestrator (``--metrics-port``) after a secure, differentially private study
in which one named site never answers: the scrape parses with prometheus-client's own parser and counts the
rounds, their durations, each secure-aggregation stage, the dropped site, the active sites, the budget spent
and request latencies by route template."""

from __future__ import annotations

import socket

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedhealth.dashboard import DEFAULT_METRICS_HOST
from fedhealth.protocol import PrivacySpec, SecureAggregationSpec, StudyStatus
from fedhealth.sim import LocalFederation
from support import BREAST_SITES, breast_spec, logreg_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REAL = ["hospital-a", "hospital-b", "hospital-c"]
SILENT = "hospital-d"  # enrolled and named in the study, but its agent never runs
DATASET = "bc-metrics"
STAGES = ["advertise_keys", "share_keys", "masked_input", "consistency", "unmask"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((DEFAULT_METRICS_HOST, 0))
        return int(s.getsockname()[1])


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_rounds_stages_dropouts_budgets_and_requests(tmp_path):
    port = _free_port()
    with LocalFederation(tmp_path, orchestrator_args=["--metrics-port", str(port)]) as fed:
        fed.start_orchestrator()
        for site in [*REAL, SILENT]:
            fed.add_site(site)
        for site in REAL:
            fed.set_budget(site, DATASET, 10.0, 1e-5)
            fed.start_agent(site, {DATASET: BREAST_SITES[site]})
        fed.wait_for_sites(REAL)
        spec = breast_spec(
            [*REAL, SILENT],
            rounds=2,
            name="metrics",
            dataset=DATASET,
            min_sites=2,
            eval_sites=REAL,
            recipe=logreg_recipe(30, learning_rate=0.5),
            privacy=PrivacySpec(
                delta=1e-5, target_epsilon=1.0, max_grad_norm=1.0, sample_rate=0.1, steps_per_round=5
            ),
            secure_aggregation=SecureAggregationSpec(
                stage_timeout_s=10.0, site_keys=fed.site_keys([*REAL, SILENT])
            ),
        )
        # every steward approves, the silent site's too (its agent is simply down): the study starts, and
        # each training round waits stage_timeout_s for it at the first stage (long enough for busy sites)
        study = fed.create_study(spec)
        final = fed.wait_for_study(study.study_id, timeout=300)
        assert final.status is StudyStatus.COMPLETED, final.reason

        response = httpx.get(f"http://{DEFAULT_METRICS_HOST}:{port}/metrics", timeout=10)
        assert response.status_code == 200
        samples = _samples(response.text)

    assert _value(samples, "fedhealth_rounds_total", kind="train", status="completed") == 2
    assert _value(samples, "fedhealth_rounds_total", kind="evaluate", status="completed") == 1
    assert _value(samples, "fedhealth_round_duration_seconds_count", kind="train") == 2
    assert _value(samples, "fedhealth_round_duration_seconds_sum", kind="train") > 0
    for stage in STAGES:  # two training rounds and the evaluation round are all secure
        assert _value(samples, "fedhealth_secagg_stage_seconds_count", stage=stage) == 3, stage
    # the silent site dropped out of both training rounds (at the first stage)
    assert _value(samples, "fedhealth_dropped_sites_total") == 2
    assert _value(samples, "fedhealth_sites", status="active") == 4
    assert _value(samples, "fedhealth_active_sites") == 3
    for site in REAL:
        spent = _value(samples, "fedhealth_budget_epsilon_spent", site=site, dataset=DATASET)
        remaining = _value(samples, "fedhealth_budget_epsilon_remaining", site=site, dataset=DATASET)
        assert _value(samples, "fedhealth_budget_epsilon", site=site, dataset=DATASET) == 10.0
        assert _value(samples, "fedhealth_budget_charges_total", site=site, dataset=DATASET) == 2
        assert 0 < spent <= 10.0
        assert remaining == pytest.approx(10.0 - spent, rel=1e-6)
    polls = _value(
        samples, "fedhealth_request_duration_seconds_count", route="/api/v1/agent/tasks/next", method="GET"
    )
    assert polls > 0
    routes = {s.labels["route"] for s in samples["fedhealth_request_duration_seconds_count"]}
    assert all(r.startswith("/") or r == "unmatched" for r in routes)
    assert not any(study.study_id in r for r in routes)  # templates, never raw paths
