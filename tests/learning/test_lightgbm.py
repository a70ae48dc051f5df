"""Federated LightGBM (``lightgbm`` recipe) in one process: four Fed-Heart-Disease centers over an in-memory
session (real masks and relay), against LightGBM trained on the pooled rows on one machine."""

from __future__ import annotations

import re
from typing import Any

import lightgbm  # the gbdt extra is installed by `make test`: missing, these tests fail
import numpy as np
import pytest

from fedhealth.data import SchemaError
from fedhealth.learning import (
    LIGHTGBM_RECIPE,
    InMemorySession,
    LightGbmModel,
    LightGbmParams,
    RecipeParamsError,
    model_from_export,
    resolve_recipe,
    train_pooled,
    train_site,
)
from fedhealth.learning._lightgbm import agree_bins, cell_counts
from fedhealth.secagg import SessionFailedError

SITES = ["center-0", "center-1", "center-2", "center-3"]


def _federated(params: LightGbmParams, centers: list[Any]) -> dict[str, tuple[LightGbmModel, dict[str, int]]]:
    session = InMemorySession(SITES, call_timeout_s=60)
    return session.run(lambda member: train_site(params, centers[SITES.index(member.site)], member))


def _trees(model_text: str) -> str:
    """The trees of a model text (the parameters section names the tree learner and machine count)."""
    return model_text.split("end of trees")[0]


def _test_rows(centers: list[Any]) -> np.ndarray:
    return np.concatenate([c.X_test for c in centers])


def test_lightgbm_is_the_pinned_version():
    assert lightgbm.__version__ == "4.7.0"  # _lightgbm_network's call-site table is this version's


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # binary, 31 leaves, min_data_in_leaf=1, min_gain_to_split=1e-6
        {"num_leaves": 8, "max_depth": 3, "lambda_l2": 1.0, "learning_rate": 0.3},
        {"objective": "regression", "num_leaves": 15, "min_data_in_leaf": 20},
        {"objective": "multiclass", "num_class": 2, "num_leaves": 8},
        # a rare outcome's weight, and each tree on a seeded share of the features
        {"num_leaves": 8, "scale_pos_weight": 3.0, "feature_fraction": 0.5},
        # the risk may only rise with age and only fall with the third feature
        {"num_leaves": 8, "monotone_constraints": (1, 0, -1, *[0] * 10)},
    ],
    ids=[
        "binary",
        "binary-depth-3",
        "regression-min-data-20",
        "multiclass",
        "weighted-feature-fraction",
        "monotone",
    ],
)
def test_federated_lightgbm_equals_lightgbm_on_the_pooled_rows_bit_for_bit(centers, overrides):
    params = LightGbmParams(n_features=13, num_rounds=60, **overrides)
    runs = _federated(params, centers)
    assert len({model.model_text for model, _ in runs.values()}) == 1  # every site ends with the same model
    federated = runs[SITES[0]][0]
    pooled = train_pooled(params, centers)
    # every tree: splits, thresholds, gains, leaf values, weights and row counts
    assert _trees(federated.model_text) == _trees(pooled.model_text)
    X = _test_rows(centers)
    assert np.array_equal(federated.predict(X, raw_score=True), pooled.predict(X, raw_score=True))
    assert federated.booster().num_trees() == 60 * params.num_class


def test_with_eight_sites_each_site_runs_two_ranks_and_the_model_is_still_the_pooled_one(centers):
    # the split each leaf takes is the best record over all features, however LightGBM's machines share
    # them: a two-rank network per site grows what eight machines grow (docs/boosting.md)
    halves = []
    for center in centers:
        train, test = np.arange(center.num_train) % 2 == 0, np.arange(center.num_test) % 2 == 0
        halves += [center.select(train, test), center.select(~train, ~test)]
    sites = [f"half-{i}" for i in range(len(halves))]
    params = LightGbmParams(n_features=13, num_rounds=20)
    session = InMemorySession(sites, call_timeout_s=60)
    runs = session.run(lambda member: train_site(params, halves[sites.index(member.site)], member))
    assert len({model.model_text for model, _ in runs.values()}) == 1
    federated = runs[sites[0]][0]
    assert "[num_machines: 2]" in federated.model_text  # two ranks at each of the eight sites
    pooled = train_pooled(params, halves)
    assert _trees(federated.model_text) == _trees(pooled.model_text)
    X = _test_rows(halves)
    assert np.array_equal(federated.predict(X, raw_score=True), pooled.predict(X, raw_score=True))


