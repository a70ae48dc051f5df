"""DP-SGD logistic regression: exact per-example gradients, clipping, noise, and plain GD as a limit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from fedhealth.core import InputError
from fedhealth.learning import logreg_per_example_gradients, logreg_train_dp
from fedhealth.privacy import DpParameterError, DpSgdRelease, epsilon


def bce(w: np.ndarray, b: float, x: np.ndarray, y: float) -> float:
    z = float(x @ w + b)
    # log(1 + e^z) - y z, computed stably
    return max(z, 0.0) + math.log1p(math.exp(-abs(z))) - y * z


def make_data(n: int = 40, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (X @ rng.normal(size=d) + 0.3 * rng.normal(size=n) > 0).astype(np.float64)
    return X, y


def params(d: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"weight": rng.normal(size=d).astype(np.float32), "bias": np.array([0.2], dtype=np.float32)}


def test_per_example_gradients_match_finite_differences():
    X, y = make_data(n=8, d=4)
    w = np.array([0.3, -1.2, 0.5, 2.0])
    b = np.array([-0.4])
    by_name = logreg_per_example_gradients({"weight": w, "bias": b}, X, y)
    grads = np.hstack([by_name["weight"], by_name["bias"]])
    h = 1e-6
    for i in range(len(X)):
        theta = np.concatenate([w, b])
        numeric = np.empty_like(theta)
        for j in range(len(theta)):
            up, down = theta.copy(), theta.copy()
            up[j] += h
            down[j] -= h
            numeric[j] = (bce(up[:-1], up[-1], X[i], y[i]) - bce(down[:-1], down[-1], X[i], y[i])) / (2 * h)
        np.testing.assert_allclose(grads[i], numeric, rtol=1e-6, atol=1e-8)


def test_without_noise_and_clipping_it_is_full_batch_gradient_descent():
    X, y = make_data()
    start = params(X.shape[1])
    lr, l2, steps = 0.5, 0.01, 25
    trained, report = logreg_train_dp(
        start,
        X,
        y,
        noise_multiplier=0.0,
        max_grad_norm=1e9,
        sample_rate=1.0,
        steps=steps,
        learning_rate=lr,
        l2=l2,
        rng=np.random.default_rng(0),
    )
    # Ordinary gradient descent on mean cross-entropy + l2/2 |w|^2, written independently.
    w = start["weight"].astype(np.float64)
    b = float(start["bias"][0])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(X @ w + b)))
        w, b = w - lr * (X.T @ (p - y) / len(y) + l2 * w), b - lr * float(np.mean(p - y))
    np.testing.assert_allclose(trained["weight"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trained["bias"], [b], rtol=1e-5, atol=1e-6)
    assert trained["weight"].dtype == np.float32
    assert trained["bias"].dtype == np.float32
    assert report.clipped_fraction == 0.0
    assert report.mean_batch_size == len(y)
    assert epsilon(report.release, delta=1e-5) == math.inf  # no noise: not private


def test_clipping_bounds_each_step_by_learning_rate_times_clip():
    X, y = make_data()
    X = X * 50  # from zero weights every residual is 1/2: every gradient is large and gets clipped
    start = {"weight": np.zeros(X.shape[1], np.float32), "bias": np.zeros(1, np.float32)}
    lr, clip = 0.1, 0.25
    trained, report = logreg_train_dp(
        start,
        X,
        y,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        sample_rate=1.0,
        steps=1,
        learning_rate=lr,
        rng=np.random.default_rng(0),
    )
    moved = np.concatenate([trained["weight"] - start["weight"], trained["bias"] - start["bias"]])
    # A mean of vectors of norm <= clip has norm <= clip.
    assert np.linalg.norm(moved) <= lr * clip * (1 + 1e-5)
    assert report.clipped_fraction == 1.0


def test_noise_has_std_sigma_clip_over_expected_batch_per_coordinate():
    X, y = make_data(n=50)
    start = params(X.shape[1])
    kwargs = {"max_grad_norm": 0.5, "sample_rate": 1.0, "steps": 1, "learning_rate": 1.0}
    clean, _ = logreg_train_dp(start, X, y, noise_multiplier=0.0, rng=np.random.default_rng(0), **kwargs)
    deltas = []
    for seed in range(400):
        noisy, _ = logreg_train_dp(
            start, X, y, noise_multiplier=2.0, rng=np.random.default_rng(seed), **kwargs
        )
        deltas.append(np.concatenate([noisy["weight"] - clean["weight"], noisy["bias"] - clean["bias"]]))
    expected = 1.0 * 2.0 * 0.5 / 50  # lr * sigma * C / (q N)
    assert np.std(deltas) == pytest.approx(expected, rel=0.05)
    assert abs(np.mean(deltas)) < expected * 0.05


def test_report_describes_the_release_for_the_accountant():
    X, y = make_data(n=200)
    _, report = logreg_train_dp(
        params(X.shape[1]),
        X,
        y,
        noise_multiplier=1.1,
        max_grad_norm=1.0,
        sample_rate=0.05,
        steps=300,
        learning_rate=0.1,
        rng=np.random.default_rng(4),
    )
    assert report.release == DpSgdRelease(noise_multiplier=1.1, sample_rate=0.05, steps=300)
    # Mean batch size estimates q N = 10; over 300 steps its standard error is about 0.18.
    assert abs(report.mean_batch_size - 10) < 1.0


def test_dp_sgd_learns_breast_cancer_at_epsilon_below_two_and_a_half():
    data = load_breast_cancer()
    X = (data.data - data.data.mean(axis=0)) / data.data.std(axis=0)
    y = data.target.astype(np.float64)
    d = X.shape[1]
    start = {"weight": np.zeros(d, dtype=np.float32), "bias": np.zeros(1, dtype=np.float32)}
    trained, report = logreg_train_dp(
        start,
        X,
        y,
        noise_multiplier=1.5,
        max_grad_norm=1.0,
        sample_rate=0.05,
        steps=200,
        learning_rate=1.0,
        rng=np.random.default_rng(2026),
    )
    assert epsilon(report.release, delta=1e-5) < 2.5
    accuracy = np.mean(((X @ trained["weight"] + trained["bias"][0]) > 0) == (y == 1))
    # Majority class is 63%; non-private logistic regression reaches about 98%.
    assert accuracy > 0.93


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"params": {"weight": np.zeros(5, np.float32)}}, InputError, "weight' and 'bias"),
        (
            {"params": {"weight": np.zeros(4, np.float32), "bias": np.zeros(1, np.float32)}},
            InputError,
            "shape",
        ),
        (
            {"params": {"weight": np.zeros((5, 1), np.float32), "bias": np.zeros(1, np.float32)}},
            InputError,
            "(d,)",
        ),
        ({"y": np.full(40, 2.0)}, InputError, "0 or 1"),
        ({"y": np.zeros(39)}, InputError, "labels must have shape"),
        ({"X": np.full((40, 5), np.nan)}, InputError, "finite"),
        ({"X": np.zeros((0, 5)), "y": np.zeros(0)}, InputError, "empty"),
        ({"noise_multiplier": -1.0}, DpParameterError, "negative"),
        ({"max_grad_norm": 0.0}, DpParameterError, "max grad norm"),
        ({"sample_rate": 0.0}, DpParameterError, "sample rate"),
        ({"sample_rate": 1.5}, DpParameterError, "sample rate"),
        ({"steps": 0}, DpParameterError, "steps"),
        ({"learning_rate": -0.1}, DpParameterError, "learning rate"),
        ({"learning_rate": math.nan}, DpParameterError, "learning rate"),
        ({"l2": -1.0}, DpParameterError, "l2"),
    ],
)
def test_bad_inputs_are_refused(change, error, message):
    X, y = make_data()
    kwargs = {
        "params": params(5),
        "X": X,
        "y": y,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "sample_rate": 0.5,
        "steps": 2,
        "learning_rate": 0.1,
        "l2": 0.0,
        "rng": np.random.default_rng(0),
    }
    kwargs.update(change)
    with pytest.raises(error, match=message):
        logreg_train_dp(kwargs.pop("params"), kwargs.pop("X"), kwargs.pop("y"), **kwargs)
