"""Monotone constraints: a federated risk model that may only rise with one feature and only fall with
another does so everywhere, as the library's own constrained model on the pooled rows (which it equals bit for
bit: tests/learning/test_lightgbm.py and test_xgboost.py, the ``monotone`` cases)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedhealth.learning import (
    InMemorySession,
    LightGbmParams,
    XGBoostParams,
    train_pooled,
    train_pooled_xgboost,
    train_site,
    train_site_xgboost,
)

SITES = ["center-0", "center-1", "center-2", "center-3"]
RISING, FALLING = 0, 2  # age rises, the third feature falls


@pytest.mark.parametrize("recipe", ["lightgbm", "xgboost"])
def test_a_constrained_federated_model_only_rises_and_falls_where_the_constraints_say(heart_centers, recipe):
    constraints = [0] * 13
    constraints[RISING], constraints[FALLING] = 1, -1
    train, pooled_train, params = {
        "lightgbm": (train_site, train_pooled, LightGbmParams(n_features=13, num_rounds=30, num_leaves=8)),
        "xgboost": (train_site_xgboost, train_pooled_xgboost, XGBoostParams(n_features=13, num_rounds=30)),
    }[recipe]
    constrained = params.model_copy(update={"monotone_constraints": tuple(constraints)})
    session = InMemorySession(SITES, call_timeout_s=60)
    runs: dict[str, Any] = session.run(lambda m: train(constrained, heart_centers[SITES.index(m.site)], m))
    model = runs[SITES[0]][0]
    rows = np.concatenate([c.X_test for c in heart_centers])
    grid = np.linspace(-3, 3, 25)

    def along(feature: int, fitted: Any) -> np.ndarray:
        """Predictions (grid point x row) with ``feature`` set to each grid point in every row."""
        out = []
        for value in grid:
            moved = rows.copy()
            moved[:, feature] = value
            out.append(fitted.predict(moved))
        return np.array(out)

    assert (np.diff(along(RISING, model), axis=0) >= 0).all()
    assert (np.diff(along(FALLING, model), axis=0) <= 0).all()
    free = pooled_train(params, heart_centers)  # without the constraints the pooled model does both
    assert (np.diff(along(RISING, free), axis=0) < 0).any() or (
        np.diff(along(FALLING, free), axis=0) > 0
    ).any()
