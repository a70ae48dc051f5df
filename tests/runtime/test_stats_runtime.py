"""The runtime's side of a ``stats`` session: the release a site's ledger is told (asked of the recipe, never
its name), the noise generator a site program gets, and a whole spec run in this process with noise."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedhealth.core import InputError
from fedhealth.crypto import IdentityKey
from fedhealth.data import TabularDataset
from fedhealth.privacy import DpPlan, GaussianRelease, SecureRandom
from fedhealth.protocol import RecipeSpec, SecureAggregationSpec, StudySpec, TaskKind
from fedhealth.runtime import run_collective_in_memory, session_context, session_plan, task_plan

SITES = ["a", "b", "c"]


def spec(**params: object) -> StudySpec:
    keys = {s: IdentityKey.generate().public().fingerprint for s in SITES}
    return StudySpec(
        name="stats",
        dataset="d",
        recipe=RecipeSpec(name="stats", params={"features": ["x"], **params}),
        rounds=1,
        train_sites=SITES,
        secure_aggregation=SecureAggregationSpec(site_keys=keys),
    )


def test_a_collective_task_declares_what_its_recipe_releases():
    noisy = spec(noise_multiplier=2.5)
    assert session_plan(noisy) == DpPlan.of(GaussianRelease(noise_multiplier=2.5))
    assert task_plan(noisy, TaskKind.COLLECTIVE, "a") == session_plan(noisy)
    assert session_plan(spec()) == DpPlan()
    assert task_plan(spec(), TaskKind.COLLECTIVE, "a") == DpPlan()


def test_a_site_program_gets_a_secure_noise_generator_unless_noise_is_reproducible():
    s = spec()
    assert isinstance(session_context(s, "a").noise, SecureRandom)
    first = session_context(s, "a", reproducible_noise=True).noise
    again = session_context(s, "a", reproducible_noise=True).noise
    assert isinstance(first, np.random.Generator)
    assert isinstance(again, np.random.Generator)
    assert first.normal() == again.normal()  # the study seed fixes it: tests and benchmarks only


def test_a_noisy_stats_spec_runs_in_process_with_secure_noise():
    datasets = {
        s: TabularDataset(
            name=s,
            X_train=np.linspace(-1, 1, 50)[:, None],
            y_train=np.arange(50) % 2,
            X_test=np.zeros((0, 1)),
            y_test=np.zeros(0, np.int64),
            feature_names=("x",),
        )
        for s in SITES
    }
    exact = run_collective_in_memory(spec(), datasets)
    assert exact["strata"][0]["rows"] == {"value": 150, "suppressed": False}
    noisy = run_collective_in_memory(spec(noise_multiplier=1.0), datasets)
    assert noisy["noise"]["noise_multiplier"] == 1.0

    def figures(report: dict[str, Any]) -> list[Any]:
        x = report["strata"][0]["features"]["x"]
        cells = [report["strata"][0]["rows"], x["count"], x["mean"], x["variance"], *x["histogram"]]
        return [cell["value"] for cell in cells]

    # the noise moved the released figures. Not one figure alone: each noisy sum is snapped to a grid
    # (Mironov), so the noisy mean of this centred feature is exactly 0.0, like the exact one, in about 3
    # runs of 100 (6 of 200 measured); all 14 figures on their exact values: none of the 200
    assert figures(noisy) != figures(exact)


def test_an_unknown_feature_fails_the_in_process_run_with_its_name():
    datasets = {
        s: TabularDataset(
            name=s,
            X_train=np.zeros((10, 1)),
            y_train=np.zeros(10, np.int64),
            X_test=np.zeros((0, 1)),
            y_test=np.zeros(0, np.int64),
            feature_names=("y",),
        )
        for s in SITES
    }
    with pytest.raises(InputError, match="has no feature 'x'"):
        run_collective_in_memory(spec(), datasets)
