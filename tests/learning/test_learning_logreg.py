import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from fedhealth.core import ConfigError, InputError, TensorError, specs_of
from fedhealth.learning import (
    LocalOptimizer,
    LogRegConfig,
    TrainingDivergedError,
    bce_with_logits,
    logreg_evaluate,
    logreg_init,
    logreg_objective,
    logreg_param_specs,
    logreg_per_example_gradients,
    logreg_train,
)


def _problem(seed: int, n: int = 40, d: int = 5):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (X @ rng.normal(size=d) + rng.normal(size=n) > 0).astype(np.float64)
    params = {
        "weight": rng.normal(size=d).astype(np.float32),
        "bias": rng.normal(size=1).astype(np.float32),
    }
    anchor = {
        "weight": rng.normal(size=d).astype(np.float32),
        "bias": rng.normal(size=1).astype(np.float32),
    }
    return X, y, params, anchor


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("l2", "mu"), [(0.0, 0.0), (0.3, 0.0), (0.0, 0.7), (0.2, 1.5)])
def test_objective_gradient_matches_central_finite_differences(seed, l2, mu):
    X, y, params, anchor = _problem(seed)
    _, grad = logreg_objective(params, X, y, l2=l2, proximal_mu=mu, anchor=anchor)
    h = 1e-6
    # finite differences in float64: perturb a float64 copy through the same public function
    base = {k: v.astype(np.float64) for k, v in params.items()}
    for name in ("weight", "bias"):
        for i in range(base[name].size):
            plus = {k: v.copy() for k, v in base.items()}
            minus = {k: v.copy() for k, v in base.items()}
            plus[name][i] += h
            minus[name][i] -= h
            f_plus, _ = logreg_objective(plus, X, y, l2=l2, proximal_mu=mu, anchor=anchor)
            f_minus, _ = logreg_objective(minus, X, y, l2=l2, proximal_mu=mu, anchor=anchor)
            assert grad[name][i] == pytest.approx((f_plus - f_minus) / (2 * h), rel=1e-6, abs=1e-8)


def test_l2_penalizes_the_weight_but_not_the_bias():
    X, y, params, _ = _problem(3)
    f0, g0 = logreg_objective(params, X, y)
    f1, g1 = logreg_objective(params, X, y, l2=0.4)
    w = params["weight"].astype(np.float64)
    assert f1 - f0 == pytest.approx(0.2 * float(w @ w), rel=1e-12)
    np.testing.assert_allclose(g1["weight"] - g0["weight"], 0.4 * w, rtol=1e-12)
    assert g1["bias"][0] == g0["bias"][0]


def test_proximal_term_requires_the_anchor():
    X, y, params, _ = _problem(0)
    with pytest.raises(InputError, match="anchor"):
        logreg_objective(params, X, y, proximal_mu=1.0)


@pytest.mark.parametrize(
    ("z", "y", "expected"),
    [
        (1000.0, 0.0, 1000.0),
        (1000.0, 1.0, 0.0),
        (-1000.0, 1.0, 1000.0),
        (-1000.0, 0.0, 0.0),
        (0.0, 1.0, math.log(2)),
    ],
)
def test_bce_is_exact_and_finite_for_extreme_logits(z, y, expected):
    out = bce_with_logits(np.array([z]), np.array([y]))
    assert np.isfinite(out).all()
    assert out[0] == pytest.approx(expected, abs=1e-12)


@given(st.floats(-10, 10), st.sampled_from([0.0, 1.0]))
def test_bce_equals_the_textbook_formula_where_that_is_accurate(z, y):
    p = 1.0 / (1.0 + math.exp(-z))
    naive = -(y * math.log(p) + (1 - y) * math.log1p(-p)) if 0 < p < 1 else None
    if naive is not None:
        assert bce_with_logits(np.array([z]), np.array([y]))[0] == pytest.approx(naive, rel=1e-7, abs=1e-12)


