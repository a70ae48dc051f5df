"""What a task does, independent of transport.

The site side (train or evaluate on local data) and the server side (initial model, aggregation, the server
strategy) both live here, composed from ``learning``, ``data`` and the wire types of ``protocol``, so the two
services stay thin and a whole round can also be driven in memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhealth.core import DatasetError, InputError, TensorError, TensorSpec, decode_tensors, encode_tensors
from fedhealth.data import TabularDataset
from fedhealth.learning import (
    LOGREG_RECIPE,
    LogRegParams,
    RecordDp,
    ResolvedRecipe,
    StrategyConfig,
    StrategyKind,
    StudyPreset,
    apply_strategy,
    task_rng,
    weighted_mean,
)
from fedhealth.privacy import secure_generator
from fedhealth.protocol import (
    RESULT_METADATA_KEY,
    DpMode,
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
from fedhealth.runtime._recipes import (
    initial_model as initial_model,  # re-exported: the in-memory runner imports it from here
)
from fedhealth.runtime._recipes import (
    param_specs as param_specs,  # re-exported: the secure-sum codec imports it from here
)
from fedhealth.runtime._recipes import recipe_spec, study_recipe
from fedhealth.runtime._scaling import task_recipe

Params = dict[str, np.ndarray]
# a site's train loss is clipped here before it counts in a round's figures, plain or secure (a BCE above 100
# means the model is broken anyway)
MAX_LOSS = 100.0


def strategy_config(strategy: StrategySpec) -> StrategyConfig:
    return StrategyConfig(
        kind=StrategyKind(strategy.name.value),
        server_learning_rate=strategy.server_learning_rate,
        beta1=strategy.beta1,
        beta2=strategy.beta2,
        tau=strategy.tau,
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
    """A study running a named (logistic-regression) preset; ``fields`` give the rest (name, dataset,
    sites, seed...)."""
    return StudySpec.model_validate(
        {
            "recipe": recipe_spec(LOGREG_RECIPE, LogRegParams.from_config(preset.recipe)),
            "strategy": strategy_spec(preset.strategy),
            "rounds": preset.rounds,
            **fields,
        }
    )


# --- site side --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainOutcome:
    """The update to send, the site's metrics, and what the site keeps for its next round of the study
    (``site_state``: a recipe's state such as SCAFFOLD's c_i; None when it keeps nothing; never sent)."""

    delta: Params
    metrics: SiteMetrics
    site_state: Params | None = None


def _site_data(recipe: ResolvedRecipe, task: Task, dataset: TabularDataset | None) -> TabularDataset | None:
    """The dataset the recipe trains on, checked against its schema; None for a recipe that reads none."""
    if not recipe.capabilities.reads_data:
        return None
    if dataset is None:
        raise DatasetError(f"no dataset registered for {task.dataset!r}")
    recipe.check_dataset(dataset)
    return dataset


def _delta(local: Params, global_params: Params) -> Params:
    """The upload: local minus global, in float32 (as every recipe's float32 models subtract)."""
    return {
        k: (np.asarray(local[k]).astype(np.float32) - global_params[k]).astype(np.float32)
        for k in global_params
    }


def train_on_site(
    task: Task,
    site: str,
    global_params: Params,
    dataset: TabularDataset | None,
    *,
    reproducible_noise: bool | None = None,
    site_state: Params | None = None,
) -> TrainOutcome:
    """One round of local training: returns the update (local minus global) and the site's metrics.

    Every random choice is drawn from ``task_rng(seed, round, site)``, so rerunning a task (after a crash)
    produces the same update bit for bit. Differential privacy (``task.spec.privacy``) is the exception:
    its sampling and noise come from a secure generator, unless ``reproducible_noise`` (default: the
    ``FEDHEALTH_REPRODUCIBLE_NOISE`` environment variable) asks for the task's generator; see
    ``fedhealth.runtime._privacy``. Record mode has the recipe train with DP-SGD; site modes clip the update
    (and add the site's noise share in distributed mode). A DP task reports no training loss: it is computed
    from the training records without noise. A recipe is asked only for the DP it declares.

    ``site_state`` is what this site's previous training round of the study left (``TrainOutcome.site_state``;
    None on its first round), handed to a recipe that declares ``site_state``; the caller keeps the new one.
    """
    started = time.perf_counter()
    recipe = study_recipe(task_recipe(task))
    data = _site_data(recipe, task, dataset)
    rng = task_rng(task.seed, task.round, site)
    spec = task.spec
    privacy = spec.privacy
    kept = {"site_state": site_state} if recipe.capabilities.site_state else {}
    if privacy is None:
        result = recipe.train(global_params, data, rng, **kept)
        metrics = SiteMetrics(
            num_samples=result.num_samples,
            train_loss=result.train_loss,
            duration_s=time.perf_counter() - started,
            **_held_out_metrics(recipe, result.params, data),
        )
        return TrainOutcome(
            delta=_delta(result.params, global_params), metrics=metrics, site_state=result.site_state
        )
    if privacy.mode is not DpMode.RECORD:
        if not recipe.capabilities.site_dp:
            raise InputError(f"privacy: recipe {recipe.name!r} does not declare site-level DP")
        result = recipe.train(global_params, data, rng, **kept)
        # The noise share continues the task's stream when reproducible (a fresh secure one otherwise).
        delta = privatize_update(
            spec, _delta(result.params, global_params), noise_generator(rng, reproducible_noise)
        )
        # The local model itself carries no noise (only the sum does): no figure of it may leave the site.
        return TrainOutcome(
            delta=delta,
            metrics=SiteMetrics(num_samples=result.num_samples, duration_s=time.perf_counter() - started),
            site_state=result.site_state,
        )
    assert privacy.steps_per_round is not None
    record_dp = RecordDp(
        noise_multiplier=noise_multiplier(spec, site),
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=sample_rate(spec, site),
        steps=privacy.steps_per_round,
    )
    result = recipe.train(
        global_params, data, noise_generator(rng, reproducible_noise), record_dp=record_dp, **kept
    )
    # After DP-SGD the local model is itself a DP release: its metrics on the held-out split are
    # post-processing as far as the training records are concerned.
    metrics = SiteMetrics(
        num_samples=result.num_samples,
        duration_s=time.perf_counter() - started,
        **_held_out_metrics(recipe, result.params, data),
    )
    return TrainOutcome(
        delta=_delta(result.params, global_params), metrics=metrics, site_state=result.site_state
    )


def _held_out_metrics(
    recipe: ResolvedRecipe, params: Params, dataset: TabularDataset | None
) -> dict[str, Any]:
    """A training round's figures on the held-out rows; none when no held-out row is handed on (or the
    recipe reads no data, or has nothing to report). At a site the governance gate hands on no held-out row
    when fewer than the site's ``min_cohort_k`` remain after consent: their figures are withheld."""
    if dataset is None or dataset.num_test == 0:
        return {}
    evaluation = recipe.evaluate(params, dataset)
    if evaluation is None:
        return {}
    return {
        "num_eval_samples": evaluation.num_samples,
        "eval_loss": evaluation.loss,
        "accuracy": evaluation.accuracy,
        "auc": evaluation.auc,
    }


def evaluate_on_site(task: Task, params: Params, dataset: TabularDataset | None) -> SiteMetrics:
    """Metrics of the global model on the site's local validation split."""
    started = time.perf_counter()
    recipe = study_recipe(task_recipe(task))
    data = _site_data(recipe, task, dataset)
    # no held-out row handed on (a site withholds the figures of fewer than its min_cohort_k held-out
    # patients, or holds none out): an answer with no figure, as a training round's
    evaluation = None if data is not None and data.num_test == 0 else recipe.evaluate(params, data)
    if evaluation is None:
        return SiteMetrics(num_samples=0, duration_s=time.perf_counter() - started)
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
    SCAFFOLD's participation |S|/N is the share of the spec's training sites among ``updates``.
    """
    n_updates = len(updates)
    updates = bounded_updates(strategy, updates)
    recipe = study_recipe(spec.recipe) if spec is not None else None
    averaged = recipe.averaged_tensors() if recipe is not None else frozenset()
    variates = recipe.control_variate_tensors() if recipe is not None else frozenset()
    participation = participation_of(spec, n_updates) if spec is not None else 1.0
    if spec is not None and spec.privacy is not None and spec.privacy.mode is not DpMode.RECORD:
        mean = private_mean(spec, updates, rng if rng is not None else secure_generator())
    else:
        mean = weighted_mean(updates)
    return server_step(
        strategy,
        global_params,
        mean,
        state,
        averaged=averaged,
        control_variates=variates,
        participation=participation,
    )


def participation_of(spec: StudySpec, contributors: int) -> float:
    """|S|/N: the share of the study's training sites that contributed to a round (SCAFFOLD's c step)."""
    return min(1.0, contributors / len(spec.train_sites))


def server_step(
    strategy: StrategySpec,
    global_params: Params,
    mean_delta: Mapping[str, np.ndarray],
    state: Params,
    *,
    averaged: Collection[str] = (),
    control_variates: Collection[str] = (),
    participation: float = 1.0,
) -> tuple[Params, Params]:
    """The server strategy's step from the (already averaged) mean update: the secure path enters here.
    ``averaged``: the recipe's statistics tensors, which take the plain mean (``averaged_tensors``);
    ``control_variates`` and ``participation``: SCAFFOLD's (:func:`~fedhealth.learning.apply_strategy`)."""
    new_params, new_state = apply_strategy(
        strategy_config(strategy),
        global_params,
        mean_delta,
        state,
        averaged,
        control_variates=control_variates,
        participation=participation,
    )
    return {k: np.asarray(v, dtype=np.float32) for k, v in new_params.items()}, new_state


