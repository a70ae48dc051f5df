"""Feature importance of a federated boosting model: each feature's total gain and number of splits, read off
the released trees at the orchestrator (``finish``), in the model package's metadata and in the study report;
checked against the trees themselves, not against the library's own importance call that computes it."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pytest

from fedhealth.data import TabularDataset
from fedhealth.learning import (
    LIGHTGBM_RECIPE,
    XGBOOST_RECIPE,
    InMemorySession,
    LightGbmModel,
    LightGbmParams,
    XGBoostParams,
    train_site,
    train_site_xgboost,
)
from fedhealth.orchestrator._report import report_markdown

SITES = ["site-0", "site-1", "site-2", "site-3"]
FEATURES = ("age", "lactate", "noise_a", "heart_rate", "noise_b")


def _sites() -> list[TabularDataset]:
    """Four sites of synthetic rows (no one's data): the label follows lactate strongly, heart rate weakly;
    the two noise columns carry nothing."""
    rng = np.random.default_rng(5)
    out = []
    for s, site in enumerate(SITES):
        X = rng.normal(size=(240, len(FEATURES))) + 0.2 * s
        score = 2.0 * X[:, 1] + 0.5 * X[:, 3] + rng.normal(scale=0.5, size=240)
        y = (score > np.median(score)).astype(np.int64)
        out.append(
            TabularDataset(
                name=site,
                X_train=X[:180],
                y_train=y[:180],
                X_test=X[180:],
                y_test=y[180:],
                feature_names=FEATURES,
            )
        )
    return out


@pytest.fixture(scope="module")
def sites() -> list[TabularDataset]:
    return _sites()


def _released(recipe: Any, train: Any, params: Any, datasets: list[TabularDataset]) -> dict[str, Any]:
    """The study's result as the orchestrator reads it: every site's program in memory, then ``finish`` on
    what the leader broadcast."""
    session = InMemorySession(SITES, call_timeout_s=60)
    runs = session.run(lambda m: train(params, datasets[SITES.index(m.site)], m))
    model = runs[SITES[0]][0]
    text = model.model_text if isinstance(model, LightGbmModel) else model.model_json
    released = json.dumps({"model": text, "binning": model.binning.to_json(), "trees": 0}).encode()
    return dict(recipe.finish(params, released))


def _lightgbm_truth(model_text: str) -> tuple[dict[str, float], Counter[str]]:
    """Total split gain and split count per feature, walking LightGBM's own dump of the trees."""
    model = LightGbmModel(model_text=model_text, binning=None)  # type: ignore[arg-type]
    dump = model.booster().dump_model()
    gains: dict[str, float] = {}
    counts: Counter[str] = Counter()

    def walk(node: dict[str, Any]) -> None:
        if "split_feature" not in node:
            return
        name = FEATURES[node["split_feature"]]
        gains[name] = gains.get(name, 0.0) + float(node["split_gain"])
        counts[name] += 1
        walk(node["left_child"])
        walk(node["right_child"])

    for tree in dump["tree_info"]:
        walk(tree["tree_structure"])
    return gains, counts


def _xgboost_truth(model_json: str) -> tuple[dict[str, float], Counter[str]]:
    """The same from XGBoost's JSON trees: ``loss_changes`` of every split node, by ``split_indices``."""
    trees = json.loads(model_json)["learner"]["gradient_booster"]["model"]["trees"]
    gains: dict[str, float] = {}
    counts: Counter[str] = Counter()
    for tree in trees:
        for node, left in enumerate(tree["left_children"]):
            if left == -1:
                continue
            name = FEATURES[tree["split_indices"][node]]
            gains[name] = gains.get(name, 0.0) + float(tree["loss_changes"][node])
            counts[name] += 1
    return gains, counts


def _check(importance: list[dict[str, Any]], gains: dict[str, float], counts: Counter[str]) -> None:
    assert [f["feature"] for f in importance] == sorted(
        FEATURES, key=lambda n: (-gains.get(n, 0.0), FEATURES.index(n))
    )
    for f in importance:
        assert FEATURES[f["index"]] == f["feature"]
        assert f["splits"] == counts[f["feature"]]
        assert f["total_gain"] == pytest.approx(gains.get(f["feature"], 0.0), rel=1e-6, abs=1e-9)
    # the rule that made the labels: lactate first, heart rate second
    assert [f["feature"] for f in importance[:2]] == ["lactate", "heart_rate"]


def test_lightgbm_importance_is_the_gain_and_count_of_the_released_trees_splits(sites):
    params = LightGbmParams(
        n_features=5, feature_names=FEATURES, num_rounds=12, num_leaves=8, value_range=(-5, 5)
    )
    result = _released(LIGHTGBM_RECIPE, train_site, params, sites)
    _check(result["feature_importance"], *_lightgbm_truth(result["model"]))
    # the package's metadata carries the same figures
    assert (
        LIGHTGBM_RECIPE.export(params, result).metadata["feature_importance"] == result["feature_importance"]
    )


def test_xgboost_importance_is_the_gain_and_count_of_the_released_trees_splits(sites):
    params = XGBoostParams(
        n_features=5, feature_names=FEATURES, num_rounds=10, max_depth=3, value_range=(-5, 5)
    )
    result = _released(XGBOOST_RECIPE, train_site_xgboost, params, sites)
    gains, counts = _xgboost_truth(result["model"])
    _check(result["feature_importance"], gains, counts)
    assert (
        XGBOOST_RECIPE.export(params, result).metadata["feature_importance"] == result["feature_importance"]
    )


def test_without_feature_names_the_features_are_named_by_their_input_position(sites):
    params = LightGbmParams(n_features=5, num_rounds=4, num_leaves=4, value_range=(-5, 5))
    result = _released(LIGHTGBM_RECIPE, train_site, params, sites)
    assert result["feature_importance"][0]["feature"] == "x1"  # lactate's column
    assert sorted(f["feature"] for f in result["feature_importance"]) == [f"x{j}" for j in range(5)]


def test_the_orchestrator_reads_the_importance_off_the_model_not_off_the_leaders_broadcast(sites):
    params = LightGbmParams(
        n_features=5, feature_names=FEATURES, num_rounds=4, num_leaves=4, value_range=(-5, 5)
    )
    honest = _released(LIGHTGBM_RECIPE, train_site, params, sites)
    lie = [{"feature": "noise_a", "index": 2, "total_gain": 1e9, "splits": 99}]
    released = json.dumps({**honest, "feature_importance": lie}).encode()
    assert LIGHTGBM_RECIPE.finish(params, released)["feature_importance"] == honest["feature_importance"]


@pytest.mark.parametrize(
    ("recipe", "params"),
    [
        (LIGHTGBM_RECIPE, LightGbmParams(n_features=5, num_rounds=2)),
        (XGBOOST_RECIPE, XGBoostParams(n_features=5, num_rounds=2)),
    ],
)
def test_a_released_model_the_library_cannot_read_fails_the_result_in_one_line(
    recipe, params, sites, tmp_path
):
    binning = {"low": [-5.0] * 5, "high": [5.0] * 5, "grid_cells": 4, "starts": [[0, 2]] * 5}
    released = json.dumps({"model": "tree\nnot a model at " + str(tmp_path), "binning": binning}).encode()
    with pytest.raises(ValueError, match="released a model") as info:
        recipe.finish(params, released)
    assert "\n" not in str(info.value)
    assert str(tmp_path) not in str(info.value)


def test_the_study_report_shows_the_session_result_and_the_features_by_gain(sites):
    params = LightGbmParams(
        n_features=5, feature_names=FEATURES, num_rounds=6, num_leaves=6, value_range=(-5, 5)
    )
    result = _released(LIGHTGBM_RECIPE, train_site, params, sites)
    report = {
        "study_id": "s1",
        "name": "sepsis-gbdt",
        "status": "completed",
        "reason": None,
        "spec": {"dataset": "d", "recipe": {"name": "lightgbm"}, "strategy": {"name": "fedavg"}, "rounds": 1},
        "completed_rounds": 1,
        "wall_time_s": 1.0,
        "final_model_digest": "ab" * 32,
        "rounds": [],
        "evaluation": None,
        "collective": {
            "number": 1,
            "status": "completed",
            "reason": None,
            "duration_s": 1.0,
            "result": {k: v for k, v in result.items() if k not in ("model", "binning")},
        },
        "privacy": None,
    }
    text = report_markdown(report)
    table = text.split("### Feature importance")[1].splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| feature")]
    assert [row.split(" | ")[0][2:] for row in rows] == [f["feature"] for f in result["feature_importance"]]
    assert "lactate" in rows[0]
    assert "- trees: 0" in text  # the session's scalar figures
