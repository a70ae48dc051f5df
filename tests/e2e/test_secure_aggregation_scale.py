"""Secure aggregation beyond the four-site SQLite federation: 21 real agents in neighbourhood mode (SecAgg+'s
sparse graph, seeded by the sites' advertisements) with the orchestrator on PostgreSQL. The model must be
the plain FedAvg of the same updates, up to the codec's rounding."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedhealth.core import decode_tensors
from fedhealth.protocol import (
    SecureAggregationSpec,
    StrategySpec,
    StudySpec,
    StudyStatus,
    TaskKind,
    TaskStatus,
    secure_round_plan,
)
from fedhealth.runtime import run_study_in_memory
from fedhealth.sim import LocalFederation
from support import postgres_schema, synthetic_recipe

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.slow]
SITES = [f"site-{i:02d}" for i in range(21)]  # just above full_graph_max_sites (20)


def test_twenty_one_sites_in_neighbourhood_mode_on_postgresql_sum_to_the_plain_model(tmp_path):
    started = time.monotonic()
    with postgres_schema() as url, LocalFederation(tmp_path, database_url=url, log_level="warning") as fed:
        fed.start_orchestrator()
        for site in SITES:
            fed.add_site(site)
            fed.start_agent(site, {})  # the synthetic recipe reads no data: the test is the protocol
        fed.wait_for_sites(SITES, timeout=300)
        spec = StudySpec(
            name="secure-21",
            dataset="none",
            recipe=synthetic_recipe(500),
            # every synthetic site weighs 1; a small cap keeps the codec's step small (exact comparison)
            strategy=StrategySpec(weight_cap=10),
            rounds=2,
            train_sites=SITES,
            min_sites=20,
            round_deadline_s=300,
            secure_aggregation=SecureAggregationSpec(
                site_keys=fed.site_keys(SITES), collusion=2, stage_timeout_s=120.0
            ),
        )
        plan = secure_round_plan(spec, TaskKind.TRAIN)
        # above full_graph_max_sites (20): each site has k < 20 neighbours, 2t > n + c
        assert plan.full_graph_max_sites < len(SITES)
        assert plan.degree < len(SITES) - 1
        assert plan.threshold == 20  # max(2t > 23 -> 12, the quorum 20)
        ready = time.monotonic()
        study = fed.create_study(spec)
        final = fed.wait_for_study(study.study_id, timeout=600)
        assert final.status is StudyStatus.COMPLETED, final.reason
        assert all(t.status is TaskStatus.COMPLETED for r in final.rounds for t in r.tasks)
        assert all(t.metrics is None for r in final.rounds for t in r.tasks)
        assert [r.metrics["sites"] for r in final.rounds] == [len(SITES)] * 3
        model, _ = decode_tensors(fed.model_bytes(study.study_id))
        rounds_s = time.monotonic() - ready
    expected = run_study_in_memory(spec, dict.fromkeys(SITES))
    np.testing.assert_allclose(model["weight"], expected.params["weight"], atol=1e-5)
    print(f"{len(SITES)} sites: start-up {ready - started:.0f} s, study {rounds_s:.0f} s")