def summarize(strategy: StrategySpec, metrics: Sequence[SiteMetrics]) -> dict[str, Any]:
    """Round-level figures: sample-weighted train loss, plain means of the sites' accuracy and AUC. A site
    that withheld its held-out figures (fewer than k held-out patients) is left out of those means; a round
    where every site withheld them has none.

    The train loss is weighted as the updates are (each count capped at ``weight_cap``) and each site's loss
    clipped at ``MAX_LOSS``, as the secure sum does: a site claiming 10**9 samples, or a loss of 1e100, set
    the round's loss alone
    (tests/runtime/test_poisoning_bounds.py::test_one_site_cannot_set_a_plain_rounds_train_loss_alone)."""
    out: dict[str, Any] = {"sites": len(metrics), "num_samples": sum(m.num_samples for m in metrics)}
    weighted = [
        (min(m.num_samples, strategy.weight_cap), min(MAX_LOSS, m.train_loss))
        for m in metrics
        if m.train_loss is not None and m.num_samples
    ]
    if weighted:
        total = sum(n for n, _ in weighted)
        out["train_loss"] = sum(n * v for n, v in weighted) / total
    for key in ("accuracy", "auc", "eval_loss"):
        values = [getattr(m, key) for m in metrics if getattr(m, key) is not None]
        if values:
            out[key] = float(np.mean(values))
    return out
