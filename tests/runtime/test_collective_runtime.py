"""Which studies run a collective session, and the session run in one process as the services run it."""

from __future__ import annotations

import pytest

from fedhealth.crypto import IdentityKey
from fedhealth.learning import RecipeError
from fedhealth.protocol import RecipeSpec, SecureAggregationSpec, StudySpec, collective_plan
from fedhealth.runtime import check_recipe, is_collective, run_collective_in_memory

SITES = ["north", "east", "south"]


def _spec(recipe: RecipeSpec, sites: list[str] = SITES) -> StudySpec:
    return StudySpec(
        name="collective",
        dataset="none",
        recipe=recipe,
        rounds=1,
        train_sites=sites,
        secure_aggregation=SecureAggregationSpec(
            site_keys={s: IdentityKey.generate().public().fingerprint for s in sites}
        ),
    )


def test_only_a_collective_recipe_runs_a_session():
    probe = _spec(RecipeSpec(name="collective-probe", params={"size": 8}))
    rounds = _spec(RecipeSpec(name="synthetic", params={"n_params": 8}))
    assert is_collective(probe)
    assert not is_collective(rounds)
    assert check_recipe(probe).name == "collective-probe"  # a collective study is accepted for submission


def test_a_collective_study_the_spec_cannot_hold_is_refused_at_submission():
    two = _spec(RecipeSpec(name="collective-probe", params={"size": 8}), ["north", "east"])
    with pytest.raises(RecipeError, match="at least 3 sites"):
        check_recipe(two)


def test_the_probe_runs_in_memory_with_exact_sums_and_reports_each_call():
    spec = _spec(RecipeSpec(name="collective-probe", params={"size": 32, "calls": 3}))
    report = run_collective_in_memory(spec, {})
    assert report["mismatches"] == 0
    assert report["sites"] == 3
    assert len(report["secure_s"]) == len(report["plain_s"]) == 3
    no_baseline = _spec(
        RecipeSpec(name="collective-probe", params={"size": 32, "calls": 3, "baseline": False})
    )
    assert run_collective_in_memory(no_baseline, {})["plain_s"] == []


def test_the_plan_is_the_spec_s_training_sites_sorted_with_the_leader_first():
    plan = collective_plan(_spec(RecipeSpec(name="collective-probe", params={"size": 8})))
    assert plan.sites == ("east", "north", "south")
    assert plan.leader == "east"
    assert plan.collusion == 1  # the default n // 3
    with pytest.raises(ValueError, match="at least 3 sites"):
        collective_plan(_spec(RecipeSpec(name="collective-probe", params={"size": 8}), ["north", "east"]))
    plain = _spec(RecipeSpec(name="collective-probe", params={"size": 8})).model_copy(
        update={"secure_aggregation": None}
    )
    with pytest.raises(ValueError, match="site_keys"):
        collective_plan(plain)
