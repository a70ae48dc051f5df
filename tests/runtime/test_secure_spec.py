"""The secure-aggregation part of a study spec (issue 10, findings 3 and 4): it names the participating sites
with their key fingerprints, states the collusion it tolerates, and is refused when its threshold is unsafe
(2t > n + c) or below the quorum, with the arithmetic in the message. ``secure_round_plan`` derives each
round's set-up from the spec alone."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fedhealth.protocol import (
    SecureAggregationSpec,
    StudySpec,
    TaskKind,
    secure_round_plan,
)
from fedhealth.secagg import threshold_problem
from support import synthetic_recipe


def _keys(sites: list[str]) -> dict[str, str]:
    return {s: f"{i:064x}" for i, s in enumerate(sites)}


def _names(n: int) -> list[str]:
    return [f"site-{i:03d}" for i in range(n)]


def _spec(
    n: int = 5, *, eval_sites: list[str] | None = None, min_sites: int = 1, **secure: object
) -> StudySpec:
    sites = _names(n)
    fields: dict[str, object] = {"site_keys": _keys(sorted({*sites, *(eval_sites or [])}))}
    fields.update(secure)
    return StudySpec(
        name="s",
        dataset="none",
        recipe=synthetic_recipe(3),
        rounds=1,
        train_sites=sites,
        eval_sites=eval_sites,
        min_sites=min_sites,
        secure_aggregation=SecureAggregationSpec.model_validate(fields),
    )


def _refused(**kwargs: object) -> str:
    with pytest.raises(ValidationError) as caught:
        _spec(**kwargs)  # type: ignore[arg-type]
    return str(caught.value)


# --- finding 4: the threshold against the collusion bound and the quorum ---------------------------------


def test_a_threshold_that_colluders_could_split_is_refused_with_the_arithmetic():
    message = _refused(n=5, threshold=3)  # c defaults to 5 // 3 = 1
    assert (
        "threshold 3 with 5 sites tolerating 1 colluding site needs 2t > n + c: 6 > 6 is false; use t >= 4"
        in message
    )
    assert "training rounds" in message


def test_the_old_strict_majority_is_not_enough_when_the_spec_tolerates_colluders():
    # 6 of 10 was accepted before (a strict majority); with c = 3 colluders it is not: 12 > 13 is false
    assert "12 > 13 is false; use t >= 7" in _refused(n=10, threshold=6)
    assert secure_round_plan(_spec(n=10, threshold=7), TaskKind.TRAIN).threshold == 7


def test_a_threshold_below_the_quorum_is_refused():
    message = _refused(n=10, threshold=7, min_sites=8)
    assert "threshold 7 is below" in message
    assert "8" in message


def test_a_collusion_bound_no_threshold_can_meet_is_refused():
    assert "5" in _refused(n=5, collusion=5)


def test_the_default_collusion_is_a_third_and_the_default_threshold_the_least_safe_one():
    for n, c, t in [(2, 0, 2), (3, 1, 3), (4, 1, 3), (10, 3, 7), (19, 6, 13)]:
        plan = secure_round_plan(_spec(n=n), TaskKind.TRAIN)
        assert (plan.collusion, plan.threshold) == (c, t)
        assert 2 * t > n + c
        assert threshold_problem(n, t, c, 1) is None
        assert threshold_problem(n, t - 1, c, 1) is not None  # the default is the least that is safe


def test_the_default_threshold_rises_to_the_quorum():
    assert secure_round_plan(_spec(n=10, min_sites=9), TaskKind.TRAIN).threshold == 9


def test_an_explicit_collusion_bound_moves_the_threshold():
    plan = secure_round_plan(_spec(n=10, collusion=0), TaskKind.TRAIN)
    assert (plan.collusion, plan.threshold) == (0, 6)


def test_evaluation_rounds_get_their_own_plan_over_the_evaluation_sites():
    spec = _spec(n=6, eval_sites=["site-000", "site-001", "site-002"], min_sites=5)
    train, evaluation = secure_round_plan(spec, TaskKind.TRAIN), secure_round_plan(spec, TaskKind.EVALUATE)
    assert (train.n, train.threshold) == (6, 5)
    assert (evaluation.sites, evaluation.threshold) == (("site-000", "site-001", "site-002"), 3)
    assert "evaluation rounds" in _refused(n=6, eval_sites=["site-000", "site-001", "site-002"], threshold=5)


# --- finding 3: the spec names who takes part, with which keys ---------------------------------------------


def test_site_keys_must_cover_exactly_the_training_and_evaluation_sites():
    with pytest.raises(ValidationError, match="missing: \\['site-004'\\]"):
        StudySpec(
            name="s",
            dataset="none",
            recipe=synthetic_recipe(3),
            rounds=1,
            train_sites=_names(5),
            secure_aggregation=SecureAggregationSpec(site_keys=_keys(_names(4))),
        )
    with pytest.raises(ValidationError, match="not in the study: \\['sybil'\\]"):
        StudySpec(
            name="s",
            dataset="none",
            recipe=synthetic_recipe(3),
            rounds=1,
            train_sites=_names(2),
            secure_aggregation=SecureAggregationSpec(site_keys=_keys([*_names(2), "sybil"])),
        )
    with pytest.raises(ValidationError, match="site_keys"):
        SecureAggregationSpec.model_validate({})
    with pytest.raises(ValidationError, match="pattern"):
        SecureAggregationSpec(site_keys={"site-000": "not-a-fingerprint"})


def test_the_spec_hash_a_steward_approves_changes_with_any_site_key():
    from fedhealth.governance import spec_hash

    spec = _spec(n=3)
    other = _spec(n=3, site_keys={**_keys(_names(3)), "site-002": "f" * 64})
    assert spec_hash(spec.model_dump(mode="json")) != spec_hash(other.model_dump(mode="json"))


def test_above_the_full_graph_size_the_plan_has_a_neighbourhood_the_colluders_cannot_fill():
    plan = secure_round_plan(_spec(n=30, collusion=2), TaskKind.TRAIN)
    assert plan.neighbourhood_size is None  # the default, which every party derives from n and c
    assert plan.degree % 2 == 0
    assert plan.degree < 29
    assert secure_round_plan(_spec(n=20), TaskKind.TRAIN).degree == 19  # the full graph
    explicit = secure_round_plan(_spec(n=30, collusion=2, neighbourhood_size=8), TaskKind.TRAIN)
    assert (explicit.neighbourhood_size, explicit.degree) == (8, 8)
    # 8 neighbours and 8 colluders: share threshold 9, and c + 2 = 10 would be needed
    assert "c + 2 = 10" in _refused(n=30, collusion=8, neighbourhood_size=8)
    with pytest.raises(ValidationError, match="even"):
        SecureAggregationSpec(site_keys=_keys(_names(2)), neighbourhood_size=7)
