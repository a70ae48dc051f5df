"""Attacks on the ``torch`` imaging recipe: a malicious orchestrator's global model (misshapen, non-finite,
integer, extra or missing tensors, a pickle), a study spec inside its schema asking for unbounded work, and
DP-SGD checked on what it computes, not on a flag: each example's gradient clipped to ``max_grad_norm``,
Gaussian noise of ``noise_multiplier * max_grad_norm``, exactly the steps the ledger pays for, per-example
gradients in bounded memory whatever the sample rate."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from imaging_files import square_images

import fedhealth.learning._torch_recipe as torch_recipe
from fedhealth.core import TensorError, decode_tensors, encode_tensors
from fedhealth.learning import RecipeError, RecipeParamsError, RecordDp, resolve_recipe
from fedhealth.privacy import DpSgdRelease
from fedhealth.protocol import PrivacySpec, RecipeSpec, StudySpec, TaskKind
from fedhealth.runtime import task_plan

SMALL = {"input_size": 16, "batch_size": 8, "learning_rate": 0.1, "optimizer": "sgd"}
DP = {**SMALL, "norm": "group"}


def recipe(**params):
    return resolve_recipe("torch", "1", {**SMALL, **params})


@pytest.fixture(scope="module")
def data():
    return square_images(24)  # 18 training images, 6 held out


# --- the global model a site receives ---------------------------------------------------------------------


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (lambda v: v.reshape(-1), "shape"),  # as many values, another layout: no silent reshape
        (lambda v: np.swapaxes(v, 0, 1).copy(), "shape"),
        (lambda v: np.where(np.arange(v.size).reshape(v.shape) == 0, np.nan, v), "NaN or infinite"),
        (lambda v: np.full_like(v, np.inf), "NaN or infinite"),
        (lambda v: np.ones(v.shape, dtype=np.int64), "dtype"),
    ],
    ids=["flattened", "transposed", "one-nan", "inf", "integer"],
)
def test_a_tampered_global_model_is_refused_in_one_line_before_any_step(data, monkeypatch, tamper, why, dp):
    r = recipe(norm="group") if dp else recipe()
    model = r.init(0)
    model["features.4.weight"] = tamper(model["features.4.weight"])
    steps = []
    monkeypatch.setattr(torch_recipe, "_augmented", lambda p, images, rng: steps.append(1) or images)
    release = RecordDp(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2) if dp else None
    with pytest.raises((TensorError, RecipeError)) as err:
        r.train(model, data, np.random.default_rng(0), record_dp=release)
    assert why in str(err.value)
    assert "features.4.weight" in str(err.value)
    assert "\n" not in str(err.value)
    assert steps == []  # refused before the first batch was drawn
    with pytest.raises((TensorError, RecipeError), match=why):
        r.evaluate(model, data)


def test_extra_or_missing_tensors_are_refused_naming_them(data):
    r = recipe()
    model = r.init(0)
    extra = model | {"features.1.num_batches_tracked": np.zeros((), np.float32)}
    with pytest.raises(RecipeError, match=r"unexpected \['features.1.num_batches_tracked'\]"):
        r.train(extra, data, np.random.default_rng(0))
    missing = {k: v for k, v in model.items() if k != "head.3.bias"}
    with pytest.raises(RecipeError, match=r"missing \['head.3.bias'\]"):
        r.train(missing, data, np.random.default_rng(0))


def test_the_site_decodes_the_global_model_only_as_the_studys_safetensors():
    r = recipe()
    specs = r.param_specs()
    model = r.init(0)
    assert decode_tensors(encode_tensors(model), specs)[0].keys() == model.keys()
    # torch's own format is a pickle: never opened, whatever it holds
    pickled = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in model.items()}, pickled)
    with pytest.raises(TensorError):
        decode_tensors(pickled.getvalue(), specs)
    for hostile, why in (
        (model | {"features.1.num_batches_tracked": np.zeros((), np.float32)}, "unexpected"),
        (model | {"head.3.bias": model["head.3.bias"].astype(np.float64)}, "dtype"),
        (model | {"head.1.weight": np.zeros((64, 513), np.float32)}, "shape"),
        (model | {"head.3.bias": np.array([np.nan, 0], np.float32)}, "NaN"),
    ):
        with pytest.raises(TensorError, match=why):
            decode_tensors(encode_tensors(hostile), specs)


# --- a hostile spec inside the schema -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "hostile",
    [
        {"batch_size": 100_001},
        {"local_epochs": 1001},
        {"input_size": 513},
        {"channels": 5},
        {"augment_shift": 17},
        {"augment_rotate": 181.0},
        {"architecture": "monai-densenet121", "input_size": 32},
        {"architecture": "monai.networks.nets.DenseNet"},
        {"network_args": {"spatial_dims": 2, "init_features": 10**6}},
        {"learning_rate": float("inf")},
    ],
)
def test_params_beyond_the_recipes_bounds_are_refused_before_any_network_is_built(hostile):
    with pytest.raises(RecipeParamsError):
        resolve_recipe("torch", "1", {**SMALL, **hostile})


def test_dp_sgd_computes_per_example_gradients_in_bounded_chunks_whatever_the_sample_rate(data, monkeypatch):
    # memory of a DP step is (images at once) x (parameters): a rate of 1 over a site's images must not hold
    # every image's gradient of every parameter at once (ResNet-18: 45 MB per image in float32)
    r = recipe(**DP)
    d = sum(math.prod(s.shape) for s in r.param_specs())  # GroupNorm: every tensor is trained
    monkeypatch.setattr(torch_recipe, "_DP_CHUNK_VALUES", 4 * d + 3, raising=False)
    seen: list[int] = []
    from opacus import GradSampleModule

    forward = GradSampleModule.forward
    monkeypatch.setattr(
        GradSampleModule,
        "forward",
        lambda self, x, *a, **k: seen.append(x.shape[0]) or forward(self, x, *a, **k),
    )
    start = r.init(0)
    release = RecordDp(noise_multiplier=0.0, max_grad_norm=0.05, sample_rate=1.0, steps=1)
    chunked = r.train(start, data, np.random.default_rng(0), record_dp=release)
    assert sum(seen) == 18
    assert max(seen) <= 4
    monkeypatch.setattr(torch_recipe, "_DP_CHUNK_VALUES", 1000 * d, raising=False)
    whole = r.train(start, data, np.random.default_rng(0), record_dp=release)
    for k in start:
        np.testing.assert_allclose(chunked.params[k], whole.params[k], rtol=1e-5, atol=1e-7)


# --- DP-SGD: what it computes ------------------------------------------------------------------------


def _flat(model, names):
    return np.concatenate([np.asarray(model[n], np.float64).ravel() for n in names])


def test_dp_sgd_clips_each_examples_gradient_to_the_clip_norm(data):
    # one step at rate 1 without noise is -lr * (sum of each image's gradient clipped to C) / n: recomputed
    # here image by image with plain torch
    r = recipe(**DP)
    start = r.init(0)
    clip, lr = 0.05, 0.1
    release = RecordDp(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=1.0, steps=1)
    private = r.train(start, data, np.random.default_rng(0), record_dp=release)

    net = torch_recipe._load(r.params, start)
    net.train()
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    images = torch.from_numpy(data.X_train.astype(np.float32).reshape(-1, 1, 16, 16))
    labels = torch.from_numpy(np.array(data.y_train, np.int64))
    clipped, norms, raw = [], [], []
    for i in range(images.shape[0]):
        net.zero_grad()
        torch.nn.functional.cross_entropy(
            net(images[i : i + 1]), labels[i : i + 1], reduction="sum"
        ).backward()
        g = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double().numpy()
        raw.append(g)
        norms.append(np.linalg.norm(g))
        clipped.append(g * min(1.0, clip / norms[-1]))
    assert min(norms) > clip  # every image's gradient was longer than C: the clip did something
    n = images.shape[0]
    expected = -lr * np.sum(clipped, axis=0) / n
    got = _flat(private.params, names) - _flat(start, names)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-7)
    # not the batch's gradient clipped as a whole (which a flag-only DP would give)
    batch = -lr * np.sum(raw, axis=0) * min(1.0, clip / np.linalg.norm(np.sum(raw, axis=0))) / n
    assert np.linalg.norm(got - batch) > 0.1 * np.linalg.norm(got)
    assert np.linalg.norm(got) <= lr * clip * (1 + 1e-6)  # no image moves the model more than lr C / n


def test_dp_sgd_noise_has_the_noise_multiplier_times_the_clip_norm_as_standard_deviation(data, monkeypatch):
    # a rate so small that every Poisson sample is empty: the step is the noise alone, -lr * N(0, (sigma C)^2)
    # / (q n), over every trainable coordinate
    sizes: list[int] = []
    sample = torch_recipe.poisson_sample
    monkeypatch.setattr(
        torch_recipe,
        "poisson_sample",
        lambda n, q, rng: (lambda b: sizes.append(b.size) or b)(sample(n, q, rng)),
    )
    r = recipe(**{**DP, "learning_rate": 1e-5})
    start = r.init(0)
    sigma, clip, q = 3.0, 0.5, 1e-6
    release = RecordDp(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q, steps=1)
    private = r.train(start, data, np.random.default_rng(5), record_dp=release)
    assert sizes == [0]
    names = sorted(k for k in start if not k.endswith(("running_mean", "running_var")))
    noise = (_flat(private.params, names) - _flat(start, names)) * (q * 18) / -1e-5
    assert noise.size > 30_000
    assert abs(noise.mean()) < 0.05 * sigma * clip
    assert noise.std() == pytest.approx(sigma * clip, rel=0.03)


def test_dp_sgd_takes_exactly_the_steps_the_ledger_pays_for_whatever_the_epochs_and_batch(data, monkeypatch):
    spec = StudySpec(
        name="imaging-dp",
        dataset="squares",
        recipe=RecipeSpec(name="torch", params={**DP, "local_epochs": 50, "batch_size": 1}),
        rounds=2,
        train_sites=["a", "b"],
        seed=2,
        privacy=PrivacySpec(
            delta=1e-4, noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=0.2, steps_per_round=3
        ),
    )
    [charged] = task_plan(spec, TaskKind.TRAIN, "a").releases  # what the site's ledger pays per round
    assert isinstance(charged, DpSgdRelease)
    draws: list[tuple[int, float]] = []
    sample = torch_recipe.poisson_sample
    monkeypatch.setattr(
        torch_recipe, "poisson_sample", lambda n, q, rng: draws.append((n, q)) or sample(n, q, rng)
    )
    r = resolve_recipe("torch", "1", spec.recipe.params)
    release = RecordDp(
        noise_multiplier=charged.noise_multiplier,
        max_grad_norm=1.0,
        sample_rate=charged.sample_rate,
        steps=charged.steps,
    )
    result = r.train(r.init(0), data, np.random.default_rng(0), record_dp=release)
    assert charged.steps == 3
    assert draws == [(18, charged.sample_rate)] * charged.steps  # Poisson draws over every image, no epochs
    assert result.steps == charged.steps
    assert result.train_loss is None  # a figure of the training records without noise never leaves


def test_the_update_has_exactly_the_models_tensors_and_no_per_example_data(data):
    r = recipe(**DP)
    specs = {s.name: s for s in r.param_specs()}
    release = RecordDp(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2)
    for result in (
        r.train(r.init(0), data, np.random.default_rng(0)),
        r.train(r.init(0), data, np.random.default_rng(0), record_dp=release),
    ):
        assert result.params.keys() == specs.keys()
        for name, value in result.params.items():
            assert value.dtype == np.float32
            assert value.shape == specs[name].shape
            assert np.isfinite(value).all()
        assert result.site_state is None
        assert sum(math.prod(s.shape) for s in specs.values()) == sum(v.size for v in result.params.values())


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"norm": "batch"}, "norm = 'group'"),
        ({"norm": "group", "optimizer": "adam"}, "optimizer must be 'sgd'"),
        ({"norm": "group", "momentum": 0.9}, "momentum 0"),
    ],
    ids=["batchnorm", "adam", "momentum"],
)
def test_dp_sgd_handed_a_network_or_optimizer_it_cannot_protect_refuses_in_one_line(data, params, why):
    # the orchestrator and the site's privacy check refuse such a study first; the recipe itself still never
    # runs DP-SGD where a layer mixes the images of a batch or the optimizer is not plain SGD
    r = recipe(**params)
    release = RecordDp(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=1)
    with pytest.raises(RecipeError, match=why) as err:
        r.train(r.init(0), data, np.random.default_rng(0), record_dp=release)
    assert "\n" not in str(err.value)
