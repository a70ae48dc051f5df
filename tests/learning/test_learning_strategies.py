import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedhealth.core import ConfigError, InputError, TensorError, decode_tensors, encode_tensors
from fedhealth.learning import (
    StrategyConfig,
    StrategyKind,
    apply_strategy,
    strategy_state_specs,
    weighted_mean,
)

ADAPTIVE = [StrategyKind.FEDADAM, StrategyKind.FEDYOGI, StrategyKind.FEDADAGRAD]


def _model(*values: float) -> dict[str, np.ndarray]:
    return {"weight": np.array(values, dtype=np.float32), "bias": np.array([0.25], dtype=np.float32)}


# --- weighted_mean -----------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 10_000), min_size=1, max_size=6).filter(lambda c: sum(c) > 0),
    st.integers(1, 8),
    st.integers(0, 2**32 - 1),
)
def test_weighted_mean_equals_numpy_average(counts, width, seed):
    rng = np.random.default_rng(seed)
    deltas = [
        {"w": rng.normal(size=width).astype(np.float32), "b": rng.normal(size=1).astype(np.float32)}
        for _ in counts
    ]
    out = weighted_mean(list(zip(counts, deltas, strict=True)))
    for name in ("w", "b"):
        stacked = np.stack([d[name].astype(np.float64) for d in deltas])
        np.testing.assert_allclose(
            out[name], np.average(stacked, axis=0, weights=counts), rtol=1e-12, atol=1e-15
        )
        assert out[name].dtype == np.float64


def test_weighted_mean_hand_example_and_zero_weight_site():
    out = weighted_mean(
        [
            (1, {"w": np.array([1.0, 0.0], np.float32)}),
            (3, {"w": np.array([5.0, 4.0], np.float32)}),
            (0, {"w": np.array([1e6, 1e6], np.float32)}),
        ]
    )
    np.testing.assert_array_equal(out["w"], [4.0, 3.0])  # (1*1 + 3*5)/4, (0 + 12)/4


def test_weighted_mean_is_bit_reproducible_summing_in_the_given_order():
    # Bit-reproducible means one fixed float64 recipe: sum count * delta in the order given, then divide.
    # The reference below is that recipe written out one number at a time, so any other summation order,
    # precision or grouping (pairwise sums, weights divided first, float32 accumulation) differs in bits.
    # float64 deltas: products of float32 values and small counts are exact, and would hide the order.
    rng = np.random.default_rng(0)
    ups = [(int(rng.integers(1, 100)), {"w": rng.normal(size=200)}) for _ in range(7)]
    total = float(sum(count for count, _ in ups))
    expected = []
    for i in range(200):
        acc = 0.0
        for count, delta in ups:
            acc += float(count) * float(delta["w"][i])
        expected.append(acc / total)
    assert weighted_mean(ups)["w"].tobytes() == np.array(expected, dtype=np.float64).tobytes()
    # The order is the callers' (sorted by site): in floating point it decides the result.
    big = float(2**53)
    in_order = [(1, {"w": np.array([x], np.float32)}) for x in (big, 1.0, -big)]
    assert weighted_mean(in_order)["w"][0] == 0.0  # 2^53 + 1 rounds to 2^53, then - 2^53
    assert weighted_mean([in_order[0], in_order[2], in_order[1]])["w"][0] == 1.0 / 3.0


@pytest.mark.parametrize(
    ("updates", "error", "match"),
    [
        ([], InputError, "at least one"),
        ([(0, {"w": np.zeros(2, np.float32)})], InputError, "zero samples"),
        ([(-1, {"w": np.zeros(2, np.float32)})], InputError, "non-negative integer"),
        ([(True, {"w": np.zeros(2, np.float32)})], InputError, "non-negative integer"),
        ([(1, {"w": np.zeros(2, np.float32)}), (1, {"w": np.zeros(3, np.float32)})], TensorError, "update 1"),
        ([(1, {"w": np.zeros(2, np.float32)}), (1, {"v": np.zeros(2, np.float32)})], TensorError, "missing"),
        ([(1, {"w": np.array([np.inf, 0], np.float32)})], TensorError, "NaN or infinite"),
    ],
)
def test_weighted_mean_refuses_bad_updates(updates, error, match):
    with pytest.raises(error, match=match):
        weighted_mean(updates)


