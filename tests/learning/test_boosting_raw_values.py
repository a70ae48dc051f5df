"""Boosting on raw values (``preprocessing.standardize = "none"``): each site's connector standardizes with
the site's own statistics by default, so the same threshold would mean another lactate level at every
hospital. With the parameter every site undoes its standardization before the bins are counted: the trees
read the same units everywhere, the federated model is the library's own on the pooled raw rows, and the
model package takes raw rows (no ``assume_standardized``), its ONNX file too."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime
import pandas as pd
import pytest

import fedhealth
from fedhealth.core import canonical_json
from fedhealth.data import Scaling, TabularDataset
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
    write_package,
)
from fedhealth.learning._package import PackageInputError
from fedhealth.learning._preprocessing import Preprocessing
from support import package_origin

SITES = ["site-0", "site-1", "site-2", "site-3"]
NAMES = ("age", "lactate", "heart_rate")
RANGES = ((0.0, 110.0), (0.0, 20.0), (20.0, 220.0))  # public, in the features' own units
RAW = Preprocessing(standardize="none")


def _raw_sites() -> list[tuple[np.ndarray, np.ndarray]]:
    """Raw rows (no one's data) of four hospitals whose patients differ: older, sicker or calmer."""
    rng = np.random.default_rng(17)
    out = []
    for s in range(len(SITES)):
        n = 160
        age = rng.normal(55 + 6 * s, 12, n).clip(18, 100)
        lactate = rng.gamma(2.0 + 0.5 * s, 1.0, n).clip(0.2, 18)
        hr = rng.normal(85 + 5 * s, 15, n).clip(35, 200)
        X = np.column_stack([age, lactate, hr])
        risk = 0.04 * (age - 60) + 0.8 * (lactate - 2.5) + 0.02 * (hr - 90) + rng.normal(0, 0.8, n)
        out.append((X, (risk > 0).astype(np.int64)))
    return out


def _dataset(site: int, X: np.ndarray, y: np.ndarray, *, standardized: bool) -> TabularDataset:
    """The site's dataset as its connector gives it: by default standardized with the site's own training
    statistics (``scaling`` kept), else raw."""
    cut = 120
    scaling = None
    if standardized:
        mean, std = X[:cut].mean(axis=0), X[:cut].std(axis=0, ddof=1)
        scaling = Scaling(mean=mean, std=std)
        X = (X - mean) / std
    return TabularDataset(
        name=SITES[site],
        X_train=X[:cut],
        y_train=y[:cut],
        X_test=X[cut:],
        y_test=y[cut:],
        feature_names=NAMES,
        scaling=scaling,
    )


@pytest.fixture(scope="module")
def raw_rows() -> list[tuple[np.ndarray, np.ndarray]]:
    return _raw_sites()


@pytest.fixture(scope="module")
def standardized(raw_rows) -> list[TabularDataset]:
    return [_dataset(s, X, y, standardized=True) for s, (X, y) in enumerate(raw_rows)]


@pytest.fixture(scope="module")
def raw(raw_rows) -> list[TabularDataset]:
    return [_dataset(s, X, y, standardized=False) for s, (X, y) in enumerate(raw_rows)]


def _federated(train: Any, params: Any, datasets: list[TabularDataset]) -> Any:
    session = InMemorySession(SITES, call_timeout_s=60)
    runs = session.run(lambda m: train(params, datasets[SITES.index(m.site)], m))
    texts = {getattr(model, "model_text", None) or model.model_json for model, _ in runs.values()}
    assert len(texts) == 1  # every site ends with the same model
    return runs[SITES[0]][0]


CASES = [
    (
        "lightgbm",
        train_site,
        train_pooled,
        LightGbmParams,
        {"num_rounds": 12, "num_leaves": 8},
        lambda m: m.model_text.split("end of trees")[0],
    ),
    (
        "xgboost",
        train_site_xgboost,
        train_pooled_xgboost,
        XGBoostParams,
        {"num_rounds": 10, "max_depth": 3},
        lambda m: m.model_json,
    ),
]


@pytest.mark.parametrize(
    ("recipe", "train", "pooled", "params_of", "extra", "trees"), CASES, ids=["lgb", "xgb"]
)
def test_on_raw_values_the_federated_model_is_the_librarys_on_the_pooled_raw_rows(
    standardized, raw, recipe, train, pooled, params_of, extra, trees
):
    params = params_of(n_features=3, feature_names=NAMES, feature_ranges=RANGES, preprocessing=RAW, **extra)
    federated = _federated(train, params, standardized)  # every site's connector standardized its rows
    # the library on one machine on the hospitals' raw rows, pooled: the same trees, in the same units
    plain = params.model_copy(update={"preprocessing": None})
    reference = pooled(plain, raw)
    assert trees(federated) == trees(reference)
    X = np.concatenate([d.X_test for d in raw])
    assert np.array_equal(federated.predict(X), reference.predict(X))
    # the control: without the parameter each site's trees read its own standardized units (another model)
    per_site = _federated(train, plain, standardized)
    assert trees(per_site) != trees(reference)


@pytest.mark.parametrize(
    ("recipe", "train", "pooled", "params_of", "extra", "trees"), CASES, ids=["lgb", "xgb"]
)
def test_a_raw_value_model_package_takes_raw_rows_and_its_onnx_file_too(
    standardized, raw, tmp_path, recipe, train, pooled, params_of, extra, trees
):
    params = params_of(n_features=3, feature_names=NAMES, feature_ranges=RANGES, preprocessing=RAW, **extra)
    model = pooled(params, standardized)
    text = model.model_text if recipe == "lightgbm" else model.model_json
    result = {"model": text, "binning": model.binning.to_json()}
    export = (LIGHTGBM_RECIPE if recipe == "lightgbm" else XGBOOST_RECIPE).export(params, result)
    assert export.metadata["preprocessing"]["standardize"] == "none"
    spec = {"name": "s", "recipe": {"name": recipe, "version": "1", "params": params.model_dump(mode="json")}}
    weights = canonical_json(result)
    out = tmp_path / "package"
    write_package(out, export=export, weights=weights, origin=package_origin(spec, weights), collective=True)
    package = fedhealth.load_model(out)
    X = np.concatenate([d.X_test for d in raw])  # raw rows, as a hospital's system holds them
    frame = pd.DataFrame(X[:, ::-1], columns=list(NAMES)[::-1])
    ours = package.predict_proba(frame)  # no assume_standardized: the package knows its rows are raw
    assert np.array_equal(ours, model.predict(X))
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"features": X})[-1][:, 1], ours, rtol=0, atol=1e-5)
    # a package of per-site standardized rows still refuses raw rows unless told they are standardized
    plain = params.model_copy(update={"preprocessing": None})
    plain_export = (LIGHTGBM_RECIPE if recipe == "lightgbm" else XGBOOST_RECIPE).export(plain, result)
    assert plain_export.metadata["preprocessing"]["standardize"] == "site"
    out2 = tmp_path / "site-package"
    spec2 = {"name": "s", "recipe": {"name": recipe, "version": "1", "params": plain.model_dump(mode="json")}}
    write_package(
        out2, export=plain_export, weights=weights, origin=package_origin(spec2, weights), collective=True
    )
    with pytest.raises(PackageInputError, match="standardiz"):
        fedhealth.load_model(out2).predict_proba(frame)


@pytest.mark.parametrize("params_of", [LightGbmParams, XGBoostParams], ids=["lgb", "xgb"])
@pytest.mark.parametrize(
    ("preprocessing", "names", "message"),
    [
        (
            {"standardize": "given", "mean": [0, 0, 0], "scale": [1, 1, 1]},
            NAMES,
            "boosting takes 'none' only",
        ),
        ({"standardize": "federated"}, NAMES, "boosting takes 'none' only"),
        ({"standardize": "none"}, None, "needs feature_names"),
    ],
)
def test_a_preprocessing_boosting_cannot_take_is_one_line(params_of, preprocessing, names, message):
    with pytest.raises(ValueError, match=message):
        params_of(n_features=3, feature_names=names, preprocessing=preprocessing)


def test_the_steward_reads_that_raw_values_are_used():
    params = LightGbmParams(n_features=3, feature_names=NAMES, feature_ranges=RANGES, preprocessing=RAW)
    assert "raw scale" in LIGHTGBM_RECIPE.describe(params)
    assert "raw scale" not in LIGHTGBM_RECIPE.describe(params.model_copy(update={"preprocessing": None}))