def test_without_exact_counts_lightgbm_data_parallel_drifts_from_the_pooled_model(centers, monkeypatch):
    # what the exact counts buy: LightGBM's data-parallel learner estimates a child's rows from hessians,
    # and on Fed-Heart-Disease its trees leave the pooled ones (the counts first, then the splits)
    from fedhealth.learning import _lightgbm_network

    group_init = _lightgbm_network.RankGroup.__init__

    def without_tree(self, session, tree=None, **options):  # no replayed tree: LightGBM's own estimates
        group_init(self, session, None, **options)

    monkeypatch.setattr(_lightgbm_network.RankGroup, "__init__", without_tree)
    params = LightGbmParams(n_features=13, num_rounds=10)
    federated = _federated(params, centers)[SITES[0]][0]
    pooled = train_pooled(params, centers)
    assert _trees(federated.model_text) != _trees(pooled.model_text)
    counts = re.findall(r"leaf_count=.*", federated.model_text)
    assert counts != re.findall(r"leaf_count=.*", pooled.model_text)


def test_the_collectives_lightgbm_asks_for_are_the_protected_ones(centers):
    params = LightGbmParams(n_features=13, num_rounds=5, num_leaves=4)
    runs = _federated(params, centers)
    calls = runs[SITES[0]][1]
    # booster creation: positive and negative counts; first iteration: label sum, weight sum, start score;
    # each tree: its root's (n, Σg, Σh), then per split step one histogram sum and one split-record gather
    assert calls["count_sum"] == 2
    assert calls["statistic_sum"] == 2
    assert calls["init_score"] == 1
    assert calls["root_sum"] == 5
    assert calls["histogram_sum"] == calls["split_records"] == 5 * 3  # 4 leaves: 3 split steps per tree
    assert calls.pop("values_sent") > 0
    assert set(calls) == {
        "count_sum",
        "statistic_sum",
        "init_score",
        "root_sum",
        "histogram_sum",
        "split_records",
    }
    # and the only clear values: per split step, every site's two best-split records (a gather by secure sum)


def test_a_split_step_costs_one_collective_the_histogram_sum(centers):
    params = LightGbmParams(n_features=13, num_rounds=5, num_leaves=4)
    session = InMemorySession(SITES, call_timeout_s=60)
    runs = session.run(
        lambda member: (train_site(params, centers[SITES.index(member.site)], member)[1], member.calls)
    )
    calls, total = runs[SITES[0]]
    assert calls["histogram_sum"] == calls["split_records"] == 5 * 3
    # the session's calls: the group secret and the bins' cell counts (a checked sum), then what LightGBM
    # asked for but the split-record gathers (each site's own ranks answer them) and the exact counts (they
    # ride with the histogram sums)
    assert total == 1 + 1 + 2 + 2 + 1 + 5 + 5 * 3


def test_with_early_stopping_and_checkpoints_a_split_step_still_costs_one_collective(centers, tmp_path):
    # every site runs every rank here too: the split-record gathers are answered at the site, and the only
    # collectives besides LightGBM's are the early-stopping sums (one per round) and the resume agreement
    params = LightGbmParams(
        n_features=13, num_rounds=200, learning_rate=0.5, num_leaves=4, early_stopping_rounds=3, retries=1
    )
    session = InMemorySession(SITES, call_timeout_s=60)

    def program(member: Any) -> Any:
        (tmp_path / member.site).mkdir()
        dataset = centers[SITES.index(member.site)]
        return train_site(params, dataset, member, tmp_path / member.site)[1], member.calls

    calls, total = session.run(program)[SITES[0]]
    assert any((tmp_path / SITES[0]).rglob("*.json"))  # the site checkpointed its rounds
    rounds = calls["root_sum"]
    assert calls["stopping"] == rounds == calls["best_iteration"] + 3 < 200
    assert calls["histogram_sum"] == calls["split_records"] == rounds * 3
    # the validation rows, the group secret, the bins' cell counts (a checked sum), the resume agreement,
    # then LightGBM's collectives but the split-record gathers, and the early-stopping sums
    assert total == 1 + 1 + 1 + 1 + 2 + 2 + 1 + rounds + rounds * 3 + rounds