def test_evaluation_with_huge_weights_stays_finite():
    X = np.array([[1.0], [-1.0], [2.0]])
    y = np.array([0, 1, 1])
    params = {"weight": np.array([1e30], np.float32), "bias": np.zeros(1, np.float32)}
    result = logreg_evaluate(params, X, y)
    assert math.isfinite(result.loss)
    assert result.loss > 1e29  # two confidently wrong predictions out of three


def test_one_full_batch_sgd_step_is_a_gradient_step_on_the_objective():
    X, y, params, _ = _problem(4)
    config = LogRegConfig(
        n_features=5, local_epochs=1, batch_size=len(y), learning_rate=0.3, l2=0.1, proximal_mu=0.5
    )
    result = logreg_train(params, X, y, config, np.random.default_rng(0))
    _, grad = logreg_objective(params, X, y, l2=0.1, proximal_mu=0.5, anchor=params)
    for name in ("weight", "bias"):
        expected = params[name].astype(np.float64) - 0.3 * grad[name]
        np.testing.assert_allclose(result.params[name], expected.astype(np.float32), rtol=1e-6)
    assert result.steps == 1


def test_first_adam_step_moves_each_coordinate_by_the_learning_rate_against_the_gradient_sign():
    # fresh Adam: m_hat = g and v_hat = g^2 after bias correction, so the step is lr * g / (|g| + eps)
    X, y, params, _ = _problem(5)
    config = LogRegConfig(
        n_features=5, local_epochs=1, batch_size=len(y), learning_rate=0.01, optimizer=LocalOptimizer.ADAM
    )
    result = logreg_train(params, X, y, config, np.random.default_rng(0))
    _, grad = logreg_objective(params, X, y)
    for name in ("weight", "bias"):
        g = grad[name]
        expected = params[name].astype(np.float64) - 0.01 * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(result.params[name], expected.astype(np.float32), rtol=1e-6)


def test_adam_state_is_fresh_every_round():
    X, y, params, _ = _problem(6)
    config = LogRegConfig(n_features=5, local_steps=3, batch_size=8, optimizer=LocalOptimizer.ADAM)
    a = logreg_train(params, X, y, config, np.random.default_rng(9))
    b = logreg_train(params, X, y, config, np.random.default_rng(9))
    for name in params:
        assert a.params[name].tobytes() == b.params[name].tobytes()


def test_training_on_a_separable_set_converges():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-3, 0.5, size=(50, 2)), rng.normal(3, 0.5, size=(50, 2))])
    y = np.array([0] * 50 + [1] * 50)
    params = logreg_init(2, seed=0)
    config = LogRegConfig(n_features=2, local_epochs=30, batch_size=10, learning_rate=0.5)
    result = logreg_train(params, X, y, config, rng)
    ev = logreg_evaluate(result.params, X, y)
    assert ev.accuracy == 1.0
    assert ev.auc == 1.0
    assert ev.loss < 0.01
    assert result.train_loss < math.log(2)  # the running loss fell from log 2 at the zero start


def test_fedprox_with_large_mu_stays_near_the_global_model():
    # with lr * mu = 1 each SGD step resets theta - theta0 to -lr * (data gradient), whose norm is at most
    # lr * max ||(x, 1)||: the local model cannot leave that ball around the global one
    X, y, params, _ = _problem(7, n=60)
    bound = 1e-3 * np.max(np.linalg.norm(np.c_[X, np.ones(len(X))], axis=1))
    prox = LogRegConfig(n_features=5, local_epochs=5, batch_size=6, learning_rate=1e-3, proximal_mu=1e3)
    free = LogRegConfig(n_features=5, local_epochs=5, batch_size=6, learning_rate=1e-1)

    def distance(config):
        out = logreg_train(params, X, y, config, np.random.default_rng(1)).params
        return math.hypot(*[float(np.linalg.norm(out[k] - params[k])) for k in params])

    assert distance(prox) <= bound * (1 + 1e-4)
    assert distance(free) > 10 * bound


