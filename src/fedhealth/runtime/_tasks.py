"""What a task does, independent of transport.

The site side (train or evaluate on local data) and the server side (initial model, aggregation, the server
strategy) both live here, composed from ``learning``, ``data`` and the wire types of ``protocol``, so the two
services stay thin and a whole round can also be driven in memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhealth.core import DatasetError, TensorError, TensorSpec, decode_tensors, encode_tensors
from fedhealth.data import TabularDataset
from fedhealth.learning import (
    LocalOptimizer,
    LogRegConfig,
    StrategyConfig,
    StrategyKind,
    StudyPreset,
    apply_strategy,
    logreg_evaluate,
    logreg_init,
    logreg_param_specs,
    logreg_train,
    logreg_train_dp,
    synthetic_init,
    synthetic_train,
    task_rng,
    weighted_mean,
)
from fedhealth.privacy import secure_generator
from fedhealth.protocol import (
    RESULT_METADATA_KEY,
    DpMode,
    RecipeName,
    RecipeSpec,
    ResultManifest,
    SiteMetrics,
    StrategySpec,
    StudySpec,
    Task,
)
from fedhealth.runtime._privacy import (
    noise_generator,
    noise_multiplier,
    private_mean,
    privatize_update,
    sample_rate,
)

Params = dict[str, np.ndarray]


# --- mapping the wire settings onto the learning layer ---------------------------------------------------


def logreg_config(recipe: RecipeSpec) -> LogRegConfig:
    assert recipe.n_features is not None  # guaranteed by RecipeSpec's validator
    return LogRegConfig(
        n_features=recipe.n_features,
        local_epochs=recipe.local_epochs,
        local_steps=recipe.local_steps,
        learning_rate=recipe.learning_rate,
        batch_size=recipe.batch_size,
        optimizer=LocalOptimizer(recipe.optimizer.value),
        l2=recipe.l2,
        proximal_mu=recipe.proximal_mu,
    )


def strategy_config(strategy: StrategySpec) -> StrategyConfig:
    return StrategyConfig(
        kind=StrategyKind(strategy.name.value),
        server_learning_rate=strategy.server_learning_rate,
        beta1=strategy.beta1,
        beta2=strategy.beta2,
        tau=strategy.tau,
    )


def recipe_spec(config: LogRegConfig) -> RecipeSpec:
    """The wire form of a learning-layer recipe (e.g. from a preset)."""
    return RecipeSpec(
        name=RecipeName.LOGREG,
        n_features=config.n_features,
        local_epochs=config.local_epochs,
        local_steps=config.local_steps,
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        optimizer=config.optimizer.value,  # type: ignore[arg-type]
        l2=config.l2,
        proximal_mu=config.proximal_mu,
    )


def strategy_spec(config: StrategyConfig) -> StrategySpec:
    return StrategySpec(
        name=config.kind.value,  # type: ignore[arg-type]
        server_learning_rate=config.server_learning_rate,
        beta1=config.beta1,
        beta2=config.beta2,
        tau=config.tau,
    )


def preset_study(preset: StudyPreset, **fields: Any) -> StudySpec:
    """A study running a named preset; ``fields`` give the rest (name, dataset, sites, seed...)."""
    return StudySpec.model_validate(
        {
            "recipe": recipe_spec(preset.recipe),
            "strategy": strategy_spec(preset.strategy),
            "rounds": preset.rounds,
            **fields,
        }
    )


def param_specs(recipe: RecipeSpec) -> list[TensorSpec]:
    """The tensors a model of this recipe has; uploads are checked against them."""
    if recipe.name is RecipeName.LOGREG:
        assert recipe.n_features is not None
        return logreg_param_specs(recipe.n_features)
    assert recipe.n_params is not None
    return [TensorSpec(name="weight", shape=(recipe.n_params,), dtype="float32")]


def initial_model(recipe: RecipeSpec, seed: int) -> Params:
    if recipe.name is RecipeName.LOGREG:
        assert recipe.n_features is not None
        return logreg_init(recipe.n_features, seed)
    assert recipe.n_params is not None
    return synthetic_init(recipe.n_params, seed)


# --- site side --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainOutcome:
    delta: Params
    metrics: SiteMetrics


def check_dataset_fits(recipe: RecipeSpec, dataset: TabularDataset) -> None:
    """Refuse a dataset whose width does not match the study's model, before any training."""
    if recipe.name is RecipeName.LOGREG and dataset.X_train.shape[1] != recipe.n_features:
        raise DatasetError(
            f"dataset {dataset.name!r} has {dataset.X_train.shape[1]} features; "
            f"the study's model expects {recipe.n_features}"
        )


