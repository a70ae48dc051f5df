"""Boosting on a label of more than two classes (a triage level): the sites' datasets declare the classes
(``classes=K`` in a tabular URI), a study's multiclass objective names as many, and the federated model is
the library's own on the pooled rows, bit for bit; every other study refuses such a dataset in one line."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest

from fedhealth.data import SchemaError, TabularDataset
from fedhealth.learning import (
    LIGHTGBM_RECIPE,
    XGBOOST_RECIPE,
    InMemorySession,
    LightGbmParams,
    XGBoostParams,
    train_pooled,
    train_pooled_xgboost,
    train_site,
    train_site_xgboost,
)

SITES = ["site-0", "site-1", "site-2", "site-3"]
FEATURES = tuple(f"x{j}" for j in range(6))


def _triage_sites(classes: int = 3) -> list[TabularDataset]:
    """Four sites of synthetic rows (no one's data) whose label is a level 0..classes-1 of a noisy score;
    the sites' rows differ in distribution."""
    rng = np.random.default_rng(11)
    out = []
    for s in range(len(SITES)):
        X = rng.normal(size=(260, len(FEATURES))) + 0.25 * s
        score = X[:, 0] + 0.6 * X[:, 1] - 0.4 * X[:, 2] + rng.normal(scale=0.6, size=260)
        y = np.digitize(score, np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1]))
        out.append(
            TabularDataset(
                name=SITES[s],
                X_train=X[:200],
                y_train=y[:200],
                X_test=X[200:],
                y_test=y[200:],
                feature_names=FEATURES,
                classes=classes,
            )
        )
    return out


@pytest.fixture(scope="module")
def sites() -> list[TabularDataset]:
    return _triage_sites()


def _run(train: Any, params: Any, datasets: list[TabularDataset]) -> dict[str, Any]:
    session = InMemorySession(SITES, call_timeout_s=60)
    return session.run(lambda m: train(params, datasets[SITES.index(m.site)], m))


def test_federated_lightgbm_on_three_classes_is_lightgbm_on_the_pooled_rows(sites):
    params = LightGbmParams(
        n_features=6, objective="multiclass", num_class=3, num_rounds=15, num_leaves=8, value_range=(-6, 6)
    )
    LIGHTGBM_RECIPE.data_schema(params).check(sites[0])  # the dataset fits the study
    runs = _run(train_site, params, sites)
    assert len({model.model_text for model, _ in runs.values()}) == 1
    federated = runs[SITES[0]][0]
    pooled = train_pooled(params, sites)
    assert federated.model_text.split("end of trees")[0] == pooled.model_text.split("end of trees")[0]
    X = np.concatenate([s.X_test for s in sites])
    out = federated.predict(X)
    assert out.shape == (len(X), 3)
    assert np.array_equal(out, pooled.predict(X))
    assert set(np.argmax(out, axis=1).tolist()) == {0, 1, 2}  # the model tells the three levels apart


def test_federated_xgboost_on_three_classes_is_xgboost_on_the_pooled_rows(sites):
    params = XGBoostParams(
        n_features=6, objective="multi:softprob", num_class=3, num_rounds=15, max_depth=3, value_range=(-6, 6)
    )
    runs = _run(train_site_xgboost, params, sites)
    assert len({model.model_json for model, _ in runs.values()}) == 1
    federated = runs[SITES[0]][0]
    pooled = train_pooled_xgboost(params, sites)
    trees = json.loads(federated.model_json)["learner"]["gradient_booster"]["model"]["trees"]
    assert trees == json.loads(pooled.model_json)["learner"]["gradient_booster"]["model"]["trees"]
    X = np.concatenate([s.X_test for s in sites])
    assert federated.predict(X).shape == (len(X), 3)
    assert np.array_equal(federated.predict(X), pooled.predict(X))


