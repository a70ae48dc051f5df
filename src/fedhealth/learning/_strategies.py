"""Server strategies: from the sites' sample-weighted mean update to the next global model.

Secure aggregation shows the orchestrator only the weighted mean of the deltas (local - global), so every
strategy here is a function of that mean alone. Adaptive strategies follow Reddi et al. 2021, "Adaptive
Federated Optimization", Algorithm 2, taking the mean delta as the pseudo-gradient:

    m <- beta1 m + (1 - beta1) delta
    v <- v + delta^2                                          FedAdagrad
    v <- beta2 v + (1 - beta2) delta^2                        FedAdam
    v <- v - (1 - beta2) delta^2 sign(v - delta^2)            FedYogi
    x <- x + eta m / (sqrt(v) + tau)

m and v start at zero (as in FLamby and Flower), without bias correction (as in the paper). The state is
a flat dict of float64 arrays named ``m.<tensor>`` and ``v.<tensor>`` so the orchestrator can keep it as
safetensors between rounds and a restarted study continues bit for bit.

SCAFFOLD (Karimi et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
Algorithm 1) keeps the server control variate c inside the global model, as tensors its recipe declares
(``control_variates``), so it reaches the sites with the model and each site's Δc_i travels beside its Δy_i
in the same update (twice the size, inside the secure sum like any update). The server needs only means:

    x <- x + eta * mean Δy                                    (FedAvg's step)
    c <- c + |S|/N * mean Δc                                  (S: the round's contributors, N: all sites)

The mean is the same sample-weighted mean as FedAvg's (a plain one under site-level DP), so c tracks the
weighted mean of the sites' c_i, the correction that matches the weighted objective FedAvg optimizes; with
equal weights it is the paper's plain mean.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from fedhealth.core import ConfigError, InputError, TensorError
from fedhealth.learning._checks import check_tensors
from fedhealth.learning._config import StrategyConfig, StrategyKind


def weighted_mean(deltas: Sequence[tuple[int, Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """The sample-weighted mean of the sites' deltas, accumulated in float64 and returned in float64.

    Callers pass updates sorted by site name; the sum runs in that order, so the result is reproducible to
    the bit. A site with zero samples contributes nothing; all-zero weights are an error.
    """
    if not deltas:
        raise InputError("weighted_mean needs at least one update")
    first = deltas[0][1]
    shapes = {name: tuple(np.asarray(arr).shape) for name, arr in first.items()}
    total = 0
    for i, (count, delta) in enumerate(deltas):
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
            raise InputError(f"update {i}: sample count must be a non-negative integer, got {count!r}")
        check_tensors(f"update {i}", delta, shapes)
        total += int(count)
    if total == 0:
        raise InputError("weighted_mean: every update has zero samples")
    out = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}
    for count, delta in deltas:
        if count:
            for name in out:
                out[name] += float(count) * delta[name].astype(np.float64)
    for name in out:
        out[name] /= float(total)
    return out


def strategy_state_specs(
    config: StrategyConfig,
    params: Mapping[str, np.ndarray],
    averaged: Collection[str] = (),
    control_variates: Collection[str] = (),
) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the state ``config`` keeps for a model shaped like ``params`` (empty for
    FedAvg / FedProx / SCAFFOLD; none for the ``averaged`` tensors or the ``control_variates``)."""
    if not config.is_adaptive:
        return {}
    specs: dict[str, tuple[int, ...]] = {}
    for name, arr in sorted(params.items()):
        if name in averaged or name in control_variates:
            continue
        specs[f"m.{name}"] = tuple(arr.shape)
        specs[f"v.{name}"] = tuple(arr.shape)
    return specs


def apply_strategy(
    config: StrategyConfig,
    global_params: Mapping[str, np.ndarray],
    mean_delta: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
    averaged: Collection[str] = (),
    *,
    control_variates: Collection[str] = (),
    participation: float = 1.0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One server step: ``(new global params, new state)``. Inputs are left untouched.

    ``averaged`` names the tensors that are statistics of the data rather than trained parameters (a
    network's BatchNorm running mean and variance, declared by its recipe): they take the plain weighted
    mean of the sites' values whatever the strategy, since a server learning rate or an adaptive step would
    move them away from any statistic of the data (FedAdam on BatchNorm's running variance collapses a CNN).

    ``state`` is empty on the first round; otherwise it is what the previous call returned. Everything is
    validated before anything is computed: tensor names and shapes must agree, values must be finite, and a
    state must be either empty or complete. New parameters keep the dtype of ``global_params``; the state is
    float64.

    ``control_variates`` names the tensors holding SCAFFOLD's server control variate c (declared by the
    recipe; required by, and only allowed with, the ``scaffold`` strategy): they move by ``participation``
    (|S|/N, the fraction of the study's training sites that contributed) times their mean delta.
    """
    if (config.kind is StrategyKind.SCAFFOLD) != bool(control_variates):
        raise ConfigError(
            "strategy scaffold needs a model that carries control variates (torch: scaffold = true)"
            if config.kind is StrategyKind.SCAFFOLD
            else f"the model carries SCAFFOLD control variates: strategy {config.kind.value!r} cannot update "
            "them (use strategy scaffold)"
        )
    if not (math.isfinite(participation) and 0.0 < participation <= 1.0):
        raise ConfigError(f"participation must lie in (0, 1], got {participation!r}")
    shapes = {name: tuple(np.asarray(arr).shape) for name, arr in global_params.items()}
    if not shapes:
        raise TensorError("global params: the model has no tensors")
    check_tensors("global params", global_params, shapes)
    check_tensors("mean delta", mean_delta, shapes)
    unknown = sorted(set(control_variates) - set(shapes))
    if unknown:
        raise TensorError(f"control variates {unknown} are not tensors of the model")
    state_shapes = strategy_state_specs(config, global_params, averaged, control_variates)
    if state:
        check_tensors(f"{config.kind.value} state", state, state_shapes)

    eta = config.server_learning_rate
    new_params: dict[str, np.ndarray] = {}
    new_state: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        x = global_params[name].astype(np.float64)
        delta = mean_delta[name].astype(np.float64)
        if name in averaged:
            step = delta  # x + mean(site value - x) = the mean of the sites' values
        elif name in control_variates:
            step = participation * delta  # c <- c + |S|/N mean Δc_i
        elif not config.is_adaptive:
            step = eta * delta
        else:
            m0 = state[f"m.{name}"].astype(np.float64) if state else np.zeros_like(x)
            v0 = state[f"v.{name}"].astype(np.float64) if state else np.zeros_like(x)
            m = config.beta1 * m0 + (1.0 - config.beta1) * delta
            sq = delta * delta
            if config.kind is StrategyKind.FEDADAGRAD:
                v = v0 + sq
            elif config.kind is StrategyKind.FEDADAM:
                v = config.beta2 * v0 + (1.0 - config.beta2) * sq
            else:  # FEDYOGI
                v = v0 - (1.0 - config.beta2) * sq * np.sign(v0 - sq)
            step = eta * m / (np.sqrt(v) + config.tau)
            new_state[f"m.{name}"] = m
            new_state[f"v.{name}"] = v
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, as an error
            updated = (x + step).astype(global_params[name].dtype)
        if not np.isfinite(updated).all():
            raise TensorError(f"the {config.kind.value} step made tensor {name!r} non-finite")
        new_params[name] = updated
    return new_params, new_state