def test_local_steps_count_exactly_and_cycle_through_epochs():
    X, y, params, _ = _problem(8, n=10)
    result = logreg_train(
        params, X, y, LogRegConfig(n_features=5, local_steps=7, batch_size=4), np.random.default_rng(0)
    )
    assert result.steps == 7
    assert result.num_samples == 10
    by_epochs = logreg_train(
        params, X, y, LogRegConfig(n_features=5, local_epochs=2, batch_size=4), np.random.default_rng(0)
    )
    assert by_epochs.steps == 6  # ceil(10 / 4) batches per epoch, the last one smaller


def test_train_loss_is_the_mean_bce_of_the_examples_seen():
    X, y, _, _ = _problem(9)
    zero = logreg_init(5, seed=0)
    one_step = LogRegConfig(n_features=5, local_epochs=1, batch_size=len(y))
    assert logreg_train(zero, X, y, one_step, np.random.default_rng(0)).train_loss == pytest.approx(
        math.log(2)
    )


def test_zero_epochs_returns_the_global_model_and_its_loss():
    X, y, params, _ = _problem(10)
    result = logreg_train(params, X, y, LogRegConfig(n_features=5, local_epochs=0), np.random.default_rng(0))
    assert result.steps == 0
    for name in params:
        assert result.params[name].tobytes() == params[name].tobytes()
    assert result.train_loss == pytest.approx(logreg_evaluate(params, X, y).loss)


def test_same_generator_seed_gives_identical_bytes_and_another_seed_does_not():
    X, y, params, _ = _problem(11)
    config = LogRegConfig(n_features=5, local_epochs=3, batch_size=4)
    a = logreg_train(params, X, y, config, np.random.default_rng(123))
    b = logreg_train(params, X, y, config, np.random.default_rng(123))
    c = logreg_train(params, X, y, config, np.random.default_rng(124))
    assert all(a.params[k].tobytes() == b.params[k].tobytes() for k in params)
    assert a.train_loss == b.train_loss
    assert any(a.params[k].tobytes() != c.params[k].tobytes() for k in params)


def test_training_returns_float32_and_leaves_inputs_untouched():
    X, y, params, _ = _problem(12)
    before = {k: v.copy() for k, v in params.items()}
    X_before = X.copy()
    result = logreg_train(params, X, y, LogRegConfig(n_features=5), np.random.default_rng(0))
    assert all(v.dtype == np.float32 for v in result.params.values())
    assert all(np.array_equal(params[k], before[k]) for k in params)
    assert np.array_equal(X, X_before)


def test_init_is_zero_float32_and_matches_the_param_specs():
    params = logreg_init(7, seed=3)
    assert specs_of(params) == logreg_param_specs(7)
    assert all(v.dtype == np.float32 and not v.any() for v in params.values())


def test_evaluation_matches_sklearn_and_counts_p_equal_half_as_negative():
    X, y, params, _ = _problem(13)
    result = logreg_evaluate(params, X, y)
    z = X @ params["weight"].astype(np.float64) + float(params["bias"][0])
    p = expit(z)
    assert result.accuracy == pytest.approx(float(np.mean((p > 0.5) == y)))
    assert result.auc == pytest.approx(roc_auc_score(y, p))
    assert result.num_samples == len(y)
    zero = logreg_evaluate(logreg_init(5, 0), X, y)
    assert zero.accuracy == pytest.approx(float(np.mean(y == 0)))


def test_auc_is_none_for_a_single_class():
    X, _, params, _ = _problem(14)
    assert logreg_evaluate(params, X, np.ones(len(X))).auc is None