# --- server steps against hand-derived closed forms -------------------------------------------------------


def test_fedavg_and_fedprox_add_eta_times_the_mean_delta():
    x = _model(1.0, -2.0)
    delta = {"weight": np.array([0.5, 0.25]), "bias": np.array([-1.0])}
    for kind in (StrategyKind.FEDAVG, StrategyKind.FEDPROX):
        new, state = apply_strategy(StrategyConfig(kind=kind, server_learning_rate=2.0), x, delta, {})
        np.testing.assert_array_equal(new["weight"], np.array([2.0, -1.5], np.float32))
        np.testing.assert_array_equal(new["bias"], np.array([-1.75], np.float32))
        assert new["weight"].dtype == np.float32
        assert state == {}


def test_first_fedadam_step_from_zero_state():
    # m = 0.1 d, v = 0.01 d^2  ->  step = eta * 0.1 d / (0.1 |d| + tau)
    x = _model(1.0, 1.0, 1.0)
    delta = {"weight": np.array([0.5, -2.0, 0.0]), "bias": np.array([0.1])}
    config = StrategyConfig(
        kind=StrategyKind.FEDADAM, server_learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3
    )
    new, state = apply_strategy(config, x, delta, {})
    expected = [1 + 0.1 * 0.05 / (0.05 + 1e-3), 1 - 0.1 * 0.2 / (0.2 + 1e-3), 1.0]
    np.testing.assert_allclose(new["weight"], np.array(expected, np.float32), rtol=1e-7)
    np.testing.assert_allclose(new["bias"], [0.25 + 0.1 * 0.01 / (0.01 + 1e-3)], rtol=1e-6)
    np.testing.assert_allclose(state["m.weight"], [0.05, -0.2, 0.0], rtol=1e-12)
    np.testing.assert_allclose(state["v.weight"], [0.0025, 0.04, 0.0], rtol=1e-12)
    assert sorted(state) == ["m.bias", "m.weight", "v.bias", "v.weight"]
    assert all(v.dtype == np.float64 for v in state.values())


def test_first_fedyogi_step_from_zero_equals_fedadam_because_sign_of_minus_d_squared_is_negative():
    x = _model(0.0, 0.0)
    delta = {"weight": np.array([0.3, -0.7]), "bias": np.array([0.2])}
    adam = apply_strategy(StrategyConfig(kind=StrategyKind.FEDADAM), x, delta, {})
    yogi = apply_strategy(StrategyConfig(kind=StrategyKind.FEDYOGI), x, delta, {})
    for name in x:
        np.testing.assert_array_equal(adam[0][name], yogi[0][name])


def test_first_fedadagrad_step_from_zero_state():
    # v = d^2, m = (1 - beta1) d  ->  step = eta * 0.1 d / (|d| + tau)
    x = _model(0.0)
    delta = {"weight": np.array([2.0]), "bias": np.array([-0.5])}
    new, state = apply_strategy(
        StrategyConfig(kind=StrategyKind.FEDADAGRAD, server_learning_rate=1.0, tau=0.5), x, delta, {}
    )
    np.testing.assert_allclose(new["weight"], [0.2 / 2.5], rtol=1e-7)
    np.testing.assert_allclose(new["bias"], [0.25 - 0.05 / 1.0], rtol=1e-7)
    np.testing.assert_allclose(state["v.weight"], [4.0])