def train_on_site(
    task: Task,
    site: str,
    global_params: Params,
    dataset: TabularDataset | None,
    *,
    reproducible_noise: bool | None = None,
) -> TrainOutcome:
    """One round of local training: returns the update (local minus global) and the site's metrics.

    Every random choice is drawn from ``task_rng(seed, round, site)``, so rerunning a task (after a crash)
    produces the same update bit for bit. Differential privacy (``task.spec.privacy``) is the exception:
    its sampling and noise come from a secure generator, unless ``reproducible_noise`` (default: the
    ``FEDHEALTH_REPRODUCIBLE_NOISE`` environment variable) asks for the task's generator; see
    ``fedhealth.runtime._privacy``. Record mode trains with DP-SGD; site modes clip the update (and add the
    site's noise share in distributed mode). A DP task reports no training loss: it is computed from the
    training records without noise.
    """
    privacy = task.spec.privacy
    if privacy is not None and task.recipe.name is not RecipeName.SYNTHETIC:
        return _train_private(task, site, global_params, dataset, reproducible_noise)
    started = time.perf_counter()
    rng = task_rng(task.seed, task.round, site)
    recipe = task.recipe
    if recipe.name is RecipeName.SYNTHETIC:
        result = synthetic_train(global_params, rng)
        delta = {k: (result.params[k] - global_params[k]).astype(np.float32) for k in global_params}
        metrics = SiteMetrics(
            num_samples=result.num_samples,
            train_loss=result.train_loss,
            duration_s=time.perf_counter() - started,
        )
        return TrainOutcome(delta=delta, metrics=metrics)
    if dataset is None:
        raise DatasetError(f"no dataset registered for {task.dataset!r}")
    check_dataset_fits(recipe, dataset)
    result = logreg_train(global_params, dataset.X_train, dataset.y_train, logreg_config(recipe), rng)
    delta = {
        k: (result.params[k].astype(np.float32) - global_params[k]).astype(np.float32) for k in global_params
    }
    metrics = SiteMetrics(
        num_samples=result.num_samples,
        train_loss=result.train_loss,
        duration_s=time.perf_counter() - started,
        **_held_out_metrics(result.params, dataset),
    )
    return TrainOutcome(delta=delta, metrics=metrics)


def _held_out_metrics(params: Params, dataset: TabularDataset) -> dict[str, Any]:
    """A training round's figures on the held-out rows; none when consent left no held-out row."""
    if dataset.num_test == 0:
        return {}
    evaluation = logreg_evaluate(params, dataset.X_test, dataset.y_test)
    return {
        "num_eval_samples": evaluation.num_samples,
        "eval_loss": evaluation.loss,
        "accuracy": evaluation.accuracy,
        "auc": evaluation.auc,
    }


def _train_private(
    task: Task,
    site: str,
    global_params: Params,
    dataset: TabularDataset | None,
    reproducible_noise: bool | None,
) -> TrainOutcome:
    """A training round under differential privacy (see :func:`train_on_site`)."""
    started = time.perf_counter()
    spec = task.spec
    privacy = spec.privacy
    assert privacy is not None
    if dataset is None:
        raise DatasetError(f"no dataset registered for {task.dataset!r}")
    check_dataset_fits(task.recipe, dataset)
    rng = task_rng(task.seed, task.round, site)
    if privacy.mode is not DpMode.RECORD:
        config = logreg_config(task.recipe)
        result = logreg_train(global_params, dataset.X_train, dataset.y_train, config, rng)
        delta = {
            k: (result.params[k].astype(np.float32) - global_params[k]).astype(np.float32)
            for k in global_params
        }
        # The noise share continues the task's stream when reproducible (a fresh secure one otherwise).
        delta = privatize_update(spec, delta, noise_generator(rng, reproducible_noise))
        # The local model itself carries no noise (only the sum does): no figure of it may leave the site.
        return TrainOutcome(
            delta=delta,
            metrics=SiteMetrics(num_samples=result.num_samples, duration_s=time.perf_counter() - started),
        )
    assert privacy.steps_per_round is not None
    local, _ = logreg_train_dp(
        global_params,
        dataset.X_train,
        dataset.y_train,
        noise_multiplier=noise_multiplier(spec, site),
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=sample_rate(spec, site),
        steps=privacy.steps_per_round,
        learning_rate=task.recipe.learning_rate,
        l2=task.recipe.l2,
        rng=noise_generator(rng, reproducible_noise),
    )
    delta = {k: (local[k].astype(np.float32) - global_params[k]).astype(np.float32) for k in global_params}
    # After DP-SGD the local model is itself a DP release: its metrics on the held-out split are
    # post-processing as far as the training records are concerned.
    metrics = SiteMetrics(
        num_samples=int(dataset.X_train.shape[0]),
        duration_s=time.perf_counter() - started,
        **_held_out_metrics(local, dataset),
    )
    return TrainOutcome(delta=delta, metrics=metrics)


