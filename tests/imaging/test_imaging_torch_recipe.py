"""The ``torch`` recipe (imaging extra): architectures, flattened tensors, determinism on CPU, FedProx's
proximal term, DP-SGD through Opacus, and a study run in memory through the runtime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from imaging_files import square_images

from fedhealth.learning import (
    TORCH_RECIPE,
    DpLevel,
    RecipeError,
    RecordDp,
    TorchParams,
    resolve_recipe,
    torch_threads,
)
from fedhealth.protocol import RecipeSpec, StrategySpec, StudySpec
from fedhealth.runtime import run_study_in_memory

SMALL = {"input_size": 16, "batch_size": 16, "learning_rate": 0.01}


def recipe(**params):
    return resolve_recipe("torch", "1", {**SMALL, **params})


def test_the_imaging_extra_is_installed_with_the_pinned_cpu_torch():
    # a missing extra fails here (never a skip): make test installs it
    import opacus
    import PIL
    import pydicom
    import torch

    assert torch.__version__.startswith("2.13.0")
    assert opacus.__version__.startswith("1.6")
    assert pydicom.__version__.startswith("3.")
    assert PIL.__version__


def test_fedhealth_learning_and_runtime_import_without_torch():
    code = (
        "import sys\n"
        "import fedhealth.learning, fedhealth.runtime, fedhealth.data\n"
        "from fedhealth.learning import resolve_recipe\n"
        "resolve_recipe('torch', '1', {})\n"  # resolving validates params only
        "heavy = sorted(m for m in ('torch', 'opacus', 'pydicom') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_params_are_validated_by_the_recipe():
    with pytest.raises(RecipeError, match="architecture"):
        resolve_recipe("torch", "1", {"architecture": "vgg"})
    with pytest.raises(RecipeError, match="unknown_knob"):
        resolve_recipe("torch", "1", {"unknown_knob": 1})
    with pytest.raises(RecipeError, match="optimizer"):
        resolve_recipe("torch", "1", {"optimizer": "lbfgs"})


def test_tensors_are_the_networks_state_sorted_and_float32():
    cnn = recipe()
    specs = cnn.param_specs()
    names = [s.name for s in specs]
    assert names == sorted(names)
    model = cnn.init(0)
    assert set(model) == set(names)
    assert all(model[s.name].shape == s.shape and model[s.name].dtype == np.float32 for s in specs)
    assert any(n.endswith("running_mean") for n in names)  # BatchNorm statistics travel too
    assert not any(n.endswith("num_batches_tracked") for n in names)
    assert model["head.3.weight"].shape == (2, 64)

    resnet = resolve_recipe("torch", "1", {"architecture": "resnet18"})
    count = sum(int(np.prod(s.shape)) for s in resnet.param_specs() if "running" not in s.name)
    assert 11_150_000 < count < 11_200_000  # ResNet-18 with a 3x3 stem and 2 classes

    grouped = recipe(norm="group")
    assert not any("running" in s.name for s in grouped.param_specs())


def test_resnet18_trains_a_step_on_28x28_images():
    resnet = resolve_recipe("torch", "1", {"architecture": "resnet18", "batch_size": 4, "optimizer": "sgd"})
    data = square_images(8, side=28)
    start = resnet.init(0)
    out = resnet.train(start, data, np.random.default_rng(0))
    assert out.steps == 2
    assert out.num_samples == 6
    assert not np.array_equal(out.params["fc.weight"], start["fc.weight"])
    assert resnet.evaluate(out.params, data).num_samples == 2


def test_init_depends_on_the_seed_only():
    cnn = recipe()
    a, b, c = cnn.init(7), cnn.init(7), cnn.init(8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["head.1.weight"], c["head.1.weight"])


def test_two_runs_with_the_same_generator_give_bit_identical_weights():
    cnn = recipe(augment_flips=True, local_epochs=2)
    data = square_images(48)
    start = cnn.init(0)
    one = cnn.train(start, data, np.random.default_rng(5))
    two = cnn.train(start, data, np.random.default_rng(5))
    other = cnn.train(start, data, np.random.default_rng(6))
    assert all(one.params[k].tobytes() == two.params[k].tobytes() for k in one.params)
    assert one.train_loss == two.train_loss
    assert not all(np.array_equal(one.params[k], other.params[k]) for k in one.params)


def test_the_small_cnn_learns_a_visible_pattern():
    cnn = recipe(local_epochs=6, learning_rate=0.005)
    data = square_images(96)
    out = cnn.train(cnn.init(0), data, np.random.default_rng(0))
    metrics = cnn.evaluate(out.params, data)
    assert metrics.accuracy >= 0.9
    assert metrics.auc is not None
    assert metrics.auc >= 0.95


def test_fedprox_keeps_the_local_model_near_the_global_one():
    data = square_images(48)
    start = recipe().init(0)

    def drift(mu: float) -> float:
        r = recipe(optimizer="sgd", learning_rate=0.1, local_epochs=3, proximal_mu=mu)
        local = r.train(start, data, np.random.default_rng(0)).params
        return float(sum(np.sum((local[k] - start[k]) ** 2) for k in start if "running" not in k))

    assert drift(10.0) < 0.5 * drift(0.0)


def test_dp_needs_plain_sgd_and_group_norm():
    assert "sgd" in recipe(optimizer="adam", norm="group").dp_problem(DpLevel.RECORD)
    assert "norm = 'group'" in recipe(optimizer="sgd").dp_problem(DpLevel.RECORD)
    assert recipe(optimizer="sgd", norm="group").dp_problem(DpLevel.RECORD) is None
    assert recipe(optimizer="adam").dp_problem(DpLevel.SITE) is None


def test_dp_sgd_without_noise_or_clipping_is_a_full_batch_sgd_step():
    # Opacus' per-example gradients, summed, must equal the batch gradient: one step at rate 1, no noise
    data = square_images(24)
    dp = recipe(optimizer="sgd", norm="group", learning_rate=0.1)
    plain = recipe(optimizer="sgd", norm="group", learning_rate=0.1, batch_size=10_000)
    start = dp.init(0)
    release = RecordDp(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=1.0, steps=1)
    private = dp.train(start, data, np.random.default_rng(0), record_dp=release)
    reference = plain.train(start, data, np.random.default_rng(0))
    assert private.train_loss is None
    assert private.steps == 1
    for k in start:
        np.testing.assert_allclose(private.params[k], reference.params[k], rtol=1e-4, atol=1e-6)


def test_dp_sgd_is_reproducible_from_the_generator_and_noise_moves_the_model():
    data = square_images(24)
    dp = recipe(optimizer="sgd", norm="group", learning_rate=0.1)
    start = dp.init(0)
    release = RecordDp(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=3)
    one = dp.train(start, data, np.random.default_rng(9), record_dp=release)
    two = dp.train(start, data, np.random.default_rng(9), record_dp=release)
    silent = RecordDp(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=0.25, steps=3)
    quiet = dp.train(start, data, np.random.default_rng(9), record_dp=silent)
    assert all(one.params[k].tobytes() == two.params[k].tobytes() for k in start)
    assert not all(np.array_equal(one.params[k], quiet.params[k]) for k in start)


def test_a_study_runs_in_memory_through_the_runtime_with_fedavg_and_fedprox():
    sites = {"a": square_images(32, seed=1, name="a"), "b": square_images(40, seed=2, name="b")}
    for strategy, mu in (("fedavg", 0.0), ("fedprox", 0.1)):
        spec = StudySpec(
            name="imaging-memory",
            dataset="squares",
            recipe=RecipeSpec(name="torch", params={**SMALL, "proximal_mu": mu, "local_epochs": 2}),
            strategy=StrategySpec(name=strategy),
            rounds=2,
            train_sites=sorted(sites),
            seed=1,
        )
        first = run_study_in_memory(spec, sites)
        again = run_study_in_memory(spec, sites)
        assert all(first.params[k].tobytes() == again.params[k].tobytes() for k in first.params)
        assert set(first.evaluation) == {"a", "b"}
        assert all(m.num_eval_samples > 0 for m in first.evaluation.values())


def test_the_stewards_sentence_and_the_spec_template_name_the_settings():
    text = recipe(augment_flips=True, proximal_mu=0.1).describe()
    for words in ("cnn", "16x16", "37954 values", "adam", "flips", "FedProx weight 0.1"):
        assert words in text.replace(",", ""), words
    template = {p.key: p.value for p in TORCH_RECIPE.template(784)}
    params = TorchParams(**template)
    assert params.input_size == 28
    assert params.n_features == 784


def test_torch_threads_follow_the_environment(monkeypatch):
    monkeypatch.setenv("FEDHEALTH_TORCH_THREADS", "3")
    assert torch_threads() == 3
    monkeypatch.setenv("FEDHEALTH_TORCH_THREADS", "many")
    assert torch_threads() >= 1


def test_batchnorm_running_statistics_are_averaged_plainly_under_fedadam():
    """FedAdam's adaptive step on BatchNorm's running variance collapsed the CNN (accuracy near the minority
    class rate): the recipe declares those tensors statistics of the data, and the server takes their plain
    mean under every strategy while the trained weights get the adaptive step."""
    from fedhealth.runtime import aggregate

    resolved = recipe(norm="batch")
    averaged = resolved.averaged_tensors()
    assert averaged
    assert all(n.endswith((".running_mean", ".running_var")) for n in averaged)
    assert not any(s.name.endswith(".weight") and s.name in averaged for s in resolved.param_specs())
    model = resolved.init(0)
    rng = np.random.default_rng(3)
    updates = [
        (n, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in model.items()}) for n in (30, 10)
    ]
    spec = StudySpec(
        name="bn",
        dataset="squares",
        recipe=RecipeSpec(name="torch", params={**SMALL, "norm": "batch"}),
        strategy=StrategySpec(name="fedadam"),
        rounds=1,
        train_sites=["a", "b"],
    )
    new, state = aggregate(spec.strategy, model, updates, {}, spec=spec)
    for name in averaged:
        mean = (30 * updates[0][1][name].astype(np.float64) + 10 * updates[1][1][name]) / 40
        np.testing.assert_allclose(new[name], model[name] + mean, rtol=1e-6)
        assert f"m.{name}" not in state
    trained = next(n for n in model if n not in averaged and n.endswith("weight"))
    assert f"m.{trained}" in state
    assert recipe(norm="group").averaged_tensors() == frozenset()
