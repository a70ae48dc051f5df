"""BreastMNIST with the ``torch`` recipe: 4 sites federated (FedAvg and other strategies), a centralized
baseline trained by the same code (one site holding every training image), and each site alone; every model
scored on the official test set (156 images): AUC and accuracy, plus the time of each federated round.

All models run through :func:`fedhealth.runtime.run_study_in_memory`, the runtime the site agents and the
orchestrator run (without the sockets). Sites: ``builtin://breastmnist/<i>?sites=4&seed=0``.

Run:  python benchmarks/imaging_breastmnist.py [--rounds 20] [--strategies fedavg,fedadam] [--params JSON]
      [--server-lr 0.01] [--skip-central] [--skip-local] [--study-seeds 0,1,2] [--holdout val]
      [--json out.json]

Strategies: fedavg, fedprox, fedadam, fedyogi, fedadagrad, scaffold, and fedavg-sgd. SCAFFOLD's control
variates assume plain SGD steps, so ``scaffold`` trains with SGD at ``--sgd-lr`` (momentum 0) instead of the
preset's Adam; ``fedavg-sgd`` is FedAvg with exactly those local steps, its like-for-like baseline.

``--holdout val`` is the tuning split: sites and the pooled set built from the official train images only,
every model scored on the official validation images (78), so that settings are chosen without the test set.
With several ``--study-seeds`` each setting runs once per seed and a summary line gives mean and sd.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np

from fedhealth.data import TabularDataset, breastmnist_federation, breastmnist_pooled
from fedhealth.learning import (
    BREASTMNIST_PARAMS,
    BREASTMNIST_ROUNDS,
    TorchParams,
    torch_evaluate,
    torch_threads,
)
from fedhealth.protocol import PrivacySpec, RecipeSpec, StrategySpec, StudySpec
from fedhealth.runtime import run_study_in_memory

SEED = 0  # the split of BreastMNIST into sites
STUDY_SEED = [0]  # the studies' seed (initial model, shuffling): --study-seed


def spec(
    params: TorchParams,
    sites: list[str],
    rounds: int,
    strategy: str,
    privacy: PrivacySpec | None = None,
    **extra: Any,
) -> StudySpec:
    return StudySpec(
        privacy=privacy,
        name="breastmnist-bench",
        dataset="breastmnist",
        recipe=RecipeSpec(name="torch", params=params.model_dump(mode="json")),
        strategy=StrategySpec(name=strategy, **extra),
        rounds=rounds,
        train_sites=sites,
        seed=STUDY_SEED[0],
    )


def scored(params: TorchParams, model: dict[str, np.ndarray], test: TabularDataset) -> dict[str, float]:
    metrics = torch_evaluate(params, model, test.X_test, test.y_test)
    return {"auc": float(metrics.auc or float("nan")), "accuracy": metrics.accuracy}


def run(
    params: TorchParams,
    datasets: dict[str, TabularDataset],
    rounds: int,
    strategy: str,
    privacy: PrivacySpec | None = None,
    **extra: Any,
) -> tuple[dict[str, np.ndarray], float]:
    started = time.perf_counter()
    study = spec(params, sorted(datasets), rounds, strategy, privacy, **extra)
    result = run_study_in_memory(study, datasets)
    return result.params, (time.perf_counter() - started) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=BREASTMNIST_ROUNDS)
    parser.add_argument("--strategies", default="fedavg")
    parser.add_argument("--server-lr", type=float, default=0.01, help="server learning rate of FedOpt")
    parser.add_argument("--sgd-lr", type=float, default=0.05, help="local SGD rate of scaffold, fedavg-sgd")
    parser.add_argument("--params", default="{}", help="JSON overriding the recipe params of the preset")
    parser.add_argument("--dp-epsilons", default="", help="e.g. 8,1: FedAvg with DP-SGD at each epsilon")
    parser.add_argument("--dp-params", default='{"norm": "group", "optimizer": "sgd", "learning_rate": 0.1}')
    parser.add_argument("--dp-sample-rate", type=float, default=0.1)
    parser.add_argument("--dp-steps", type=int, default=10, help="DP-SGD steps per round")
    parser.add_argument("--dp-delta", type=float, default=1e-4)
    parser.add_argument("--skip-federated", action="store_true")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--skip-central", action="store_true")
    parser.add_argument("--study-seed", type=int, default=0)
    parser.add_argument(
        "--study-seeds", default="", help="e.g. 0,1,2: each setting once per seed (overrides --study-seed)"
    )
    parser.add_argument(
        "--holdout", choices=("test", "val"), default="test", help="val: tune on the validation split"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    seeds = [int(x) for x in args.study_seeds.split(",") if x] or [args.study_seed]
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        STUDY_SEED[0] = seed
        rows += one_seed(args)
    import torch

    params = TorchParams(**{**BREASTMNIST_PARAMS.model_dump(), **json.loads(args.params)})
    summary: dict[str, Any] = {
        "machine": f"{platform.machine()}, {torch_threads()} torch threads, torch {torch.__version__}",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "holdout": args.holdout,
        "study_seeds": seeds,
        "params": params.model_dump(mode="json"),
        "rows": rows,
    }
    if len(seeds) > 1:
        summary["summary"] = []
        for setting in dict.fromkeys(row["setting"] for row in rows):
            mine = [row for row in rows if row["setting"] == setting]
            line = {"setting": setting, "seeds": len(mine)}
            for key in ("auc", "accuracy", "round_s"):
                values = np.array([row[key] for row in mine], dtype=np.float64)
                line[key] = [round(float(values.mean()), 4), round(float(values.std(ddof=1)), 4)]
            summary["summary"].append(line)
            print(json.dumps({"mean_sd": line}), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)


def one_seed(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every asked-for setting with the study seed ``STUDY_SEED[0]``: one row each."""

    params = TorchParams(**{**BREASTMNIST_PARAMS.model_dump(), **json.loads(args.params)})
    sites = {f"site-{i}": d for i, d in enumerate(breastmnist_federation(4, SEED, holdout=args.holdout))}
    pooled = breastmnist_pooled(holdout=args.holdout)
    rows: list[dict[str, Any]] = []

    def record(
        setting: str, model: dict[str, np.ndarray], round_s: float, rounds: int, used: TorchParams = params
    ) -> None:
        row = {
            "setting": setting,
            "seed": STUDY_SEED[0],
            "rounds": rounds,
            **scored(used, model, pooled),
            "round_s": round_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    for eps in [float(e) for e in args.dp_epsilons.split(",") if e]:
        dp_params = TorchParams(**{**params.model_dump(), **json.loads(args.dp_params)})
        privacy = PrivacySpec(
            delta=args.dp_delta,
            target_epsilon=eps,
            max_grad_norm=1.0,
            sample_rate=args.dp_sample_rate,
            steps_per_round=args.dp_steps,
        )
        model, round_s = run(dp_params, sites, args.rounds, "fedavg", privacy)
        setting = f"federated fedavg, DP-SGD epsilon {eps:g} (delta {args.dp_delta:g}) per site"
        record(setting, model, round_s, args.rounds, dp_params)
    for strategy in args.strategies.split(",") if not args.skip_federated else []:
        fedopt = strategy in ("fedadam", "fedyogi", "fedadagrad")
        extra = {"server_learning_rate": args.server_lr} if fedopt else {}
        used, name = params, strategy
        if strategy in ("scaffold", "fedavg-sgd"):
            sgd = {"optimizer": "sgd", "learning_rate": args.sgd_lr, "momentum": 0.0}
            used = TorchParams(**{**params.model_dump(), **sgd, "scaffold": strategy == "scaffold"})
            name = "scaffold" if strategy == "scaffold" else "fedavg"
        model, round_s = run(used, sites, args.rounds, name, **extra)
        label = f"{strategy} (local SGD {args.sgd_lr:g})" if used is not params else strategy
        record(f"federated {label}, 4 sites", model, round_s, args.rounds, used)
    if not args.skip_central:  # the same recipe, one "site" holding every training image, as many epochs
        model, round_s = run(params, {"pooled": pooled}, args.rounds, "fedavg")
        record("centralized (same code, pooled data)", model, round_s, args.rounds)
    if not args.skip_local:
        for name, data in sites.items():
            model, round_s = run(params, {name: data}, args.rounds, "fedavg")
            record(f"local only: {name} ({data.num_train} images)", model, round_s, args.rounds)
    return rows


if __name__ == "__main__":
    main()
