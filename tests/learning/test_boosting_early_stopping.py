"""Early stopping of the boosting recipes on a securely summed validation metric: the sites' (loss sum, rows)
on their test parts, or their test rows counted per label and score cell (AUC), summed after each round, the
library's own rule, and the model of the best round."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

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
from fedhealth.learning._boosting import (
    AUC_MARGIN_RANGE,
    EarlyStopping,
    auc_cells_of,
    auc_from_counts,
    auc_pieces,
)

SITES = ["center-0", "center-1", "center-2", "center-3"]


def _with_test_rows(center: TabularDataset, keep: Any) -> TabularDataset:
    """The center with every training row and only the test rows ``keep`` marks."""
    return center.select(np.ones(center.num_train, dtype=bool), keep)


def _run(train: Any, params: Any, datasets: list[Any]) -> dict[str, Any]:
    session = InMemorySession(SITES, call_timeout_s=60)
    return session.run(lambda m: train(params, datasets[SITES.index(m.site)], m))


def test_the_rule_is_the_libraries_strict_improvement_with_patience():
    rule = EarlyStopping(rounds=2)
    steps = [rule.update(np.array([s * 4, 4.0])) for s in (3.0, 2.0, 2.0, 1.5, 1.6, 1.5)]
    assert steps == [False, False, False, False, False, True]  # 1.5 again is no improvement
    assert rule.best_iteration == 4
    assert rule.scores == [3.0, 2.0, 2.0, 1.5, 1.6, 1.5]  # the mean loss: the summed loss over the rows


def test_on_auc_the_rule_keeps_the_highest_and_stops_after_the_patience():
    rule = EarlyStopping(rounds=2, metric="auc", auc_cells=10)
    steps = [rule.record(s) for s in (0.6, 0.7, 0.7, 0.75, 0.74, 0.75)]
    assert steps == [False, False, False, False, False, True]  # 0.75 again is no improvement
    assert rule.best_iteration == 4
    resumed = EarlyStopping(rounds=2, metric="auc", auc_cells=10)
    assert resumed.replay(rule.scores[:5]) is False
    assert (resumed.best, resumed.best_iteration) == (0.75, 4)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 39), st.booleans()), min_size=2, max_size=80).filter(
        lambda rows: len({label for _, label in rows}) == 2
    )
)
def test_the_auc_of_the_summed_counts_is_the_exact_auc_when_a_cell_holds_equal_scores(rows):
    # scores at the centres of the grid's cells (ties included): the counts lose nothing, so the AUC from
    # the sites' summed counts is the pooled rows' exact AUC, whichever site holds which row
    cells = 40
    width = 2 * AUC_MARGIN_RANGE / cells
    margins = np.array([-AUC_MARGIN_RANGE + (c + 0.5) * width for c, _ in rows])
    y = np.array([int(label) for _, label in rows])
    assert np.array_equal(auc_cells_of(margins, cells), [c for c, _ in rows])
    sites = np.arange(len(rows)) % 3
    summed = sum(auc_pieces(margins[sites == s], y[sites == s], cells) for s in range(3))
    assert auc_from_counts(summed) == pytest.approx(roc_auc_score(y, margins), abs=1e-12)


def test_the_auc_of_the_counts_errs_at_most_half_a_pair_per_mixed_pair_in_a_cell():
    rng = np.random.default_rng(7)
    margins = rng.normal(scale=3.0, size=500)
    y = (margins + rng.normal(scale=2.0, size=500) > 0).astype(int)
    for cells in (20, 200, 2000):
        counts = auc_pieces(margins, y, cells)
        negatives, positives = counts.reshape(2, -1)
        mixed = float(negatives @ positives)  # (positive, negative) pairs sharing a cell
        bound = 0.5 * mixed / (negatives.sum() * positives.sum())
        error = abs(auc_from_counts(counts) - roc_auc_score(y, margins))
        assert error <= bound + 1e-12
    assert bound < 0.001  # at the default's resolution the counts give the AUC to three places here
    assert np.isnan(auc_from_counts(auc_pieces(margins, np.ones(500), 100)))  # one label: no AUC


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


@pytest.mark.parametrize(("recipe", "rate", "patience"), [("lightgbm", 0.5, 4), ("xgboost", 0.3, 3)])
def test_federated_boosting_stops_on_the_auc_where_the_library_stops_on_the_pooled_rows(
    centers, recipe, rate, patience
):
    # rates and patiences at which the library stops elsewhere on its loss than on its AUC
    train, pooled_train, params_model = {
        "lightgbm": (train_site, train_pooled, LightGbmParams),
        "xgboost": (train_site_xgboost, train_pooled_xgboost, XGBoostParams),
    }[recipe]
    common = {"n_features": 13, "num_rounds": 200, "learning_rate": rate, "early_stopping_rounds": patience}
    params = params_model(**common, early_stopping_metric="auc")
    runs = _run(train, params, centers)
    (model, calls), *others = runs.values()
    assert all(m == model for m, _ in others)  # every site stopped at the same tree
    best = calls["best_iteration"]
    assert best >= 1
    assert calls["stopping"] == best + patience < 200
    X = np.concatenate([c.X_test for c in centers])
    pooled = pooled_train(params, centers)
    assert np.array_equal(model.predict(X), pooled.predict(X))  # the library's own stop on its own AUC
    on_loss = pooled_train(params_model(**common), centers)
    assert not np.array_equal(on_loss.predict(X), model.predict(X))  # not the stop on the loss


@pytest.mark.parametrize("recipe", ["lightgbm", "xgboost"])
def test_auc_stopping_with_test_parts_of_one_label_only_is_refused_before_training(centers, recipe):
    negatives_only = [_with_test_rows(c, c.y_test == 0) for c in centers]
    train = train_site if recipe == "lightgbm" else train_site_xgboost
    params_model = LightGbmParams if recipe == "lightgbm" else XGBoostParams
    params = params_model(n_features=13, num_rounds=5, early_stopping_rounds=2, early_stopping_metric="auc")
    with pytest.raises(
        SchemaError, match=r"^early_stopping_metric auc needs held-out \(test\) rows of both"
    ) as err:
        _run(train, params, negatives_only)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("recipe", "params", "message"),
    [
        (
            "lightgbm",
            {"objective": "multiclass", "num_class": 3, "early_stopping_rounds": 2},
            "is for binary",
        ),
        ("lightgbm", {"objective": "regression", "early_stopping_rounds": 2}, "is for binary"),
        ("xgboost", {"objective": "reg:squarederror", "early_stopping_rounds": 2}, "is for binary"),
        ("lightgbm", {}, "applies with early_stopping_rounds"),
        ("xgboost", {}, "applies with early_stopping_rounds"),
    ],
)
def test_auc_stopping_outside_a_binary_study_with_stopping_is_one_line(recipe, params, message):
    with pytest.raises(RecipeParamsError, match=message) as err:
        resolve_recipe(recipe, "1", {"n_features": 13, "early_stopping_metric": "auc", **params})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("recipe", ["lightgbm", "xgboost"])
def test_early_stopping_without_any_validation_rows_is_refused_before_training(centers, recipe):
    bare = [_with_test_rows(c, np.zeros(c.num_test, dtype=bool)) for c in centers]
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
