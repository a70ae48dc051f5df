"""Federated XGBoost (``xgboost`` recipe) in one process: four Fed-Heart-Disease centers over an in-memory
session, each XGBoost worker's federated communicator answered by its site's proxy on 127.0.0.1, against
XGBoost trained on the pooled rows on one machine."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import xgboost  # the gbdt extra is installed by `make test`: missing, these tests fail

from fedhealth.data import SchemaError
from fedhealth.learning import (
    XGBOOST_RECIPE,
    InMemorySession,
    RecipeParamsError,
    XGBoostParams,
    resolve_recipe,
    train_pooled_xgboost,
    train_site_xgboost,
)
from fedhealth.learning._xgboost_proxy import decode_request, encode_reply
from fedhealth.secagg import SessionFailedError

SITES = ["center-0", "center-1", "center-2", "center-3"]


def _federated(params: XGBoostParams, centers: list[Any]) -> dict[str, Any]:
    session = InMemorySession(SITES, call_timeout_s=60)
    return session.run(lambda member: train_site_xgboost(params, centers[SITES.index(member.site)], member))


def _trees(model_json: str) -> Any:
    model = json.loads(model_json)["learner"]
    return model["gradient_booster"]["model"]["trees"], model["learner_model_param"]


def test_xgboost_is_the_last_version_with_the_federated_communicator():
    assert xgboost.__version__ == "3.2.0"
    assert xgboost.build_info()["USE_FEDERATED"]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"objective": "reg:squarederror", "max_depth": 3, "reg_lambda": 0.5},
        {"objective": "multi:softprob", "num_class": 2, "max_depth": 4, "num_rounds": 20},
        # a rare outcome's weight, and each tree on a seeded share of the features
        {"scale_pos_weight": 3.0, "colsample_bytree": 0.5, "max_depth": 3},
        {"monotone_constraints": (1, 0, -1, *[0] * 10), "max_depth": 3},
    ],
    ids=["binary", "regression", "multiclass", "weighted-column-sample", "monotone"],
)
def test_federated_xgboost_equals_xgboost_on_the_pooled_rows_bit_for_bit(centers, overrides):
    params = XGBoostParams(n_features=13, **{"num_rounds": 40, **overrides})
    runs = _federated(params, centers)
    assert len({model.model_json for model, _ in runs.values()}) == 1  # the same model at every site
    federated = runs[SITES[0]][0]
    pooled = train_pooled_xgboost(params, centers)
    assert _trees(federated.model_json) == _trees(pooled.model_json)  # every tree, split, weight; base score
    X = np.concatenate([c.X_test for c in centers])
    assert np.array_equal(federated.predict(X), pooled.predict(X))


def test_xgboost_collectives_are_sums_and_a_little_metadata(centers):
    params = XGBoostParams(n_features=13, num_rounds=5, max_depth=3)
    calls = _federated(params, centers)[SITES[0]][1]
    assert calls.pop("values_sent") > 0
    # histograms and gradient sums: float sums; the column count (MAX) and a few flags: metadata; no sketch
    assert calls["float_sum"] >= 5 * 3
    assert calls.get("metadata", 0) + calls.get("gather", 0) + calls.get("int_sum", 0) <= 5
    assert set(calls) <= {"float_sum", "int_sum", "metadata", "gather"}


def test_a_site_lost_mid_training_fails_every_sites_xgboost(centers):
    params = XGBoostParams(n_features=13, num_rounds=50)
    session = InMemorySession(SITES, call_timeout_s=60)
    errors: dict[str, BaseException] = {}

    class Crash(RuntimeError):
        pass

    def program(member):
        calls = 0
        original = member.secure_sum

        def secure_sum(values):
            nonlocal calls
            calls += 1
            if member.site == "center-1" and calls == 30:
                raise Crash("center-1's process died")
            return original(values)

        member.secure_sum = secure_sum
        try:
            return train_site_xgboost(params, centers[SITES.index(member.site)], member)
        except BaseException as exc:
            errors[member.site] = exc
            raise

    with pytest.raises(Crash):
        session.run(program)
    for site in ("center-0", "center-2", "center-3"):
        assert isinstance(errors[site], SessionFailedError), errors[site]
    assert session.relay.released is None


def test_the_proxy_reads_and_writes_federated_proto_messages():
    # AllreduceRequest{sequence_number=300, rank=2, send_buffer=b"abc", data_type=DOUBLE,
    #                  reduce_operation=SUM}
    message = b"\x08\xac\x02\x10\x02\x1a\x03abc\x20\x02\x28\x02"
    assert decode_request(message) == {1: 300, 2: 2, 3: b"abc", 4: 2, 5: 2}
    assert encode_reply(b"xy") == b"\x0a\x02xy"
    assert encode_reply(b"z" * 200)[:3] == b"\x0a\xc8\x01"


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"n_features": 13, "objective": "rank:pairwise"}, "recipe.params.objective: Input should be"),
        ({"n_features": 13, "objective": "multi:softprob"}, "multi:softprob needs num_class >= 2"),
        ({"n_features": 13, "max_depth": 0}, "recipe.params.max_depth: Input should be greater"),
        (
            {"n_features": 13, "objective": "reg:squarederror", "scale_pos_weight": 2},
            "scale_pos_weight is for the binary:logistic objective (objective is reg:squarederror)",
        ),
        ({"n_features": 13, "colsample_bytree": 1.5}, "recipe.params.colsample_bytree: Input should be less"),
        (
            {"n_features": 13, "monotone_constraints": [1, 0, -1]},
            "monotone_constraints gives 3 constraints, n_features is 13",
        ),
        ({"n_features": 13, "tree_method": "exact"}, "recipe.params.tree_method: Extra inputs"),
        # XGBoost's own checks, asked of XGBoost (one round on a few synthetic rows) at submission
        (
            {"n_features": 13, "reg_lambda": -1},
            "recipe.params: XGBoost 3.2.0 refuses these parameters: value -1 for Parameter reg_lambda should "
            "be greater equal to 0",
        ),
        ({"n_features": 13, "min_child_weight": -0.5}, "Parameter min_child_weight should be greater equal"),
        ({"n_features": 13, "gamma": -1}, "Parameter min_split_loss should be greater equal to 0"),
    ],
)
def test_bad_xgboost_params_are_refused_with_one_clear_line(params, problem):
    with pytest.raises(RecipeParamsError) as err:
        resolve_recipe("xgboost", "1", params)
    assert problem in str(err.value)
    assert "\n" not in str(err.value)
    assert "/" not in str(err.value).split("refuses these parameters:")[-1]  # no source path of XGBoost


def test_an_xgboost_site_with_another_width_or_other_feature_names_is_refused_before_training(centers):
    with pytest.raises(SchemaError, match="has 13 features; the study's model expects 14"):
        resolve_recipe("xgboost", "1", {"n_features": 14}).check_dataset(centers[1])
    names = ["years", *centers[1].feature_names[1:]]
    with pytest.raises(SchemaError, match="feature 0 is 'age'; the study expects 'years'"):
        resolve_recipe("xgboost", "1", {"n_features": 13, "feature_names": names}).check_dataset(centers[1])


def test_the_xgboost_export_predicts_like_the_model(centers):
    params = XGBoostParams(n_features=13, num_rounds=3, max_depth=2)
    model = train_pooled_xgboost(params, centers)
    export = XGBOOST_RECIPE.export(params, {"model": model.model_json, "binning": model.binning.to_json()})
    assert export.metadata["format"] == "xgboost-json over bin codes"
    X = np.concatenate([c.X_test for c in centers])
    assert export.predict_proba is not None
    assert np.array_equal(export.predict_proba(X), model.predict(X))
    XGBOOST_RECIPE.reference_step().run()


def test_the_start_score_is_the_pooled_label_mean_so_three_sites_equal_the_pooled_model(tmp_path):
    # XGBoost's own distributed estimate of the start score ended one float32 step off the single-machine
    # one on these rows (3 sites of 140 training rows); the recipe gives XGBoost the pooled label mean instead
    from fedhealth.data import open_dataset
    from fedhealth.sim._boosting_bench import _write_site_csv

    rng = np.random.default_rng(0)
    sites = SITES[:3]
    datasets = []
    for site in sites:
        _write_site_csv(tmp_path / f"{site}.csv", 200, 4, rng)
        datasets.append(open_dataset(f"file://{tmp_path / site}.csv?label=y"))
    params = XGBoostParams(n_features=4, num_rounds=2)
    session = InMemorySession(sites, call_timeout_s=60)
    runs = session.run(lambda m: train_site_xgboost(params, datasets[sites.index(m.site)], m))
    federated, pooled = runs[sites[0]][0], train_pooled_xgboost(params, datasets)
    assert _trees(federated.model_json) == _trees(pooled.model_json)
    y = np.concatenate([d.y_train for d in datasets])
    base_score = json.loads(pooled.model_json)["learner"]["learner_model_param"]["base_score"]
    assert np.float32(base_score.strip("[]")) == np.float32(y.mean())  # XGBoost's own single-machine value


def test_confident_rows_send_both_parts_of_a_float_sum_and_the_model_stays_the_pooled_one(
    centers, float_sums_made
):
    params = XGBoostParams(n_features=13, num_rounds=40, learning_rate=1.0)
    runs = _federated(params, centers)
    assert len(float_sums_made) == len(SITES)  # one proxy per site
    assert len({(s.calls, s.repeats) for s in float_sums_made}) == 1  # every site decided alike
    assert 0 < float_sums_made[0].repeats < float_sums_made[0].calls / 2
    federated, pooled = runs[SITES[0]][0], train_pooled_xgboost(params, centers)
    assert _trees(federated.model_json) == _trees(pooled.model_json)