@pytest.mark.parametrize(
    ("recipe", "params", "classes", "problem"),
    [
        ("lightgbm", {"objective": "binary"}, 3, "declares 3 label classes; the study's model is for 2"),
        (
            "xgboost",
            {"objective": "binary:logistic"},
            3,
            "declares 3 label classes; the study's model is for 2",
        ),
        ("lightgbm", {"objective": "multiclass", "num_class": 4}, 3, "the study's model is for 4"),
        ("xgboost", {"objective": "multi:softprob", "num_class": 3}, 2, "declares 2 label classes"),
        ("logreg", {}, 3, "declares 3 label classes; the study's model is for 2 (a binary label)"),
    ],
)
def test_a_dataset_of_other_label_classes_than_the_study_is_refused_in_one_line(
    recipe, params, classes, problem
):
    from fedhealth.learning import resolve_recipe

    dataset = _triage_sites(classes)[0]
    resolved = resolve_recipe(recipe, "1", {"n_features": 6, **params})
    with pytest.raises(SchemaError, match=re.escape(problem)) as err:
        resolved.data_schema().check(dataset)
    assert "\n" not in str(err.value)


def test_regression_boosting_takes_a_label_of_any_declared_classes(sites):
    LIGHTGBM_RECIPE.data_schema(LightGbmParams(n_features=6, objective="regression")).check(sites[0])
    XGBOOST_RECIPE.data_schema(XGBoostParams(n_features=6, objective="reg:squarederror")).check(sites[0])


def test_a_label_outside_the_declared_classes_is_refused_by_the_dataset():
    X = np.zeros((4, 1))
    with pytest.raises(Exception, match=r"y_train must hold only the labels 0 to 2 \(classes=3\)"):
        TabularDataset(
            name="d",
            X_train=X,
            y_train=np.array([0, 1, 2, 3]),
            X_test=X[:0],
            y_test=np.array([]),
            feature_names=("a",),
            classes=3,
        )
    with pytest.raises(Exception, match="classes must be an integer from 2 to 256"):
        TabularDataset(
            name="d",
            X_train=X,
            y_train=np.zeros(4),
            X_test=X[:0],
            y_test=np.array([]),
            feature_names=("a",),
            classes=1,
        )


@pytest.mark.parametrize("recipe", ["lightgbm", "xgboost"])
def test_a_three_class_model_exports_a_package_and_an_onnx_file_that_predict_alike(sites, tmp_path, recipe):
    import onnxruntime
    import pandas as pd

    import fedhealth
    from fedhealth.core import canonical_json
    from fedhealth.learning import write_package
    from support import package_origin

    full = {"n_features": 6, "feature_names": list(FEATURES), "num_rounds": 8, "value_range": [-6, 6]}
    if recipe == "lightgbm":
        full |= {"objective": "multiclass", "num_class": 3, "num_leaves": 6}
        params: Any = LightGbmParams(**full)
        model: Any = train_pooled(params, sites)
        result = {"model": model.model_text, "binning": model.binning.to_json()}
        export = LIGHTGBM_RECIPE.export(params, result)
    else:
        full |= {"objective": "multi:softprob", "num_class": 3, "max_depth": 3}
        params = XGBoostParams(**full)
        model = train_pooled_xgboost(params, sites)
        result = {"model": model.model_json, "binning": model.binning.to_json()}
        export = XGBOOST_RECIPE.export(params, result)
    assert export.onnx is not None
    spec = {"name": "s", "recipe": {"name": recipe, "version": "1", "params": full}}
    weights = canonical_json(result)
    out = tmp_path / "package"
    metadata = write_package(
        out, export=export, weights=weights, origin=package_origin(spec, weights), collective=True
    )
    assert "model.onnx" in metadata["files"]
    X = np.concatenate([s.X_test for s in sites])
    expected = model.predict(X)
    package = fedhealth.load_model(out)
    assert np.array_equal(
        package.predict(pd.DataFrame(X, columns=FEATURES), assume_standardized=True), expected
    )
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"features": X})[-1]
    assert probabilities.shape == (len(X), 3)
    assert np.allclose(probabilities, expected, rtol=0, atol=1e-5)


def test_descriptive_statistics_take_a_multi_class_dataset_unless_they_count_per_label(sites):
    from fedhealth.learning import resolve_recipe

    plain = resolve_recipe("stats", "1", {"features": ["x0"]}).data_schema()
    plain.check(sites[0])  # the label is not looked at
    per_label = resolve_recipe("stats", "1", {"features": ["x0"], "by_label": True}).data_schema()
    with pytest.raises(SchemaError, match="declares 3 label classes"):
        per_label.check(sites[0])