def test_per_example_gradients_average_to_the_objective_gradient():
    X, y, params, _ = _problem(15)
    per = logreg_per_example_gradients(params, X, y)
    _, grad = logreg_objective(params, X, y)
    assert per["weight"].shape == (len(y), 5)
    assert per["bias"].shape == (len(y), 1)
    for name in ("weight", "bias"):
        np.testing.assert_allclose(per[name].mean(axis=0), grad[name], rtol=1e-12, atol=1e-15)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(list(LocalOptimizer)))
def test_training_is_finite_for_standardized_data(seed, optimizer):
    X, y, params, _ = _problem(seed % 1000)
    config = LogRegConfig(n_features=5, local_steps=20, batch_size=4, optimizer=optimizer, learning_rate=0.1)
    result = logreg_train(params, X, y, config, np.random.default_rng(seed))
    assert all(np.isfinite(v).all() for v in result.params.values())


# --- bad input ---------------------------------------------------------------------------------------------


def test_wrong_parameter_shape_is_refused():
    X, y, _, _ = _problem(0)
    bad = {"weight": np.zeros(4, np.float32), "bias": np.zeros(1, np.float32)}
    with pytest.raises(TensorError, match=r"'weight' has shape \(4,\), expected \(5,\)"):
        logreg_train(bad, X, y, LogRegConfig(n_features=5), np.random.default_rng(0))


def test_missing_or_extra_parameter_is_refused():
    X, y, _, _ = _problem(0)
    with pytest.raises(TensorError, match=r"missing \['bias'\], unexpected \['b'\]"):
        logreg_train(
            {"weight": np.zeros(5, np.float32), "b": np.zeros(1, np.float32)},
            X,
            y,
            LogRegConfig(n_features=5),
            np.random.default_rng(0),
        )


def test_non_finite_parameters_are_refused():
    X, y, params, _ = _problem(0)
    params["bias"][0] = np.nan
    with pytest.raises(TensorError, match="'bias' holds NaN"):
        logreg_evaluate(params, X, y)


@pytest.mark.parametrize(
    ("X", "y", "match"),
    [
        (np.zeros((4, 3)), np.zeros(4), r"X must have shape \(rows, 5\)"),
        (np.zeros((4, 5)), np.zeros(3), r"y must have shape \(4,\)"),
        (np.full((4, 5), np.nan), np.zeros(4), "NaN"),
        (np.zeros((4, 5)), np.array([0, 1, 2, 1]), "labels 0 and 1"),
        (np.zeros((0, 5)), np.zeros(0), "at least one row"),
    ],
)
def test_bad_data_is_refused(X, y, match):
    with pytest.raises(InputError, match=match):
        logreg_train(logreg_init(5, 0), X, y, LogRegConfig(n_features=5), np.random.default_rng(0))


def test_divergence_is_reported_not_uploaded():
    X = np.array([[1e200], [-1e200]])
    y = np.array([0, 1])
    config = LogRegConfig(n_features=1, local_epochs=5, learning_rate=1e200, batch_size=1)
    with pytest.raises(TrainingDivergedError, match="diverged"):  # and no numpy warning escapes
        logreg_train(logreg_init(1, 0), X, y, config, np.random.default_rng(0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_features": 0},
        {"n_features": 3, "local_epochs": -1},
        {"n_features": 3, "local_steps": 0},
        {"n_features": 3, "batch_size": 0},
        {"n_features": 3, "learning_rate": 0.0},
        {"n_features": 3, "learning_rate": float("nan")},
        {"n_features": 3, "l2": -1.0},
        {"n_features": 3, "proximal_mu": float("inf")},
        {"n_features": 3, "optimizer": "adam"},
        {"n_features": True},
        {"n_features": 3, "local_epochs": 1.5},
    ],
)
def test_bad_recipe_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        LogRegConfig(**kwargs)


def test_numpy_integers_are_accepted_as_settings():
    config = LogRegConfig(n_features=np.int64(3), local_steps=np.int32(5), batch_size=np.int64(2))
    assert config.local_steps == 5