@pytest.mark.parametrize(
    "overrides",
    [{}, {"early_stopping_rounds": 3, "learning_rate": 0.5}, {"retries": 1}],
    ids=["plain", "early-stopping", "checkpoints"],
)
def test_training_leaves_lightgbm_s_process_wide_thread_count_at_one(centers, tmp_path, overrides):
    # LightGBM's thread count is one value for the process, set by every booster and prediction; a rise
    # while another site's booster of this process is inside an iteration corrupts LightGBM's heap
    # (_lightgbm_network's module docstring): every call of the recipe must pass num_threads=1
    import ctypes

    threads = ctypes.c_int.in_dll(lightgbm.basic._LIB, "LGBM_DEFAULT_NUM_THREADS")
    params = LightGbmParams(n_features=13, num_rounds=10, num_leaves=4, **overrides)
    session = InMemorySession(SITES, call_timeout_s=60)

    def program(member: Any) -> Any:
        (tmp_path / member.site).mkdir()
        return train_site(params, centers[SITES.index(member.site)], member, tmp_path / member.site)

    session.run(program)
    assert threads.value == 1


def test_multiclass_trains_one_tree_per_class_and_round(centers):
    params = LightGbmParams(n_features=13, objective="multiclass", num_class=2, num_rounds=3, num_leaves=4)
    runs = _federated(params, centers)
    model = runs[SITES[0]][0]
    assert model.booster().num_trees() == 6
    assert runs[SITES[0]][1]["init_score"] == 2
    probs = model.predict(_test_rows(centers))
    assert probs.shape == (sum(len(c.y_test) for c in centers), 2)
    assert np.allclose(probs.sum(axis=1), 1.0)


def test_agreed_bins_come_from_the_summed_counts_and_match_the_pooled_ones(centers):
    params = LightGbmParams(n_features=13, max_bin=16, num_rounds=1)
    low, high = zip(*params.ranges(), strict=True)
    per_site = [cell_counts(c.X_train, low, high, params.grid_cells) for c in centers]
    starts = agree_bins(sum(per_site), 16)
    for feature, first_cells in enumerate(starts):
        assert first_cells[0] == 0
        assert 1 <= len(first_cells) <= 16
        occupied = np.flatnonzero(sum(per_site)[feature])
        assert all(c in occupied for c in first_cells[1:])  # no bin empty of the pooled data
    # the federated sites derive exactly these bins from the secure sum
    runs = _federated(params, centers)
    assert runs[SITES[0]][0].binning.starts == starts == train_pooled(params, centers).binning.starts


def test_few_occupied_cells_get_one_bin_each():
    counts = np.zeros((1, 10))
    counts[0, [2, 5, 9]] = [3, 1, 4]
    assert agree_bins(counts, 255) == ((0, 5, 9),)


def test_the_export_carries_the_model_and_its_bins(centers):
    params = LightGbmParams(n_features=13, num_rounds=3, num_leaves=4)
    model = train_pooled(params, centers)
    result = {"model": model.model_text, "binning": model.binning.to_json()}
    export = LIGHTGBM_RECIPE.export(params, result)
    assert export.metadata["recipe"] == "lightgbm"
    assert export.metadata["format"] == "lightgbm-text over bin codes"
    again = model_from_export(export)
    X = _test_rows(centers)
    assert again == model
    assert np.array_equal(again.predict(X), model.predict(X))
    assert export.predict_proba is not None
    assert np.array_equal(export.predict_proba(X), model.predict(X))  # P(label = 1), raw features in