@pytest.mark.parametrize(
    ("kind", "v_expected"),
    [
        (StrategyKind.FEDADAM, 0.99 * 4.0 + 0.01 * 1.0),  # 3.97
        (StrategyKind.FEDYOGI, 4.0 - 0.01 * 1.0 * 1.0),  # sign(4 - 1) = +1: 3.99
        (StrategyKind.FEDADAGRAD, 4.0 + 1.0),
    ],
)
def test_second_moment_updates_from_a_given_state(kind, v_expected):
    x = {"w": np.array([0.0], np.float32)}
    state = {"m.w": np.array([0.5]), "v.w": np.array([4.0])}
    config = StrategyConfig(kind=kind, server_learning_rate=1.0, beta1=0.9, beta2=0.99, tau=1e-3)
    new, out = apply_strategy(config, x, {"w": np.array([1.0])}, state)
    m_expected = 0.9 * 0.5 + 0.1 * 1.0
    assert out["m.w"][0] == pytest.approx(m_expected, rel=1e-12)
    assert out["v.w"][0] == pytest.approx(v_expected, rel=1e-12)
    assert new["w"][0] == pytest.approx(m_expected / (math.sqrt(v_expected) + 1e-3), rel=1e-6)


def test_yogi_second_moment_grows_when_below_the_squared_delta():
    x = {"w": np.array([0.0], np.float32)}
    state = {"m.w": np.array([0.0]), "v.w": np.array([0.25])}
    _, out = apply_strategy(
        StrategyConfig(kind=StrategyKind.FEDYOGI, beta2=0.9), x, {"w": np.array([1.0])}, state
    )
    assert out["v.w"][0] == pytest.approx(0.25 + 0.1 * 1.0, rel=1e-12)  # sign(0.25 - 1) = -1


@pytest.mark.parametrize("kind", ADAPTIVE)
def test_state_survives_a_safetensors_round_trip_bit_for_bit(kind):
    rng = np.random.default_rng(0)
    config = StrategyConfig(kind=kind, server_learning_rate=0.05)
    x_direct = x_restart = {"weight": rng.normal(size=6).astype(np.float32), "bias": np.zeros(1, np.float32)}
    s_direct: dict[str, np.ndarray] = {}
    s_restart: dict[str, np.ndarray] = {}
    for _ in range(4):
        delta = {"weight": rng.normal(size=6) * 0.1, "bias": rng.normal(size=1) * 0.1}
        x_direct, s_direct = apply_strategy(config, x_direct, delta, s_direct)
        stored, _ = decode_tensors(encode_tensors(s_restart)) if s_restart else ({}, {})
        x_restart, s_restart = apply_strategy(config, x_restart, delta, stored)
    for name in x_direct:
        assert x_direct[name].tobytes() == x_restart[name].tobytes()


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(-1e3, 1e3)),
    st.sampled_from(ADAPTIVE),
)
def test_first_adaptive_step_is_bounded_by_eta_times_the_first_moment_over_sqrt_of_second(delta, kind):
    config = StrategyConfig(kind=kind, server_learning_rate=0.5, beta1=0.9, beta2=0.99)
    x = {"w": np.zeros(delta.shape, np.float32)}
    new, _ = apply_strategy(config, x, {"w": delta}, {})
    # |m| / sqrt(v) = 0.1 / sqrt(0.01) = 1 for Adam and Yogi, 0.1 for Adagrad
    limit = 0.5 * (0.1 if kind is StrategyKind.FEDADAGRAD else 1.0)
    assert np.all(np.abs(new["w"].astype(np.float64)) <= limit * (1 + 1e-6))


def test_inputs_are_not_modified():
    x = _model(1.0, 2.0)
    delta = {"weight": np.array([0.1, 0.2]), "bias": np.array([0.3])}
    state = {"m.weight": np.ones(2), "v.weight": np.ones(2), "m.bias": np.ones(1), "v.bias": np.ones(1)}
    copies = [{k: v.copy() for k, v in d.items()} for d in (x, delta, state)]
    apply_strategy(StrategyConfig(kind=StrategyKind.FEDYOGI), x, delta, state)
    for original, copy in zip((x, delta, state), copies, strict=True):
        assert all(np.array_equal(original[k], copy[k]) for k in copy)


