"""``standardize = "federated"`` in memory: the scaling pre-step (round 0, a real in-process secure-sum
session) gives the mean and std of the pooled union of the sites' training rows, the model it trains is the
one ``standardize = "given"`` trains with the same figures, and every bad input is one clear line."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from fedhealth.core import InputError
from fedhealth.data import HEART_DISEASE_FEATURES, STD_EPSILON, TabularDataset, open_dataset
from fedhealth.learning import (
    LOGREG_RECIPE,
    InMemorySession,
    LogRegParams,
    RecipeError,
    ScalingRefusedError,
    read_scaling,
    run_scaling_site,
)
from fedhealth.protocol import (
    PrivacySpec,
    RecipeSpec,
    SecureAggregationSpec,
    StudySpec,
    TaskKind,
    TaskStatus,
)
from fedhealth.runtime import (
    Aggregated,
    ConcludeSession,
    FailStudy,
    OpenRound,
    RoundState,
    SessionDone,
    SessionFailed,
    StudyRules,
    TaskClosed,
    check_recipe,
    effective_recipe,
    first_round,
    recipe_spec,
    run_study_in_memory,
)
from support import heart_data_dir

SITES = {"cleveland": 0, "hungary": 1, "switzerland": 2, "va": 3}
CATEGORICAL = {
    "cp": {"categories": [1, 2, 3, 4], "features": ["cp_2", "cp_3", "cp_4"]},
    "restecg": {"categories": [0, 1, 2], "features": ["restecg_1", "restecg_2"]},
}
KEYS = {site: f"{i:064x}" for i, site in enumerate(sorted(SITES), start=1)}


@pytest.fixture(scope="module")
def datasets() -> dict[str, TabularDataset]:
    return {s: open_dataset(f"builtin://heart-disease/{c}", heart_data_dir()) for s, c in SITES.items()}


def spec_of(preprocessing: dict[str, Any], **extra: Any) -> StudySpec:
    params = LogRegParams.model_validate(
        {
            "n_features": 13,
            "learning_rate": 0.5,
            "feature_names": list(HEART_DISEASE_FEATURES),
            "preprocessing": {**preprocessing, "categorical": CATEGORICAL},
        }
    )
    fields: dict[str, Any] = {
        "name": "hd-federated",
        "dataset": "heart-disease",
        "recipe": recipe_spec(LOGREG_RECIPE, params),
        "rounds": 2,
        "train_sites": sorted(SITES),
        "min_sites": 4,
        "seed": 5,
        "secure_aggregation": SecureAggregationSpec(site_keys=KEYS),
    }
    return StudySpec(**{**fields, **extra})


def pooled_training_rows(datasets: dict[str, TabularDataset]) -> np.ndarray:
    return np.concatenate([d.X_train * d.scaling.std + d.scaling.mean for d in datasets.values()])


def test_federated_scaling_of_heart_disease_is_the_pooled_scaling_and_trains_the_given_model(datasets):
    federated = run_study_in_memory(spec_of({"standardize": "federated"}), datasets)
    assert federated.scaling is not None
    pooled = pooled_training_rows(datasets)
    assert federated.scaling.rows == pooled.shape[0]
    np.testing.assert_allclose(federated.scaling.mean, pooled.mean(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        federated.scaling.scale, pooled.std(axis=0, ddof=1) + STD_EPSILON, rtol=1e-9, atol=1e-12
    )

    # "given" with the pooled statistics computed in numpy on the union of the training rows
    numpy_given = run_study_in_memory(
        spec_of(
            {
                "standardize": "given",
                "mean": pooled.mean(axis=0).tolist(),
                "scale": (pooled.std(axis=0, ddof=1) + STD_EPSILON).tolist(),
            }
        ),
        datasets,
    )
    # and with the very figures the pre-step released: the same study, bit for bit
    released_given = run_study_in_memory(
        spec_of(
            {
                "standardize": "given",
                "mean": list(federated.scaling.mean),
                "scale": list(federated.scaling.scale),
            }
        ),
        datasets,
    )
    for name, value in federated.params.items():
        np.testing.assert_array_equal(value, released_given.params[name])
        np.testing.assert_allclose(value, numpy_given.params[name], rtol=0, atol=1e-12)
    for site, metrics in federated.evaluation.items():
        other = released_given.evaluation[site]
        assert metrics.model_copy(update={"duration_s": 0.0}) == other.model_copy(update={"duration_s": 0.0})


def test_a_constant_feature_refuses_the_study_in_one_line_naming_it():
    rng = np.random.default_rng(0)
    names = ("age", "flag", "chol")

    def site(i: int) -> TabularDataset:
        X = rng.normal(size=(20, 3))
        X[:, 1] = 1.0  # the same value at every site: std 0 over the federation
        return TabularDataset(
            name=f"d{i}",
            X_train=X,
            y_train=(np.arange(20) % 2).astype(np.int64),
            X_test=X[:4],
            y_test=np.array([0, 1, 0, 1], dtype=np.int64),
            feature_names=names,
        )

    data = {s: site(i) for i, s in enumerate(["a", "b", "c"])}
    params = LogRegParams.model_validate(
        {"n_features": 3, "feature_names": list(names), "preprocessing": {"standardize": "federated"}}
    )
    spec = StudySpec(
        name="constant",
        dataset="d",
        recipe=recipe_spec(LOGREG_RECIPE, params),
        rounds=1,
        train_sites=sorted(data),
        min_sites=3,
    )
    with pytest.raises(InputError) as caught:
        run_study_in_memory(spec, data)
    message = str(caught.value)
    assert "\n" not in message
    assert "feature 'flag' is constant over the federation's training rows (std 0)" in message
    # every site reads the same refusal from the same sums: the session itself completes, nothing trains
    session = InMemorySession(sorted(data))
    session.run(lambda member: run_scaling_site(member, data[member.site], names))
    with pytest.raises(ScalingRefusedError, match="'flag' is constant"):
        read_scaling(session.relay.released)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {
                "recipe": RecipeSpec(
                    name="stats", params={"features": ["age"], "preprocessing": {"standardize": "federated"}}
                )
            },
            "recipe.params.preprocessing: recipe 'stats' does not support standardize = 'federated'",
        ),
        (
            {
                "privacy": PrivacySpec(
                    delta=1e-5, target_epsilon=2.0, max_grad_norm=1.0, sample_rate=0.1, steps_per_round=5
                )
            },
            "privacy: standardize = 'federated' releases exact sums that the study's differential privacy "
            "would not cover",
        ),
        (
            {"secure_aggregation": None},
            "secure_aggregation: standardize = 'federated' sums through a collective",
        ),
    ],
)
def test_a_federated_scaling_the_study_cannot_run_is_refused_in_one_line(change, expected):
    with pytest.raises(RecipeError) as caught:
        check_recipe(spec_of({"standardize": "federated"}, **change))
    assert "\n" not in str(caught.value)
    assert expected in str(caught.value)


def test_mean_and_scale_written_with_federated_are_refused():
    spec = spec_of({"standardize": "federated"})
    recipe = spec.recipe
    params = dict(recipe.params)
    params["preprocessing"] = {**params["preprocessing"], "mean": [0.0] * 13, "scale": [1.0] * 13}
    with pytest.raises(RecipeError, match="standardize = 'federated' computes mean and scale itself"):
        check_recipe(spec.model_copy(update={"recipe": recipe.model_copy(update={"params": params})}))


def test_a_federated_task_without_its_scaling_is_refused():
    spec = spec_of({"standardize": "federated"})
    with pytest.raises(InputError, match="the task came without the scaling its pre-step released"):
        effective_recipe(spec.recipe, None)


def test_the_scaling_pre_step_is_round_zero_a_session_before_training_round_one():
    spec = spec_of({"standardize": "federated"})
    rules = StudyRules.of(spec)
    opening = first_round(rules, datetime_at())
    assert (opening.number, opening.kind, opening.sites) == (0, TaskKind.COLLECTIVE, tuple(sorted(SITES)))
    pre = RoundState.opened(rules, opening)
    assert pre.combination.value == "session"
    commands: list[Any] = []
    for site in sorted(SITES):
        commands += pre.handle(TaskClosed(site=site, status=TaskStatus.COMPLETED))
    assert commands == [ConcludeSession()]
    counted = pre.handle(SessionDone())
    assert counted[-1].contributors == tuple(sorted(SITES))
    (nxt,) = pre.handle(Aggregated(at=datetime_at()))
    assert isinstance(nxt, OpenRound)
    assert (nxt.number, nxt.kind) == (1, TaskKind.TRAIN)
    assert RoundState.opened(rules, nxt).combination.value == "secure"

    failing = RoundState.opened(rules, opening)
    (abandon,) = failing.handle(TaskClosed(site="va", status=TaskStatus.REJECTED, reason="min_cohort"))
    assert "va's task ended (min_cohort)" in abandon.reason
    (*_, failed) = failing.handle(SessionFailed(reason=abandon.reason))
    assert isinstance(failed, FailStudy)
    assert failed.study_reason.startswith("round 0: va's task ended (min_cohort)")


def datetime_at() -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC)
