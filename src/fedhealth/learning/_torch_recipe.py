"""Image classifiers in PyTorch as a recipe plug-in (``torch``, version 1; the ``imaging`` extra).

A site's images reach the recipe as a :class:`~fedhealth.data.TabularDataset` whose rows are the images
flattened in (channel, row, column) order with values in [0, 1] (the image connectors and the BreastMNIST
loader build them so); the recipe reshapes each row to ``(channels, input_size, input_size)``. The model's
tensors are the network's ``state_dict`` (parameters and BatchNorm running statistics; not BatchNorm's
integer step counter) as float32 arrays under their torch names, so every strategy, the secure sum and
site-level DP treat them like any other model.

Determinism: every random choice (the initial weights, the shuffling, the flips, the DP samples and noise)
comes from the seed or the runtime's generator, and torch runs with ``use_deterministic_algorithms``: on
CPU two runs with the same seed give bit-identical models. CUDA is used when present (the same seed is then
expected to give a model close to, not bit-identical with, the CPU one; not measured, no GPU was lent).

FedProx is the proximal term ``proximal_mu / 2 * ||w - w_global||^2`` in the local loss (set
``proximal_mu`` with the strategy ``fedprox``, as for logistic regression). SCAFFOLD (Karimi et al. 2020) is
``scaffold = true`` with the strategy ``scaffold``: the model then also carries the server control variate c
(tensors ``scaffold.c.<parameter>``, zero at first, one per trainable parameter), each local SGD step uses
the corrected gradient g - c_i + c, and after the round the site's control variate becomes (option II)
c_i+ = c_i - c + (x - y_i) / (K lr) for K steps at learning rate lr. c_i stays at the site (the runtime
keeps it per study, as :attr:`TrainResult.site_state`); the update the site sends is (Δy_i, Δc_i), so it
travels in the secure sum like any update, at twice the size. Record-level DP (DP-SGD) uses
Opacus for the per-example gradients and fedhealth.privacy's clipping, noise and Poisson sampling, driven by
the runtime's generator, so the site's ledger pays exactly the :class:`RecordDp` release it runs.

torch and Opacus are imported only inside the functions that need them: fedhealth.learning imports without
them, and a site without the extra gets a clear error naming it when a study asks for this recipe.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from fedhealth.core import DatasetError, TensorSpec, check_deadline
from fedhealth.data import TabularDataset
from fedhealth.learning._checks import check_tensors
from fedhealth.learning._config import LocalOptimizer
from fedhealth.learning._errors import RecipeError
from fedhealth.learning._recipe import (
    CombinationPattern,
    DataSchema,
    DpLevel,
    ModelExport,
    Params,
    RecipeCapabilities,
    RecordDp,
    ReferenceStep,
    TemplateParam,
)
from fedhealth.learning._results import EvalResult, TrainResult
from fedhealth.privacy import noisy_clipped_sum, poisson_sample

if TYPE_CHECKING:
    import torch
    from torch import nn

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
_EVAL_BATCH = 256
_DP_CHUNK_VALUES = 1 << 25  # per-example gradient values held at once by DP-SGD (256 MiB in float64)
_SKIPPED_BUFFERS = ("num_batches_tracked",)  # an integer counter, meaningless to average
CONTROL_VARIATE_PREFIX = "scaffold.c."  # SCAFFOLD's server control variate, one per trainable parameter


class Architecture(StrEnum):
    """The networks the recipe builds (see :mod:`fedhealth.learning._torch_nets`)."""

    CNN = "cnn"
    CNN_WIDE = "cnn_wide"
    RESNET18 = "resnet18"
    MONAI_DENSENET = "monai-densenet"  # MONAI's DenseNet, three blocks (16x16 images and up)
    MONAI_DENSENET121 = "monai-densenet121"  # MONAI's DenseNet-121 (64x64 images and up)


# the smallest input side of each architecture: its last BatchNorm must see at least 2x2 pixels (it cannot
# train on one value per channel, i.e. one image of 1x1)
_MIN_INPUT_SIZE = {
    Architecture.CNN: 8,
    Architecture.CNN_WIDE: 8,
    Architecture.RESNET18: 8,
    Architecture.MONAI_DENSENET: 16,
    Architecture.MONAI_DENSENET121: 64,
}


class Norm(StrEnum):
    BATCH = "batch"
    GROUP = "group"  # BatchNorm replaced by GroupNorm through Opacus' ModuleValidator (needed by DP-SGD)


class TorchParams(BaseModel):
    """``recipe.params`` of ``torch``: the network and how each site trains it per round."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: Architecture = Architecture.CNN
    input_size: int = Field(default=28, ge=8, le=512, description="images are input_size x input_size")
    channels: int = Field(default=1, ge=1, le=4)
    n_classes: int = Field(default=2, ge=2, le=2, description="binary labels (0/1) for now")
    norm: Norm = Norm.BATCH
    optimizer: LocalOptimizer = LocalOptimizer.ADAM
    learning_rate: FiniteFloat = Field(default=0.001, gt=0, le=10)
    momentum: FiniteFloat = Field(default=0.0, ge=0, lt=1, description="SGD momentum")
    weight_decay: FiniteFloat = Field(default=0.0, ge=0, le=1)
    local_epochs: int = Field(default=1, ge=0, le=1000)
    batch_size: int = Field(default=32, ge=1, le=100_000)
    augment_flips: bool = Field(default=False, description="random horizontal flips while training")
    augment_shift: int = Field(
        default=0, ge=0, le=16, description="random translations of up to this many pixels"
    )
    augment_rotate: FiniteFloat = Field(
        default=0.0, ge=0, le=180, description="random rotations, max degrees"
    )
    proximal_mu: FiniteFloat = Field(default=0.0, ge=0, le=100, description="FedProx proximal weight")
    scaffold: bool = Field(default=False, description="SCAFFOLD control variates (with strategy scaffold)")

    @model_validator(mode="after")
    def _input_fits_the_network(self) -> TorchParams:
        least = _MIN_INPUT_SIZE[self.architecture]
        if self.input_size < least:
            raise ValueError(
                f"architecture {self.architecture.value!r} needs input_size of at least {least} (its "
                f"downsampling leaves nothing of {self.input_size}x{self.input_size} images)"
            )
        return self

    @model_validator(mode="after")
    def _scaffold_runs_plain_sgd(self) -> TorchParams:
        # Option II's c_i+ = c_i - c + (x - y_i)/(K lr) estimates the mean gradient only when every local step
        # is x <- x - lr * (corrected gradient): plain SGD, no momentum, no proximal term
        if self.scaffold and (self.optimizer is not LocalOptimizer.SGD or self.momentum or self.proximal_mu):
            raise ValueError(
                "scaffold needs optimizer 'sgd' with momentum 0 and proximal_mu 0 (its control variates are "
                "computed from the plain SGD steps)"
            )
        return self

    @property
    def n_features(self) -> int:
        return self.channels * self.input_size * self.input_size