def test_a_site_lost_mid_training_fails_the_session_for_every_site(centers):
    params = LightGbmParams(n_features=13, num_rounds=50, num_leaves=8)
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
            if member.site == "center-2" and calls == 40:  # in the middle of the third tree or so
                raise Crash("center-2's process died")
            return original(values)

        member.secure_sum = secure_sum
        try:
            return train_site(params, centers[SITES.index(member.site)], member)
        except BaseException as exc:
            errors[member.site] = exc
            raise

    with pytest.raises(Crash):
        session.run(program)
    assert isinstance(errors["center-2"], Crash)
    for site in ("center-0", "center-1", "center-3"):  # the others: the session's failure, not LightGBM's
        assert isinstance(errors[site], SessionFailedError), errors[site]
        assert "center-2" in str(errors[site])
    assert session.relay.released is None


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"n_features": 13, "objective": "lambdarank"}, "recipe.params.objective: Input should be"),
        ({"n_features": 13, "objective": "multiclass"}, "multiclass needs num_class >= 2"),
        ({"n_features": 13, "num_class": 3}, "num_class applies to multiclass only"),
        ({"n_features": 13, "num_leaves": 1}, "recipe.params.num_leaves: Input should be greater than"),
        ({"n_features": 13, "max_bin": 1000}, "recipe.params.max_bin: Input should be less than"),
        (
            {"n_features": 13, "objective": "regression", "scale_pos_weight": 2},
            "scale_pos_weight is for the binary objective (objective is regression)",
        ),
        (
            {"n_features": 13, "feature_fraction": 0},
            "recipe.params.feature_fraction: Input should be greater",
        ),
        (
            {"n_features": 13, "monotone_constraints": [1, 0, -1]},
            "monotone_constraints gives 3 constraints, n_features is 13",
        ),
        (
            {"n_features": 2, "monotone_constraints": [1, 2]},
            "recipe.params.monotone_constraints.1: Input should be",
        ),
        # LightGBM's own checks, asked of LightGBM on a few synthetic rows at submission
        (
            {"n_features": 13, "learning_rate": 0},
            "LightGBM 4.7.0 refuses these parameters: Check failed: (learning_rate) > (0.0)",
        ),
        (
            {"n_features": 13, "lambda_l1": -1},
            "LightGBM 4.7.0 refuses these parameters: Check failed: (lambda_l1) >= (0.0)",
        ),
        (
            {"n_features": 13, "min_gain_to_split": -1},
            "refuses these parameters: Check failed: (min_gain_to_split) >= (0.0)",
        ),
        (
            {"n_features": 13, "min_sum_hessian_in_leaf": -0.5},
            "Check failed: (min_sum_hessian_in_leaf) >= (0.0)",
        ),
        ({"n_features": 13, "max_depth": 0}, "max_depth must be -1"),
        ({"n_features": 13, "value_range": [1, 1]}, "a feature range must have low < high"),
        ({"n_features": 2, "feature_ranges": [[0, 1]]}, "feature_ranges gives 1 ranges, n_features is 2"),
        ({"n_features": 13, "tree_learner": "voting"}, "recipe.params.tree_learner: Extra inputs"),
        ({"n_features": 13, "use_quantized_grad": True}, "recipe.params.use_quantized_grad: Extra inputs"),
    ],
)
def test_bad_params_are_refused_with_one_clear_line(params, problem):
    with pytest.raises(RecipeParamsError) as err:
        resolve_recipe("lightgbm", "1", params)
    assert problem in str(err.value)
    assert "\n" not in str(err.value)


def test_a_dataset_of_another_width_is_refused_before_training(centers):
    resolved = resolve_recipe("lightgbm", "1", {"n_features": 12})
    with pytest.raises(Exception, match="has 13 features; the study's model expects 12"):
        resolved.check_dataset(centers[0])


def test_a_library_refusal_is_one_line_without_the_librarys_source_path():
    with pytest.raises(RecipeParamsError) as err:
        resolve_recipe("lightgbm", "1", {"n_features": 13, "lambda_l2": -2.0})
    assert str(err.value) == (
        "recipe.params: LightGBM 4.7.0 refuses these parameters: Check failed: (lambda_l2) >= (0.0)"
    )


def test_a_dataset_with_other_feature_names_is_refused_before_training(centers):
    names = list(centers[0].feature_names)
    names[3] = "not-" + names[3]
    resolved = resolve_recipe("lightgbm", "1", {"n_features": 13, "feature_names": names})
    with pytest.raises(SchemaError, match=f"feature 3 is {names[3][4:]!r}; the study expects {names[3]!r}"):
        resolved.check_dataset(centers[0])
    resolve_recipe(
        "lightgbm", "1", {"n_features": 13, "feature_names": list(centers[0].feature_names)}
    ).check_dataset(centers[0])  # the same names fit


def test_the_site_check_reference_step_trains_on_synthetic_rows():
    step = LIGHTGBM_RECIPE.reference_step()
    step.run()
    assert "synthetic" in step.note


class _Recording:
    """A stand-in session that records what would be summed (the protocol's only way out)."""

    site = "a"
    sites = ("a", "b", "c")

    def __init__(self) -> None:
        self.summed: list[np.ndarray] = []

    def secure_sum(self, values):
        self.summed.append(np.array(values))
        return np.array(values, dtype=np.float64) * 3

    def broadcast(self, data):
        raise AssertionError("nothing is broadcast during training")

    def barrier(self):
        raise AssertionError("no barrier during training")


def _network(session: _Recording) -> Any:
    from fedhealth.learning._lightgbm_network import RankGroup, SessionNetwork

    return SessionNetwork(RankGroup(session), 0, local_rows=10, init_schedule=[], init_score=lambda _i: None)


def test_a_collective_lightgbm_was_not_expected_to_ask_for_fails_instead_of_being_sent():
    from fedhealth.learning._lightgbm_network import UnprotectedCollectiveError

    session = _Recording()
    network = _network(session)
    network.phase = "train"
    for size in (
        12,
        8,
        100,
    ):  # an allgather of a size no protected call site has, or an 8-byte one mid-training
        with pytest.raises(UnprotectedCollectiveError):
            network._allgather(b"\x01" * size, [size] * 3)
    assert session.summed == []  # nothing left the site


