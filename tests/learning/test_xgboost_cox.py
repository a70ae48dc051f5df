"""``survival:cox`` in the ``xgboost`` recipe: survival times through the data path, the federated model
against XGBoost on the pooled rows with one Cox stratum per site, and the C-index (exact per site, from a
securely summed histogram for the federation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedhealth.data import SchemaError, TabularDataset, open_dataset
from fedhealth.learning import (
    XGBOOST_RECIPE,
    InMemorySession,
    RecipeParamsError,
    SessionContext,
    XGBoostParams,
    resolve_recipe,
    train_pooled_xgboost,
    train_site_xgboost,
)
from fedhealth.learning._survival import cindex_from_histogram, concordance_histogram, harrell_c

SITES = ["a", "b", "c"]
TIME_RANGE = (0.0, 20.0)


def _survival_site(seed: int, rows: int = 150) -> TabularDataset:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 4))
    hazard = np.exp(0.8 * X[:, 0] - 0.5 * X[:, 1]) * (1 + seed / 4)  # each site its own baseline
    event_time = rng.exponential(1 / hazard) * 3
    censor = rng.uniform(0, 6, size=rows)
    time = np.round(np.minimum(event_time, censor), 3) + 0.001
    event = (event_time <= censor).astype(np.int64)
    cut = rows * 2 // 3
    return TabularDataset(
        name=f"site{seed}",
        X_train=X[:cut],
        y_train=event[:cut],
        X_test=X[cut:],
        y_test=event[cut:],
        feature_names=("x0", "x1", "x2", "x3"),
        time_train=time[:cut],
        time_test=time[cut:],
    )


@pytest.fixture(scope="module")
def sites() -> list[TabularDataset]:
    return [_survival_site(i) for i in range(3)]


PARAMS = XGBoostParams(
    n_features=4,
    objective="survival:cox",
    num_rounds=8,
    max_depth=3,
    learning_rate=0.3,
    time_range=TIME_RANGE,
)


def test_federated_cox_equals_xgboost_on_the_pooled_rows_with_one_stratum_per_site(sites):
    session = InMemorySession(SITES, call_timeout_s=60)
    runs = session.run(lambda m: train_site_xgboost(PARAMS, sites[SITES.index(m.site)], m))
    federated = runs["a"][0]
    assert all(model == federated for model, _ in runs.values())
    pooled = train_pooled_xgboost(PARAMS, sites)
    trees = json.loads(federated.model_json)["learner"]["gradient_booster"]["model"]["trees"]
    pooled_trees = json.loads(pooled.model_json)["learner"]["gradient_booster"]["model"]["trees"]
    assert len(trees) == 8
    # the same splits on the same features; leaf values within a float32 step or so: the reference recomputes
    # XGBoost's Cox gradient in Python (same operations, not bit for bit)
    for ours, theirs in zip(trees, pooled_trees, strict=True):
        for key in ("split_indices", "left_children", "right_children", "default_left"):
            assert ours[key] == theirs[key]
        assert np.allclose(ours["base_weights"], theirs["base_weights"], rtol=0, atol=1e-6)
    X = np.concatenate([s.X_test for s in sites])
    assert np.allclose(federated.margin(X), pooled.margin(X), rtol=0, atol=1e-5)  # log hazard ratios


def test_the_session_releases_exact_per_site_c_indices_and_a_close_federation_c_index(sites):
    session = InMemorySession(SITES, call_timeout_s=60)
    recipe = resolve_recipe("xgboost", "1", PARAMS.model_dump(mode="json"))

    def program(member):
        ctx = SessionContext(site=member.site, seed=0, rng=np.random.default_rng(0))
        return XGBOOST_RECIPE.run_site(recipe.params, sites[SITES.index(member.site)], member, ctx)

    session.run(program)
    result = XGBOOST_RECIPE.finish(PARAMS, session.relay.released)
    model = train_pooled_xgboost(PARAMS, sites)
    for site, data in zip(SITES, sites, strict=True):
        exact = harrell_c(data.time_test, data.y_test, np.log(model.predict(data.X_test)))
        assert result["c_index_sites"][site] == pytest.approx(exact, abs=1e-9)
    time = np.concatenate([s.time_test for s in sites])
    event = np.concatenate([s.y_test for s in sites])
    risk = np.log(np.concatenate([model.predict(s.X_test) for s in sites]))
    pooled = harrell_c(time, event, risk)
    assert 0.6 < pooled < 1  # the model learned something
    assert result["c_index"] == pytest.approx(pooled, abs=0.02)  # the grid's approximation
    assert result["test_rows"] == len(time)
    assert result["events"] == int(event.sum())


def test_the_histogram_c_index_is_exact_when_no_two_rows_share_a_cell():
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    event = np.array([1, 0, 1, 1, 0])
    risk = np.array([2.0, -1.0, 1.0, -2.0, 0.0])
    summed = concordance_histogram(time, event, risk, time_range=(0, 6), score_range=(-3, 3), cells=64)
    assert cindex_from_histogram(summed, 64) == pytest.approx(harrell_c(time, event, risk))


def test_survival_times_come_through_a_csv_as_the_time_column(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["x1,x2,months,died"]
    for _ in range(40):
        lines.append(f"{rng.normal():.3f},{rng.normal():.3f},{rng.uniform(1, 60):.1f},{rng.integers(0, 2)}")
    path = tmp_path / "cohort.csv"
    path.write_text("\n".join(lines) + "\n")
    data = open_dataset(f"file://{path}?label=died&time=months")
    assert data.feature_names == ("x1", "x2")  # the time column is not a feature
    assert data.survival
    assert data.time_train is not None
    assert data.time_train.shape == data.y_train.shape
    path.write_text("\n".join([*lines[:3], "0.1,0.2,-4,1", *lines[3:]]) + "\n")
    with pytest.raises(SchemaError, match="time column 'months' holds -4; survival times must be positive"):
        open_dataset(f"file://{path}?label=died&time=months")


def test_cox_on_a_dataset_without_survival_times_is_refused_before_any_collective(sites):
    plain = TabularDataset(
        name="plain",
        X_train=sites[0].X_train,
        y_train=sites[0].y_train,
        X_test=sites[0].X_test,
        y_test=sites[0].y_test,
        feature_names=sites[0].feature_names,
    )

    class NoCalls:
        site, sites = "a", ("a",)

        def secure_sum(self, values):
            raise AssertionError("nothing may be summed before the labels are checked")

    with pytest.raises(SchemaError, match="has no survival time: survival:cox needs a time column") as err:
        train_site_xgboost(PARAMS, plain, NoCalls())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"objective": "survival:cox"}, "survival:cox needs time_range"),
        (
            {"objective": "survival:cox", "time_range": [0, 10], "early_stopping_rounds": 3},
            "survival:cox takes no early_stopping_rounds",
        ),
        ({"objective": "survival:cox", "time_range": [5, 1]}, "time_range must have low < high"),
    ],
)
def test_bad_cox_params_are_one_line(params, problem):
    with pytest.raises(RecipeParamsError, match=problem) as err:
        resolve_recipe("xgboost", "1", {"n_features": 4, **params})
    assert "\n" not in str(err.value)