def evaluate_on_site(task: Task, params: Params, dataset: TabularDataset | None) -> SiteMetrics:
    """Metrics of the global model on the site's local validation split."""
    started = time.perf_counter()
    if task.recipe.name is RecipeName.SYNTHETIC:
        return SiteMetrics(num_samples=0, duration_s=time.perf_counter() - started)
    if dataset is None:
        raise DatasetError(f"no dataset registered for {task.dataset!r}")
    check_dataset_fits(task.recipe, dataset)
    evaluation = logreg_evaluate(params, dataset.X_test, dataset.y_test)
    return SiteMetrics(
        num_samples=0,
        num_eval_samples=evaluation.num_samples,
        eval_loss=evaluation.loss,
        accuracy=evaluation.accuracy,
        auc=evaluation.auc,
        duration_s=time.perf_counter() - started,
    )


def encode_update(delta: Params, manifest: ResultManifest) -> bytes:
    """The upload body: the update's tensors with the result manifest in the safetensors metadata."""
    return encode_tensors(delta, {RESULT_METADATA_KEY: manifest.model_dump_json()})


def decode_update(data: bytes, specs: Sequence[TensorSpec]) -> tuple[Params, ResultManifest]:
    """Validate an upload against the model's tensor specs; raises ``TensorError`` or pydantic's error."""
    tensors, metadata = decode_tensors(data, specs)
    raw = metadata.get(RESULT_METADATA_KEY)
    if raw is None:
        raise TensorError(f"the upload's metadata lacks {RESULT_METADATA_KEY!r}")
    return tensors, ResultManifest.model_validate_json(raw)


# --- server side ------------------------------------------------------------------------------------------


def bound_update_norm(flat: np.ndarray, max_norm: float) -> np.ndarray:
    """``flat`` scaled down to L2 norm ``max_norm`` if it is longer (float64)."""
    flat = np.asarray(flat, dtype=np.float64)
    norm = float(np.linalg.norm(flat))
    return flat * (max_norm / norm) if norm > max_norm else flat


def bounded_updates(
    strategy: StrategySpec, updates: Sequence[tuple[int, Mapping[str, np.ndarray]]]
) -> list[tuple[int, Mapping[str, np.ndarray]]]:
    """What the server averages in plain mode: each sample count capped at ``weight_cap`` (a site reporting
    2**62 samples would set the model alone) and, with ``max_update_norm``, each update scaled down to that
    L2 norm over all its tensors (clipped, not rejected: an honest site with a large step still counts)."""
    out: list[tuple[int, Mapping[str, np.ndarray]]] = []
    for count, delta in updates:
        if strategy.max_update_norm is not None:
            norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
            if norm > strategy.max_update_norm:
                scale = strategy.max_update_norm / norm
                delta = {
                    k: (np.asarray(v, dtype=np.float64) * scale).astype(v.dtype) for k, v in delta.items()
                }
        out.append((min(int(count), strategy.weight_cap), delta))
    return out


def aggregate(
    strategy: StrategySpec,
    global_params: Params,
    updates: Sequence[tuple[int, Mapping[str, np.ndarray]]],
    state: Params,
    *,
    spec: StudySpec | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[Params, Params]:
    """Sample-weighted mean of the updates (in the given order), then the server strategy's step. Weights
    are capped and updates norm-bounded first (:func:`bounded_updates`).

    Under site-level DP (``spec.privacy`` in a site mode) the mean is unweighted, of re-clipped updates, with
    the central noise added in site-central mode, drawn from ``rng`` (default: a secure generator).
    """
    updates = bounded_updates(strategy, updates)
    if spec is not None and spec.privacy is not None and spec.privacy.mode is not DpMode.RECORD:
        mean = private_mean(spec, updates, rng if rng is not None else secure_generator())
        return server_step(strategy, global_params, mean, state)
    return server_step(strategy, global_params, weighted_mean(updates), state)


def server_step(
    strategy: StrategySpec, global_params: Params, mean_delta: Mapping[str, np.ndarray], state: Params
) -> tuple[Params, Params]:
    """The server strategy's step from the (already averaged) mean update: the secure path enters here."""
    new_params, new_state = apply_strategy(strategy_config(strategy), global_params, mean_delta, state)
    return {k: np.asarray(v, dtype=np.float32) for k, v in new_params.items()}, new_state


def summarize(metrics: Sequence[SiteMetrics]) -> dict[str, Any]:
    """Round-level figures: sample-weighted train loss, plain means of the sites' accuracy and AUC."""
    out: dict[str, Any] = {"sites": len(metrics), "num_samples": sum(m.num_samples for m in metrics)}
    weighted = [(m.num_samples, m.train_loss) for m in metrics if m.train_loss is not None and m.num_samples]
    if weighted:
        total = sum(n for n, _ in weighted)
        out["train_loss"] = sum(n * v for n, v in weighted) / total
    for key in ("accuracy", "auc", "eval_loss"):
        values = [getattr(m, key) for m in metrics if getattr(m, key) is not None]
        if values:
            out[key] = float(np.mean(values))
    return out