def test_state_specs_name_the_moments_of_each_tensor():
    x = _model(1.0, 2.0, 3.0)
    assert strategy_state_specs(StrategyConfig(kind=StrategyKind.FEDAVG), x) == {}
    assert strategy_state_specs(StrategyConfig(kind=StrategyKind.FEDADAM), x) == {
        "m.bias": (1,),
        "v.bias": (1,),
        "m.weight": (3,),
        "v.weight": (3,),
    }


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "state", "match"),
    [
        ({"weight": np.zeros(3), "bias": np.zeros(1)}, {}, r"mean delta: tensor 'weight' has shape \(3,\)"),
        ({"weight": np.zeros(2)}, {}, r"missing \['bias'\]"),
        ({"weight": np.array([np.nan, 0.0]), "bias": np.zeros(1)}, {}, "NaN or infinite"),
        ({"weight": np.zeros(2), "bias": np.zeros(1)}, {"m.weight": np.zeros(2)}, "fedadam state"),
        (
            {"weight": np.zeros(2), "bias": np.zeros(1)},
            {
                "m.weight": np.zeros(2),
                "v.weight": np.zeros(2),
                "m.bias": np.zeros(1),
                "v.bias": np.zeros(1),
                "x": np.zeros(1),
            },
            r"unexpected \['x'\]",
        ),
    ],
)
def test_mismatched_or_non_finite_inputs_are_refused(delta, state, match):
    with pytest.raises(TensorError, match=match):
        apply_strategy(StrategyConfig(kind=StrategyKind.FEDADAM), _model(0.0, 0.0), delta, state)


def test_an_empty_model_is_refused():
    with pytest.raises(TensorError, match="no tensors"):
        apply_strategy(StrategyConfig(), {}, {}, {})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"server_learning_rate": 0.0},
        {"server_learning_rate": float("inf")},
        {"beta1": 1.0},
        {"beta2": -0.1},
        {"tau": 0.0},
        {"kind": "fedavg"},
    ],
)
def test_bad_strategy_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        StrategyConfig(**kwargs)


def test_a_step_that_overflows_the_model_dtype_is_refused_without_a_numpy_warning():
    x = {"w": np.array([3e38], np.float32)}
    with pytest.raises(TensorError, match="non-finite"):
        apply_strategy(StrategyConfig(server_learning_rate=10.0), x, {"w": np.array([1e38])}, {})


# --- tensors a recipe declares averaged (statistics of the data, not trained parameters) ------------------


@pytest.mark.parametrize("kind", [*ADAPTIVE, StrategyKind.FEDAVG])
def test_declared_statistics_take_the_plain_mean_and_keep_no_optimizer_state(kind):
    config = StrategyConfig(kind=kind, server_learning_rate=0.3)
    model = {**_model(1.0, -2.0), "running_var": np.array([1.0, 4.0], dtype=np.float32)}
    delta = {"weight": np.array([0.5, 0.5]), "bias": np.array([-0.1]), "running_var": np.array([2.0, -3.0])}
    plain, plain_state = apply_strategy(config, model, delta, {})
    new, state = apply_strategy(config, model, delta, {}, averaged={"running_var"})
    # the statistic is the sites' mean (x + mean delta), whatever the strategy and its learning rate
    np.testing.assert_array_equal(new["running_var"], np.array([3.0, 1.0], dtype=np.float32))
    assert not np.array_equal(plain["running_var"], new["running_var"])
    # the trained parameters move exactly as before
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(new[name], plain[name])
    assert not any(k.endswith(".running_var") for k in state)
    assert set(state) == {k for k in plain_state if not k.endswith(".running_var")}
    # a second round's state is checked against the smaller set
    apply_strategy(config, new, delta, state, averaged={"running_var"})
    if state:
        with pytest.raises(TensorError):
            apply_strategy(config, new, delta, plain_state, averaged={"running_var"})
