"""Multiclass and regression boosting models as model packages: the library's own model file, the
metadata, and ``predict`` (class probabilities or values) from the package as from the model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

import fedhealth
from fedhealth.core import canonical_json
from fedhealth.learning import (
    LIGHTGBM_RECIPE,
    XGBOOST_RECIPE,
    LightGbmParams,
    XGBoostParams,
    train_pooled,
    train_pooled_xgboost,
    write_package,
)
from fedhealth.learning._package import PackageInputError
from support import package_origin


@pytest.mark.parametrize(
    ("recipe", "params", "onnx"),
    [
        ("lightgbm", {"objective": "binary", "num_rounds": 5, "num_leaves": 4}, True),
        ("lightgbm", {"objective": "multiclass", "num_class": 2, "num_rounds": 5, "num_leaves": 4}, True),
        ("lightgbm", {"objective": "regression", "num_rounds": 5, "num_leaves": 4}, True),
        ("xgboost", {"objective": "binary:logistic", "num_rounds": 5, "max_depth": 2}, True),
        ("xgboost", {"objective": "multi:softprob", "num_class": 2, "num_rounds": 5, "max_depth": 2}, False),
        ("xgboost", {"objective": "reg:squarederror", "num_rounds": 5, "max_depth": 2}, True),
    ],
    ids=[
        "lightgbm-binary",
        "lightgbm-multiclass",
        "lightgbm-regression",
        "xgboost-binary",
        "xgboost-multiclass",
        "xgboost-regression",
    ],
)
def test_boosting_models_export_as_packages_that_predict_like_the_model_with_onnx_where_it_converts(
    centers, tmp_path, recipe, params, onnx
):
    names = list(centers[0].feature_names)
    full = {"n_features": 13, "feature_names": names, **params}
    if recipe == "lightgbm":
        p: Any = LightGbmParams(**full)
        model = train_pooled(p, centers)
        result = {"model": model.model_text, "binning": model.binning.to_json()}
        export = LIGHTGBM_RECIPE.export(p, result)
    else:
        p = XGBoostParams(**full)
        model = train_pooled_xgboost(p, centers)
        result = {"model": model.model_json, "binning": model.binning.to_json()}
        export = XGBOOST_RECIPE.export(p, result)
    binary = params["objective"] in ("binary", "binary:logistic")
    assert (export.predict_proba is not None) == binary
    assert (export.predict is None) == binary
    assert (export.onnx is not None) == onnx
    spec = {"name": "s", "recipe": {"name": recipe, "version": "1", "params": full}}
    weights = canonical_json(result)
    origin = package_origin(spec, weights)
    out = tmp_path / "package"
    metadata = write_package(out, export=export, weights=weights, origin=origin, collective=True)
    native = "model.txt" if recipe == "lightgbm" else "model.json"
    assert set(metadata["files"]) == {"result.json", native, *(["model.onnx"] if onnx else [])}
    assert metadata["model"]["objective"] == p.objective
    X = np.concatenate([c.X_test for c in centers])
    package = fedhealth.load_model(out)
    ours = package.predict(pd.DataFrame(X, columns=names), assume_standardized=True)
    expected = model.predict(X)
    assert ours.shape == ((len(X), 2) if "num_class" in params else (len(X),))
    assert np.array_equal(ours, expected)
    if binary:
        frame = pd.DataFrame(X, columns=names)
        assert np.array_equal(package.predict_proba(frame, assume_standardized=True), ours)
    else:
        with pytest.raises(PackageInputError, match="not a binary classifier"):
            package.predict_proba(pd.DataFrame(X, columns=names), assume_standardized=True)
    if onnx:  # the ONNX file takes raw rows (as a site gives them) and agrees with the model to 1e-5
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {"features": X})[-1]
        if binary:
            got = got[:, -1]  # probabilities: (rows, 2)
        elif "num_class" not in params:
            got = got.reshape(-1)  # variable: (rows, 1)
        assert np.allclose(got, expected, rtol=0, atol=1e-5)
