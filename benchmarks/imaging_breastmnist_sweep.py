"""BreastMNIST settings chosen on the VALIDATION split: the validation AUC after every round of one setting.

The sites and the pooled set are built from the official train images only (``holdout="val"``), every model
is scored on the 78 official validation images; the test images are never read. The model after each
round is kept by wrapping the in-memory runtime's aggregation (the study itself runs unchanged through
:func:`fedhealth.runtime.run_study_in_memory`). One JSON line per mode: the mean curve over the study seeds.
This is how docs/benchmarks.md's "settings chosen on the validation split" table was made.

Run:  python benchmarks/imaging_breastmnist_sweep.py '{"architecture": "cnn_wide", "rounds": 40}'
      (any recipe param, plus "rounds", "seeds" [0, 1], "modes" ["fedavg", "central"], "server_lr" 0.01)
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

import fedhealth.runtime._memory as memory
from fedhealth.data import TabularDataset, breastmnist_federation, breastmnist_pooled
from fedhealth.learning import BREASTMNIST_PARAMS, TorchParams, torch_evaluate
from fedhealth.protocol import RecipeSpec, StrategySpec, StudySpec

_AGGREGATE = memory.aggregate
_ROUNDS: list[dict[str, np.ndarray]] = []


def _kept(*args: Any, **kwargs: Any) -> Any:
    out = _AGGREGATE(*args, **kwargs)
    _ROUNDS.append({name: np.asarray(value).copy() for name, value in out[0].items()})
    return out


def curve(
    params: TorchParams,
    datasets: dict[str, TabularDataset],
    held_out: TabularDataset,
    rounds: int,
    strategy: str,
    seed: int,
    **extra: Any,
) -> tuple[list[float], float]:
    """The validation AUC after each round, and the mean time per round."""
    _ROUNDS.clear()
    spec = StudySpec(
        name="breastmnist-sweep",
        dataset="breastmnist",
        recipe=RecipeSpec(name="torch", params=params.model_dump(mode="json")),
        strategy=StrategySpec(name=strategy, **extra),
        rounds=rounds,
        train_sites=sorted(datasets),
        seed=seed,
    )
    started = time.perf_counter()
    memory.aggregate = _kept
    try:
        memory.run_study_in_memory(spec, datasets)
    finally:
        memory.aggregate = _AGGREGATE
    per_round = (time.perf_counter() - started) / rounds
    aucs = [torch_evaluate(params, m, held_out.X_test, held_out.y_test).auc or float("nan") for m in _ROUNDS]
    return aucs, per_round


def main() -> None:
    config = json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}")
    rounds = int(config.pop("rounds", 30))
    seeds = [int(s) for s in config.pop("seeds", [0, 1])]
    modes = list(config.pop("modes", ["fedavg", "central"]))
    server_lr = float(config.pop("server_lr", 0.01))
    params = TorchParams(**{**BREASTMNIST_PARAMS.model_dump(), **config})
    sites = {f"site-{i}": d for i, d in enumerate(breastmnist_federation(4, 0, holdout="val"))}
    pooled = breastmnist_pooled(holdout="val")
    for mode in modes:
        curves, times = [], []
        for seed in seeds:
            if mode == "central":
                aucs, per_round = curve(params, {"pooled": pooled}, pooled, rounds, "fedavg", seed)
            else:
                fedopt = mode in ("fedadam", "fedyogi", "fedadagrad")
                extra = {"server_learning_rate": server_lr} if fedopt else {}
                aucs, per_round = curve(params, sites, pooled, rounds, mode, seed, **extra)
            curves.append(aucs)
            times.append(per_round)
        mean = np.asarray(curves).mean(axis=0)
        row = {
            "params": config,
            "mode": mode,
            "seeds": seeds,
            "last_round_auc": round(float(mean[-1]), 4),
            "mean_auc_last_10_rounds": round(float(mean[-10:].mean()), 4),
            "val_auc_per_round": [round(float(x), 3) for x in mean],
            "round_s": round(float(np.mean(times)), 2),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
