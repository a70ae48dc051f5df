"""Early stopping of the boosting recipes on a securely summed validation loss: the sites' (loss sum, rows)
on their test parts, summed after each round, the library's own rule, and the model of the best round."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from fedhealth.data import SchemaError, TabularDataset
from fedhealth.learning import (
    InMemorySession,
    LightGbmParams,
    RecipeParamsError,
    XGBoostParams,
    resolve_recipe,
    train_pooled,
    train_pooled_xgboost,
    train_site,
    train_site_xgboost,
)
from fedhealth.learning._boosting import EarlyStopping

SITES = ["center-0", "center-1", "center-2", "center-3"]


@pytest.fixture(scope="module")
def centers(heart_centers) -> list[Any]:
    return heart_centers


def _run(train: Any, params: Any, datasets: list[Any]) -> dict[str, Any]:
    session = InMemorySession(SITES, call_timeout_s=60)
    return session.run(lambda m: train(params, datasets[SITES.index(m.site)], m))


def test_the_rule_is_the_libraries_strict_improvement_with_patience():
    rule = EarlyStopping(rounds=2)
    steps = [rule.update(s, 1.0) for s in (3.0, 2.0, 2.0, 1.5, 1.6, 1.5)]
    assert steps == [False, False, False, False, False, True]  # 1.5 again is no improvement
    assert rule.best_iteration == 4


def test_federated_lightgbm_stops_where_lightgbm_stops_on_the_pooled_rows(centers):
    # a learning rate this high overfits Fed-Heart-Disease within a few rounds: the loss must turn
    params = LightGbmParams(n_features=13, num_rounds=200, learning_rate=0.5, early_stopping_rounds=5)
    runs = _run(train_site, params, centers)
    (model, calls), *others = runs.values()
    assert all(m.model_text == model.model_text for m, _ in others)  # every site stopped at the same tree
    best = calls["best_iteration"]
    assert best >= 1
    assert calls["stopping"] == best + 5 < 200
    assert model.booster().num_trees() == best
    pooled = train_pooled(params, centers)
    assert model.model_text.split("end of trees")[0] == pooled.model_text.split("end of trees")[0]


def test_federated_xgboost_stops_where_xgboost_stops_on_the_pooled_rows(centers):
    params = XGBoostParams(n_features=13, num_rounds=200, learning_rate=0.8, early_stopping_rounds=4)
    runs = _run(train_site_xgboost, params, centers)
    (model, calls), *others = runs.values()
    assert all(m.model_json == model.model_json for m, _ in others)
    best = calls["best_iteration"]
    assert calls["stopping"] == best + 4 < 200
    pooled = train_pooled_xgboost(params, centers)
    trees = json.loads(model.model_json)["learner"]["gradient_booster"]["model"]["trees"]
    pooled_trees = json.loads(pooled.model_json)["learner"]["gradient_booster"]["model"]["trees"]
    assert len(trees) == best
    assert trees == pooled_trees
    X = np.concatenate([c.X_test for c in centers])
    assert np.array_equal(model.predict(X), pooled.predict(X))


@pytest.mark.parametrize("recipe", ["lightgbm", "xgboost"])
def test_early_stopping_without_any_validation_rows_is_refused_before_training(centers, recipe):
    bare = [
        TabularDataset(
            name=c.name,
            X_train=c.X_train,
            y_train=c.y_train,
            X_test=c.X_test[:0],
            y_test=c.y_test[:0],
            feature_names=c.feature_names,
        )
        for c in centers
    ]
    train = train_site if recipe == "lightgbm" else train_site_xgboost
    params_model = LightGbmParams if recipe == "lightgbm" else XGBoostParams
    params = params_model(n_features=13, num_rounds=5, early_stopping_rounds=2)
    with pytest.raises(SchemaError, match=r"^early_stopping_rounds needs a validation part") as err:
        _run(train, params, bare)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("recipe", ["lightgbm", "xgboost"])
def test_early_stopping_rounds_out_of_range_is_one_line(recipe):
    with pytest.raises(RecipeParamsError, match="early_stopping_rounds: Input should be greater") as err:
        resolve_recipe(recipe, "1", {"n_features": 13, "early_stopping_rounds": 0})
    assert "\n" not in str(err.value)