def _missing_extra(exc: ImportError) -> RecipeError:
    return RecipeError(
        f"recipe 'torch' needs the imaging extra (pip install 'fedhealth[imaging]'): {exc.msg}"
    )


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise _missing_extra(exc) from None
    return torch


def _device() -> torch.device:
    torch = _torch()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_threads() -> int:
    """CPU threads torch uses: ``$FEDHEALTH_TORCH_THREADS``, else half the cores (at least 1). An agent
    shares its machine (HTTP, secure aggregation, other processes): on a busy 2-core host two spinning
    torch threads ran a CNN step ten times slower than one."""
    text = os.environ.get("FEDHEALTH_TORCH_THREADS", "")
    if text.strip().isdigit() and int(text) >= 1:
        return int(text)
    return max(1, (os.cpu_count() or 2) // 2)


def _deterministic() -> None:
    """Bit-reproducible kernels on CPU. On CUDA some backward kernels (adaptive average pooling, max
    pooling) have no deterministic version, and strict mode would refuse them: there cuDNN is only asked for
    deterministic convolutions, and a rerun gives a model close to, not bit-identical with, the first."""
    torch = _torch()
    if torch.get_num_threads() != torch_threads():
        torch.set_num_threads(torch_threads())
    torch.backends.cudnn.benchmark = False
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(True)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's global generator seeded with ``seed`` inside, restored after (layers draw their init there)."""
    torch = _torch()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _network(params: TorchParams) -> nn.Module:
    try:
        from fedhealth.learning._torch_nets import build_network

        return build_network(
            params.architecture.value, params.channels, params.input_size, params.n_classes, params.norm.value
        )
    except ImportError as exc:
        raise _missing_extra(exc) from None


def _exported(net: nn.Module) -> Params:
    return {
        name: value.detach().to("cpu").numpy().astype(np.float32, copy=True)
        for name, value in net.state_dict().items()
        if not name.endswith(_SKIPPED_BUFFERS)
    }


@functools.lru_cache(maxsize=32)
def _net_specs(params: TorchParams) -> tuple[TensorSpec, ...]:
    """The network's own tensors (what is exported and evaluated)."""
    with _seeded(0):
        tensors = _exported(_network(params))
    return tuple(TensorSpec(name=k, shape=tuple(v.shape)) for k, v in sorted(tensors.items()))


@functools.lru_cache(maxsize=32)
def _control_variate_specs(params: TorchParams) -> tuple[TensorSpec, ...]:
    """SCAFFOLD's server control variate: one tensor per trainable parameter (none without scaffold)."""
    if not params.scaffold:
        return ()
    with _seeded(0):
        net = _network(params)
    return tuple(
        TensorSpec(name=CONTROL_VARIATE_PREFIX + name, shape=tuple(p.shape))
        for name, p in sorted(net.named_parameters())
        if p.requires_grad
    )


def _specs(params: TorchParams) -> tuple[TensorSpec, ...]:
    """Every tensor of the study's model: the network's, then the control variates, sorted by name."""
    return tuple(sorted((*_net_specs(params), *_control_variate_specs(params)), key=lambda s: s.name))


def _load(params: TorchParams, model: Params) -> nn.Module:
    """The network holding ``model``'s tensors (on CPU); control variates in ``model`` are not its."""
    torch = _torch()
    with _seeded(0):
        net = _network(params)
    specs = {s.name: s.shape for s in _net_specs(params)}
    given = {k for k in model if not k.startswith(CONTROL_VARIATE_PREFIX)}
    # control variates are checked where they are used (_ScaffoldVariates); one the study does not have is
    # as unexpected as any other tensor (an exported model, the network alone, may carry none)
    variates = {s.name for s in _control_variate_specs(params)}
    smuggled = {k for k in model if k.startswith(CONTROL_VARIATE_PREFIX)} - variates
    if given != set(specs) or smuggled:
        raise RecipeError(
            f"the model's tensors do not match the network: missing {sorted(set(specs) - given)}, "
            f"unexpected {sorted((given - set(specs)) | smuggled)}"
        )
    # exact shapes (never a silent reshape of as many values), float values, all finite: one line naming the
    # tensor, before any step (a site may get this model from a malicious orchestrator)
    check_tensors("the model", {k: model[k] for k in specs}, specs)
    state = {k: torch.from_numpy(np.array(model[k], dtype=np.float32)) for k in specs}
    net.load_state_dict(state, strict=False)
    return net


def _images(params: TorchParams, X: np.ndarray) -> np.ndarray:
    if X.ndim != 2 or X.shape[1] != params.n_features:
        raise DatasetError(
            f"images must be rows of {params.n_features} values ({params.channels} x {params.input_size} x "
            f"{params.input_size}), got {X.shape[1] if X.ndim == 2 else X.shape}"
        )
    return np.ascontiguousarray(X, dtype=np.float32).reshape(
        -1, params.channels, params.input_size, params.input_size
    )


def _flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image mirrored left-right with probability 1/2 (drawn from ``rng``)."""
    flips = rng.random(images.shape[0]) < 0.5
    out = images.copy()
    out[flips] = out[flips][..., ::-1]
    return out


def _shift(images: np.ndarray, most: int, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by a whole number of pixels drawn uniformly in [-most, most] along each axis (drawn
    from ``rng``), the uncovered border filled with zeros: a random crop of the zero-padded image."""
    side_y, side_x = images.shape[-2:]
    padded = np.pad(images, [(0, 0)] * (images.ndim - 2) + [(most, most), (most, most)])
    moves = rng.integers(0, 2 * most + 1, size=(images.shape[0], 2))
    out = np.empty_like(images)
    for i, (dy, dx) in enumerate(moves):
        out[i] = padded[i, ..., dy : dy + side_y, dx : dx + side_x]
    return out


def _rotate(images: np.ndarray, most: float, rng: np.random.Generator) -> np.ndarray:
    """Each image turned about its centre by an angle drawn uniformly in [-most, most] degrees (drawn from
    ``rng``; bilinear, the corners filled with the nearest edge pixel)."""
    from scipy import ndimage  # scipy (scikit-learn's dependency) loads slowly: on first use

    angles = rng.uniform(-most, most, size=images.shape[0])
    out = np.empty_like(images)
    for i, angle in enumerate(angles):
        out[i] = ndimage.rotate(
            images[i], float(angle), axes=(-1, -2), reshape=False, order=1, mode="nearest"
        )
    return out


def _augmented(params: TorchParams, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The training batch with the recipe's augmentations (flips, then rotations, then shifts), every draw
    from ``rng``; with none asked for, the images themselves."""
    if params.augment_flips:
        images = _flip(images, rng)
    if params.augment_rotate > 0:
        images = _rotate(images, params.augment_rotate, rng)
    if params.augment_shift > 0:
        images = _shift(images, params.augment_shift, rng)
    return images


def _optimizer(params: TorchParams, net: nn.Module) -> torch.optim.Optimizer:
    torch = _torch()
    if params.optimizer is LocalOptimizer.ADAM:
        return torch.optim.Adam(net.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    return torch.optim.SGD(
        net.parameters(), lr=params.learning_rate, momentum=params.momentum, weight_decay=params.weight_decay
    )


def _rows(dataset: TabularDataset | None) -> TabularDataset:
    if dataset is None:
        raise DatasetError("the torch recipe needs the site's images")
    return dataset


def _check_finite(local: Params) -> None:
    """No update with a non-finite value leaves the site (a hostile global model or spec can overflow a
    step even when every value it sent was finite)."""
    if not all(np.isfinite(v).all() for v in local.values()):
        from fedhealth.learning._errors import TrainingDivergedError

        raise TrainingDivergedError("local training diverged (non-finite weights); lower the learning rate")


def torch_train(
    params: TorchParams,
    model: Params,
    dataset: TabularDataset,
    rng: np.random.Generator,
    site_state: Params | None = None,
) -> TrainResult:
    """One round of local training: ``local_epochs`` shuffled passes (order and flips from ``rng``). With
    ``params.scaffold`` each step's gradient is corrected by c - c_i (c from ``model``, c_i from
    ``site_state``; zero on the site's first round) and the result carries the new c_i (module docstring)."""
    torch = _torch()
    _deterministic()
    device = _device()
    images = _images(params, dataset.X_train)
    labels = np.asarray(dataset.y_train, dtype=np.int64)
    n = images.shape[0]
    if n == 0:
        raise DatasetError("cannot train on an empty dataset")
    net = _load(params, model).to(device)
    net.train()
    optimizer = _optimizer(params, net)
    anchor = [p.detach().clone() for p in net.parameters()] if params.proximal_mu > 0 else None
    variates = _ScaffoldVariates(params, model, site_state) if params.scaffold else None
    correction = None
    if variates is not None:
        correction = [torch.from_numpy(c).to(device) for c in variates.correction()]
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    seen, loss_total, steps = 0, 0.0, 0
    for _ in range(params.local_epochs):
        order = rng.permutation(n)
        for start in range(0, n, params.batch_size):
            check_deadline()  # past the round's deadline no update is taken: stop (core/_deadline.py)
            idx = order[start : start + params.batch_size]
            batch = _augmented(params, images[idx], rng)
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            y = torch.from_numpy(labels[idx]).to(device)
            optimizer.zero_grad(set_to_none=True)
            data_loss = loss_fn(net(x), y)
            loss = data_loss / idx.size
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(net.parameters(), anchor, strict=True))
                loss = loss + params.proximal_mu / 2 * prox
            loss.backward()
            if correction is not None:
                for p, corr in zip(net.parameters(), correction, strict=True):
                    assert p.grad is not None  # every parameter of the built-in networks takes part
                    p.grad.add_(corr)
            optimizer.step()
            seen += int(idx.size)
            loss_total += float(data_loss.detach())
            steps += 1
    local = _exported(net)
    _check_finite(local)
    loss_mean = loss_total / seen if seen else None
    if variates is None:
        return TrainResult(params=local, num_samples=n, train_loss=loss_mean, steps=steps)
    shared, own = variates.after(local, steps)
    return TrainResult(
        params=local | shared, num_samples=n, train_loss=loss_mean, steps=steps, site_state=own
    )


class _ScaffoldVariates:
    """SCAFFOLD's control variates at one site for one round (float64 arithmetic, float32 results).

    ``c`` comes with the global model, ``c_i`` from the site's state (zero on its first round of the study).
    Parameters are in ``net.named_parameters()`` order (the order :func:`torch_train` walks them)."""

    def __init__(self, params: TorchParams, model: Params, site_state: Params | None) -> None:
        with _seeded(0):
            net = _network(params)
        self.names = [name for name, _ in net.named_parameters()]
        shapes = {s.name: s.shape for s in _control_variate_specs(params)}
        self.lr = params.learning_rate
        check_tensors("the model's control variates", {k: model[k] for k in shapes if k in model}, shapes)
        self.x = [np.asarray(model[n], dtype=np.float64) for n in self.names]
        self.c = [np.asarray(model[CONTROL_VARIATE_PREFIX + n], dtype=np.float64) for n in self.names]
        if site_state is None:
            self.c_i = [np.zeros_like(c) for c in self.c]
            return
        if set(site_state) != set(shapes) or any(
            tuple(np.shape(site_state[k])) != shape for k, shape in shapes.items()
        ):
            raise RecipeError(
                "the site's SCAFFOLD state does not match this study's network (was the site's state of "
                "another study?)"
            )
        self.c_i = [np.asarray(site_state[CONTROL_VARIATE_PREFIX + n], dtype=np.float64) for n in self.names]
        if not all(np.isfinite(v).all() for v in self.c_i):
            raise RecipeError("the site's SCAFFOLD state holds non-finite values")

    def correction(self) -> list[np.ndarray]:
        """c - c_i, added to every step's gradient (float32)."""
        return [(c - c_i).astype(np.float32) for c, c_i in zip(self.c, self.c_i, strict=True)]

    def after(self, local: Params, steps: int) -> tuple[Params, Params]:
        """``(the local model's control-variate tensors, the site's new c_i)`` after ``steps`` local steps:
        option II, c_i+ = c_i - c + (x - y_i) / (K lr); the local tensors are c + (c_i+ - c_i), so the update
        (local - global) carries Δc_i. No step (no local data pass) leaves c_i as it was."""
        shared: Params = {}
        own: Params = {}
        for name, x, c, c_i in zip(self.names, self.x, self.c, self.c_i, strict=True):
            if steps:
                y = np.asarray(local[name], dtype=np.float64)
                new = c_i - c + (x - y) / (steps * self.lr)
            else:
                new = c_i
            shared[CONTROL_VARIATE_PREFIX + name] = (c + (new - c_i)).astype(np.float32)
            own[CONTROL_VARIATE_PREFIX + name] = new.astype(np.float32)
        return shared, own


def torch_train_dp(
    params: TorchParams, model: Params, dataset: TabularDataset, rng: np.random.Generator, record_dp: RecordDp
) -> TrainResult:
    """DP-SGD: ``record_dp.steps`` steps, each on a Poisson sample at ``record_dp.sample_rate`` drawn from
    ``rng``; Opacus' :class:`GradSampleModule` computes the per-example gradients, fedhealth.privacy clips
    each (over all the network's parameters) to ``max_grad_norm``, sums them and adds the Gaussian noise
    (drawn from ``rng``), divided by the expected batch size; a plain SGD step follows."""
    torch = _torch()
    try:
        from opacus import GradSampleModule
    except ImportError as exc:
        raise _missing_extra(exc) from None
    _deterministic()
    device = _device()
    images = _images(params, dataset.X_train)
    labels = np.asarray(dataset.y_train, dtype=np.int64)
    n = images.shape[0]
    if n == 0:
        raise DatasetError("cannot train on an empty dataset")
    net = _load(params, model).to(device)
    net.train()
    gsm = GradSampleModule(net, loss_reduction="sum")
    trainable = [p for p in net.parameters() if p.requires_grad]
    sizes = [p.numel() for p in trainable]
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    expected_batch = record_dp.sample_rate * n
    # per-example gradients take (images x parameters) memory: computed a chunk of images at a time, each
    # chunk clipped and summed before the next, so a high rate or a large network (ResNet-18: 45 MB of
    # gradients per image) cannot exhaust the site's memory; clipping each example makes this exact
    chunk = max(1, _DP_CHUNK_VALUES // sum(sizes))

    def per_example_gradients(chosen: np.ndarray, chosen_labels: np.ndarray) -> Iterator[np.ndarray]:
        for start in range(0, chosen.shape[0], chunk):
            x = torch.from_numpy(np.ascontiguousarray(chosen[start : start + chunk])).to(device)
            y = torch.from_numpy(chosen_labels[start : start + chunk]).to(device)
            gsm.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # Opacus' hooks are full backward hooks; the images need no gradient, which torch notes
                warnings.filterwarnings(
                    "ignore", message="Full backward hook is firing", category=UserWarning
                )
                loss_fn(gsm(x), y).backward()
            yield (
                torch.cat([p.grad_sample.reshape(x.shape[0], -1) for p in trainable], dim=1)
                .to("cpu", torch.float64)
                .numpy()
            )

    for _ in range(record_dp.steps):
        check_deadline()
        batch = poisson_sample(n, record_dp.sample_rate, rng)
        if batch.size == 0:
            grads: Iterable[np.ndarray] = [np.zeros((0, sum(sizes)), dtype=np.float64)]
        else:
            grads = per_example_gradients(_augmented(params, images[batch], rng), labels[batch])
        noisy, _ = noisy_clipped_sum(
            grads, max_grad_norm=record_dp.max_grad_norm, noise_multiplier=record_dp.noise_multiplier, rng=rng
        )
        step = torch.from_numpy(noisy / expected_batch)
        with torch.no_grad():
            offset = 0
            for p, size in zip(trainable, sizes, strict=True):
                update = step[offset : offset + size].reshape(p.shape).to(device, p.dtype)
                p.add_(update + params.weight_decay * p, alpha=-params.learning_rate)
                offset += size
            # stop at the first overflow: the next step's per-example gradients would be NaN, which the
            # clipping refuses with a message about DP parameters rather than about the training
            if not all(bool(torch.isfinite(p).all()) for p in trainable):
                _check_finite(_exported(net))
    gsm.zero_grad(set_to_none=True)
    local = _exported(net)  # the wrapped network, its parameters updated in place
    _check_finite(local)
    return TrainResult(params=local, num_samples=n, train_loss=None, steps=record_dp.steps)


def torch_evaluate(params: TorchParams, model: Params, X: np.ndarray, y: np.ndarray) -> EvalResult:
    """Mean cross-entropy, accuracy (the most probable class) and ROC AUC (of class 1's probability)."""
    torch = _torch()
    _deterministic()
    images = _images(params, X)
    labels = np.array(y, dtype=np.int64)
    if images.shape[0] == 0:
        raise DatasetError("evaluation needs at least one image")
    device = _device()
    net = _load(params, model).to(device)
    net.eval()
    logits = []
    with torch.no_grad():
        for start in range(0, images.shape[0], _EVAL_BATCH):
            x = torch.from_numpy(images[start : start + _EVAL_BATCH]).to(device)
            logits.append(net(x).to("cpu", torch.float64))
    z = torch.cat(logits)
    loss = float(torch.nn.functional.cross_entropy(z, torch.from_numpy(labels)))
    prob = torch.softmax(z, dim=1)[:, 1].numpy()
    accuracy = float((z.argmax(dim=1).numpy() == labels).mean())
    from sklearn.metrics import roc_auc_score  # scikit-learn loads slowly: on first use

    auc = float(roc_auc_score(labels, prob)) if np.unique(labels).size == 2 else None
    return EvalResult(num_samples=int(labels.size), loss=loss, accuracy=accuracy, auc=auc)


def torch_predict_proba(params: TorchParams, model: Params, X: np.ndarray) -> np.ndarray:
    """P(label = 1) for each row of ``X`` (flattened images)."""
    torch = _torch()
    images = _images(params, X)
    net = _load(params, model)
    net.eval()
    with torch.no_grad():
        z = net(torch.from_numpy(images)).to(torch.float64)
    return np.asarray(torch.softmax(z, dim=1)[:, 1].numpy())


class TorchRecipe:
    """A 2D image classifier (small CNN or ResNet-18) trained with PyTorch, combined in rounds."""

    name: Literal["torch"] = "torch"
    version: Literal["1"] = "1"
    params_model = TorchParams
    pattern = CombinationPattern.ROUNDS
    capabilities = RecipeCapabilities(
        reads_data=True, record_dp=True, site_dp=True, secure_sum=True, site_state=True
    )

    def data_schema(self, params: TorchParams) -> DataSchema:
        return DataSchema(n_features=params.n_features)

    def param_specs(self, params: TorchParams) -> list[TensorSpec]:
        return list(_specs(params))

    def averaged_tensors(self, params: TorchParams) -> frozenset[str]:
        """BatchNorm's running mean and variance: statistics of the sites' images, averaged plainly by the
        server under every strategy (an adaptive step on them collapses the network)."""
        return frozenset(
            s.name for s in _net_specs(params) if s.name.endswith((".running_mean", ".running_var"))
        )

    def control_variate_tensors(self, params: TorchParams) -> frozenset[str]:
        """SCAFFOLD's server control variate c (with ``scaffold``): moved by the ``scaffold`` strategy."""
        return frozenset(s.name for s in _control_variate_specs(params))

    def init(self, params: TorchParams, seed: int) -> Params:
        with _seeded(seed):
            model = _exported(_network(params))
        return model | {s.name: np.zeros(s.shape, dtype=np.float32) for s in _control_variate_specs(params)}

    def train(
        self,
        params: TorchParams,
        model: Params,
        dataset: TabularDataset | None,
        rng: np.random.Generator,
        *,
        record_dp: RecordDp | None = None,
        site_state: Params | None = None,
    ) -> TrainResult:
        data = _rows(dataset)
        if record_dp is None:
            return torch_train(params, model, data, rng, site_state if params.scaffold else None)
        # the study is refused first (orchestrator and site privacy checks); this guards a direct call, which
        # would otherwise fail in Opacus (BatchNorm) or run plain SGD in place of the spec's Adam or momentum
        problem = self.dp_problem(params, DpLevel.RECORD)
        if problem is not None:
            raise RecipeError(problem)
        return torch_train_dp(params, model, data, rng, record_dp)

    def evaluate(self, params: TorchParams, model: Params, dataset: TabularDataset | None) -> EvalResult:
        data = _rows(dataset)
        return torch_evaluate(params, model, data.X_test, data.y_test)

    def dp_problem(self, params: TorchParams, level: DpLevel) -> str | None:
        if level is not DpLevel.RECORD:
            return None
        if params.scaffold:
            return (
                "record-level DP (DP-SGD) does not run with scaffold's corrected gradients; set scaffold = "
                "false"
            )
        if params.optimizer is not LocalOptimizer.SGD or params.proximal_mu != 0 or params.momentum != 0:
            return (
                "record-level DP trains with plain DP-SGD: the recipe's optimizer must be 'sgd', momentum 0 "
                "and proximal_mu 0"
            )
        try:
            from opacus.validators import ModuleValidator
        except ImportError as exc:
            raise _missing_extra(exc) from None
        with _seeded(0):
            errors = ModuleValidator.validate(_network(params), strict=False)
        if errors:
            return (
                f"record-level DP needs per-example gradients, which this network cannot give "
                f"({type(errors[0]).__name__}: {errors[0]}); set norm = 'group'"
            )
        return None

    def describe(self, params: TorchParams) -> str:
        count = sum(math.prod(s.shape) for s in _net_specs(params))
        flips = ", random horizontal flips" if params.augment_flips else ""
        if params.augment_rotate:
            flips += f", random rotations up to {params.augment_rotate:g} degrees"
        if params.augment_shift:
            flips += f", random shifts up to {params.augment_shift} pixels"
        prox = f", FedProx weight {params.proximal_mu:g}" if params.proximal_mu else ""
        if params.scaffold:
            prox += ", SCAFFOLD control variates (the site keeps its own between rounds)"
        return (
            f"image classifier {params.architecture.value} ({params.norm.value} norm, {count} values) on "
            f"{params.channels}-channel {params.input_size}x{params.input_size} images; "
            f"{params.local_epochs} epoch(s) of {params.optimizer.value} per round at learning rate "
            f"{params.learning_rate:g}, batch size {params.batch_size}{flips}{prox}"
        )

    def template(self, n_features: int | None) -> list[TemplateParam]:
        side = math.isqrt(n_features) if n_features else 28
        return [
            TemplateParam(
                key="architecture",
                value="cnn",
                comment="cnn, cnn_wide, resnet18, monai-densenet (16x16 up), monai-densenet121 (64x64 up)",
            ),
            TemplateParam(key="input_size", value=side, comment="images are resized to this side"),
            TemplateParam(key="channels", value=1, comment="1 for grey-scale, 3 for colour"),
            TemplateParam(key="norm", value="batch", comment="batch, or group (needed by record-level DP)"),
            TemplateParam(key="optimizer", value="adam", comment="sgd or adam (DP-SGD needs sgd)"),
            TemplateParam(key="learning_rate", value=0.001, comment="step size of local training"),
            TemplateParam(key="local_epochs", value=1, comment="passes over the local images per round"),
            TemplateParam(key="batch_size", value=32, comment="images per minibatch"),
            TemplateParam(key="augment_flips", value=False, comment="random horizontal flips"),
        ]

    def reference_step(self) -> ReferenceStep:
        params = TorchParams(local_epochs=1, batch_size=32)
        images = np.random.default_rng(0).random((128, params.n_features))
        labels = (np.arange(128) % 2).astype(np.int64)

        def run() -> None:
            data = TabularDataset(
                name="reference",
                X_train=images,
                y_train=labels,
                X_test=images[:2],
                y_test=labels[:2],
                feature_names=tuple(f"px{i}" for i in range(params.n_features)),
            )
            torch_train(params, self.init(params, 0), data, np.random.default_rng(0))

        return ReferenceStep(run=run, note="one epoch of the small CNN, 128 images of 28 x 28")

    def export(self, params: TorchParams, model: Params) -> ModelExport:
        specs = _net_specs(params)  # the control variates are training state, not the model
        tensors = {s.name: np.array(model[s.name], dtype=np.float32) for s in specs}
        metadata: dict[str, JsonValue] = {
            "recipe": self.name,
            "version": self.version,
            "feature_names": None,
            "architecture": params.architecture.value,
            "norm": params.norm.value,
            "input_shape": [params.channels, params.input_size, params.input_size],
            "n_classes": params.n_classes,
            "output": "softmax over the classes of the network's logits; input pixels in [0, 1]",
        }
        return ModelExport(tensors=tensors, metadata=metadata)


TORCH_RECIPE = TorchRecipe()

# BreastMNIST (28 x 28 grey, 4 sites): the demo's and the benchmark's settings (docs/benchmarks.md)
BREASTMNIST_PARAMS = TorchParams(
    architecture=Architecture.CNN,
    input_size=28,
    channels=1,
    optimizer=LocalOptimizer.ADAM,
    learning_rate=0.001,
    local_epochs=1,
    batch_size=32,
    augment_flips=True,
)
BREASTMNIST_ROUNDS = 20
