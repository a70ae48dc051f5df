import zlib

import numpy as np
import pytest

from fedhealth.core import ConfigError, InputError
from fedhealth.learning import (
    EvalResult,
    logreg_evaluate,
    mean_metrics,
    synthetic_init,
    synthetic_train,
    task_rng,
    weighted_metrics,
)


def test_task_rng_is_the_documented_seed_sequence():
    expected = np.random.default_rng(np.random.SeedSequence([7, 3, zlib.crc32(b"center-2")])).random(5)
    np.testing.assert_array_equal(task_rng(7, 3, "center-2").random(5), expected)


def test_task_rng_separates_seed_round_and_site():
    base = task_rng(1, 1, "a").integers(0, 2**63, size=4).tolist()
    assert task_rng(1, 1, "a").integers(0, 2**63, size=4).tolist() == base
    for other in (task_rng(2, 1, "a"), task_rng(1, 2, "a"), task_rng(1, 1, "b")):
        assert other.integers(0, 2**63, size=4).tolist() != base


def test_task_rng_refuses_negative_words():
    with pytest.raises(ConfigError):
        task_rng(-1, 0, "a")
    with pytest.raises(ConfigError):
        task_rng(0, -1, "a")


def test_synthetic_model_is_deterministic_small_and_float32():
    params = synthetic_init(100_000, seed=5)
    assert params["weight"].dtype == np.float32
    assert params["weight"].shape == (100_000,)
    assert params["weight"].tobytes() == synthetic_init(100_000, seed=5)["weight"].tobytes()
    a = synthetic_train(params, np.random.default_rng(1))
    b = synthetic_train(params, np.random.default_rng(1))
    assert a.params["weight"].tobytes() == b.params["weight"].tobytes()
    delta = a.params["weight"].astype(np.float64) - params["weight"]
    assert 0.95e-3 < delta.std() < 1.05e-3  # N(0, 1e-3^2) per coordinate
    assert abs(delta.mean()) < 5 * 1e-3 / np.sqrt(100_000)  # five standard errors


def test_synthetic_training_refuses_other_models():
    with pytest.raises(InputError):
        synthetic_train({"w": np.zeros(3, np.float32)}, np.random.default_rng(0))
    with pytest.raises(InputError):
        synthetic_init(0, seed=0)


def test_weighted_metrics_equal_the_metrics_of_the_union():
    rng = np.random.default_rng(0)
    params = {"weight": rng.normal(size=3).astype(np.float32), "bias": np.zeros(1, np.float32)}
    parts = [(rng.normal(size=(n, 3)), rng.integers(0, 2, size=n)) for n in (5, 17, 40)]
    per_site = [logreg_evaluate(params, X, y) for X, y in parts]
    union = logreg_evaluate(
        params, np.concatenate([X for X, _ in parts]), np.concatenate([y for _, y in parts])
    )
    summary = weighted_metrics(per_site)
    assert summary.num_samples == 62
    assert summary.loss == pytest.approx(union.loss, rel=1e-12)
    assert summary.accuracy == pytest.approx(union.accuracy, rel=1e-12)


def test_mean_metrics_count_each_site_once_and_skip_undefined_auc():
    results = [
        EvalResult(num_samples=100, loss=1.0, accuracy=0.5, auc=0.6),
        EvalResult(num_samples=1, loss=3.0, accuracy=1.0, auc=None),
    ]
    summary = mean_metrics(results)
    assert (summary.num_sites, summary.num_samples) == (2, 101)
    assert summary.loss == pytest.approx(2.0)
    assert summary.accuracy == pytest.approx(0.75)
    assert summary.auc == pytest.approx(0.6)
    assert mean_metrics(results[1:]).auc is None
    with pytest.raises(InputError):
        mean_metrics([])
    with pytest.raises(InputError):
        weighted_metrics([])