def test_a_reduce_scatter_whose_reducer_is_not_a_sum_is_refused():
    import ctypes

    from fedhealth.learning._lightgbm_network import _REDUCER, UnprotectedCollectiveError

    @_REDUCER
    def maximum(src, dst, type_size, length):  # a max reducer, as LightGBM's GlobalSyncUpByMax has
        a = (ctypes.c_double * (length // 8)).from_address(src)
        b = (ctypes.c_double * (length // 8)).from_address(dst)
        for i in range(length // 8):
            b[i] = max(a[i], b[i])

    pointer = ctypes.c_void_p(ctypes.cast(maximum, ctypes.c_void_p).value)
    session = _Recording()
    network = _network(session)
    data = np.arange(6, dtype=np.float64)
    out = np.zeros(2)
    network.reduce_scatter(
        data.ctypes.data, 48, 8, [0, 16, 32], [16, 16, 16], out.ctypes.data, ctypes.addressof(pointer)
    )
    assert isinstance(network.error, UnprotectedCollectiveError)
    assert session.summed == []
    assert out.tolist() == [0.0, 1.0]  # the site's own block: LightGBM goes on alone until the loop raises
    with pytest.raises(UnprotectedCollectiveError):
        network.check()


def test_a_sites_ranks_share_one_secure_sum_of_the_own_ranks_values_only():
    import threading

    from fedhealth.learning._lightgbm_network import RankGroup, UnprotectedCollectiveError

    def run(group: RankGroup, values: list[np.ndarray]) -> list[Any]:
        out: list[Any] = [None] * len(group.ranks)

        def one(rank: int) -> None:
            try:
                out[rank] = group.secure_sum(rank, values[rank])
            except UnprotectedCollectiveError as exc:
                out[rank] = exc

        threads = [threading.Thread(target=one, args=(r,)) for r in group.ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        return out

    session = _Recording()  # site "a" of three: rank 0 trains on its rows, rank 1 on placeholder rows
    group = RankGroup(session)
    assert (group.ranks, group.own, group.sites) == ([0, 1], 0, 3)  # two ranks, whatever the session's size
    placeholders = [np.arange(4.0), np.full(4, 7.0)]
    results = run(group, placeholders)
    assert len(session.summed) == 1  # one secure sum for the two ranks
    assert np.array_equal(session.summed[0], np.arange(4.0))  # of the own rank's values, never the other's
    assert all(np.array_equal(r, np.arange(4.0) * 3) for r in results)  # and every rank gets the sum
    group = RankGroup(session)
    group.fail(RuntimeError("rank 1 stopped"))
    assert all(isinstance(r, UnprotectedCollectiveError) for r in run(group, placeholders))
    assert len(session.summed) == 1  # a failed group sends nothing more
    with pytest.raises(UnprotectedCollectiveError):  # and stays failed
        group.gather(0, b"x")


def test_confident_rows_send_both_parts_of_a_float_sum_and_the_model_stays_the_pooled_one(
    centers, float_sums_made
):
    # at learning rate 1 the predictions grow confident: hessians fall below 2^-17, off the 2^-40 grid, and
    # the histogram sums of those trees go in two parts (docs/boosting.md, "Float sums")
    params = LightGbmParams(n_features=13, num_rounds=40, learning_rate=1.0)
    runs = _federated(params, centers)
    assert len(float_sums_made) == len(SITES)
    assert len({(s.calls, s.repeats) for s in float_sums_made}) == 1  # every site decided alike
    assert 0 < float_sums_made[0].repeats < float_sums_made[0].calls / 2
    federated, pooled = runs[SITES[0]][0], train_pooled(params, centers)
    assert _trees(federated.model_text) == _trees(pooled.model_text)


def test_lightgbm_s_own_messages_go_to_the_debug_log_not_to_standard_output(centers, capfd, caplog):
    # a site's log would otherwise show "[LightGBM] [Info] Local rank: 1, total number of machines: 2" at
    # every session: the site's own two-rank network, which reads like two machines
    import logging

    with caplog.at_level(logging.DEBUG, logger="fedhealth.lightgbm"):
        _federated(LightGbmParams(n_features=13, num_rounds=2, num_leaves=4), centers)
    out, err = capfd.readouterr()
    assert "[LightGBM]" not in out + err
    messages = [r.getMessage() for r in caplog.records if r.name == "fedhealth.lightgbm"]
    assert any("total number of machines: 2" in m for m in messages)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "fedhealth.lightgbm")
