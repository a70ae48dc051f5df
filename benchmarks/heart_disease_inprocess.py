"""Fed-Heart-Disease in one process: the learning presets against FLamby's published numbers.

Rounds are emulated exactly as the services run them, through the public API only: in round r (numbered from
1) every training site receives the global float32 parameters, trains with ``task_rng(seed, r, site)``, and
returns its float32 delta (local - global) with its sample count; the deltas, sorted by site name, go through
``weighted_mean`` and then ``apply_strategy``. The final model is evaluated on each center's test set and the
metric is the plain mean of the four centers' accuracies (FLamby's). Seeds 0-4; mean ± std over seeds.

Run: FEDHEALTH_DATA_DIR=../shared/datasets python benchmarks/heart_disease_inprocess.py
Exit status 1 if a target is missed. Also prints the breast-cancer demo presets (federation seed 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from fedhealth.data import PooledScaling, TabularDataset, breast_cancer_federation, load_heart_disease
from fedhealth.learning import (
    BREAST_CANCER_PRESETS,
    HEART_DISEASE_PRESETS,
    LocalOptimizer,
    StudyPreset,
    apply_strategy,
    logreg_evaluate,
    logreg_init,
    logreg_train,
    task_rng,
    weighted_mean,
)

SEEDS = (0, 1, 2, 3, 4)
FLAMBY_POOLED = 0.7353
FLAMBY_LOCAL = (0.7221, 0.6287, 0.5670, 0.6366)
FLAMBY_FEDAVG = 0.685
FLAMBY_FEDYOGI = 0.7314


def run_study(
    preset: StudyPreset, sites: Sequence[tuple[str, TabularDataset]], seed: int
) -> dict[str, np.ndarray]:
    """The global model after ``preset.rounds`` rounds over ``sites`` (name, dataset), as services run it."""
    params = logreg_init(preset.recipe.n_features, seed)
    state: dict[str, np.ndarray] = {}
    ordered = sorted(sites, key=lambda s: s[0])
    for rnd in range(1, preset.rounds + 1):
        updates = []
        for name, data in ordered:
            result = logreg_train(
                params, data.X_train, data.y_train, preset.recipe, task_rng(seed, rnd, name)
            )
            delta = {k: result.params[k] - params[k] for k in params}  # float32, as uploaded
            updates.append((result.num_samples, delta))
        params, state = apply_strategy(preset.strategy, params, weighted_mean(updates), state)
    return params


def accuracies(params: dict[str, np.ndarray], tests: Sequence[TabularDataset]) -> np.ndarray:
    return np.array([logreg_evaluate(params, t.X_test, t.y_test).accuracy for t in tests])


def measure(
    preset: StudyPreset, sites: Sequence[tuple[str, TabularDataset]], tests: Sequence[TabularDataset]
) -> np.ndarray:
    """Per-seed, per-test-set accuracies: shape (len(SEEDS), len(tests))."""
    return np.stack([accuracies(run_study(preset, sites, seed), tests) for seed in SEEDS])


def row(label: str, rounds: int, acc: np.ndarray, reference: str, verdict: str) -> str:
    means = acc.mean(axis=1)
    per_site = " ".join(f"{a:.3f}" for a in acc.mean(axis=0))
    summary = f"{means.mean():.4f} ± {means.std():.4f}"
    return f"{label:<30} {rounds:>6} {summary}   [{per_site}]   {reference:<16} {verdict}"


def heart_disease(data_dir: str | None) -> bool:
    centers = [load_heart_disease(c, data_dir) for c in range(4)]
    fed_sites = [(f"center-{c}", centers[c]) for c in range(4)]
    ok = True
    columns = ("method", "rounds", "mean acc ± std", "[per-center mean acc]", "FLamby", "target")
    header = "{:<30} {:>6} {:<17}  {:<31} {:<16} {}".format(*columns)
    print("Fed-Heart-Disease: mean over the 4 centers' test accuracies, seeds 0-4")
    print(header)
    print("-" * len(header))

    pooled = measure(
        HEART_DISEASE_PRESETS["pooled"], [("pooled", load_heart_disease("pooled", data_dir))], centers
    )
    hit = abs(pooled.mean() - FLAMBY_POOLED) <= 0.01
    ok &= hit
    print(row("pooled", 1, pooled, f"{FLAMBY_POOLED:.4f}", f"|diff| <= 0.01: {'ok' if hit else 'MISSED'}"))

    # FLamby's own pooled recipe and scaling, as a check that the loader reproduces FLamby's data
    flamby_recipe = replace(
        HEART_DISEASE_PRESETS["pooled"].recipe, local_epochs=50, optimizer=LocalOptimizer.ADAM
    )
    flamby_pooled = load_heart_disease("pooled", data_dir, pooled_scaling=PooledScaling.GLOBAL)
    ref = measure(
        replace(HEART_DISEASE_PRESETS["pooled"], recipe=flamby_recipe), [("pooled", flamby_pooled)], centers
    )
    print(row("pooled, FLamby recipe+scaling", 1, ref, f"{FLAMBY_POOLED:.4f}", "(reference)"))

    for c in range(4):
        local = measure(HEART_DISEASE_PRESETS["local"], [(f"center-{c}", centers[c])], centers)
        print(row(f"local {c}", 1, local, f"{FLAMBY_LOCAL[c]:.4f}", "(reported)"))

    results = {}
    for name in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"):
        preset = HEART_DISEASE_PRESETS[name]
        results[name] = measure(preset, fed_sites, centers)
    hit = results["fedavg"].mean() >= FLAMBY_FEDAVG
    ok &= hit
    print(
        row(
            "fedavg",
            15,
            results["fedavg"],
            f"{FLAMBY_FEDAVG:.4f}",
            f">= {FLAMBY_FEDAVG}: {'ok' if hit else 'MISSED'}",
        )
    )
    print(row("fedprox", 15, results["fedprox"], "-", "(reported)"))
    best = max(("fedadam", "fedyogi", "fedadagrad"), key=lambda k: results[k].mean())
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        rounds = HEART_DISEASE_PRESETS[name].rounds
        if name == best:
            hit = results[name].mean() >= FLAMBY_FEDYOGI
            ok &= hit
            verdict = f"best adaptive >= {FLAMBY_FEDYOGI}: {'ok' if hit else 'MISSED'}"
        else:
            verdict = "(reported)"
        reference = f"{FLAMBY_FEDYOGI:.4f} (Yogi)" if name == "fedyogi" else "-"
        print(row(name, rounds, results[name], reference, verdict))
    return ok


def breast_cancer() -> None:
    sites = breast_cancer_federation(4, 0)
    named = [(f"site-{i}", d) for i, d in enumerate(sites)]
    print()
    print(
        "Breast-cancer demo federation (4 sites, federation seed 0): mean site test accuracy, study seeds 0-4"
    )
    for i, d in enumerate(sites):
        print(f"  site-{i}: {d.num_train} train / {d.num_test} test, malignant {d.y_train.mean():.2f}")
    for name, preset in BREAST_CANCER_PRESETS.items():
        if name == "local":
            for i in range(len(sites)):
                print(row(f"local {i}", 1, measure(preset, [named[i]], sites), "-", "(reported)"))
        else:
            print(row(name, preset.rounds, measure(preset, named, sites), "-", "(reported)"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=None, help="folder holding heart_disease/ (default: $FEDHEALTH_DATA_DIR)"
    )
    parser.add_argument("--skip-breast-cancer", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    ok = heart_disease(args.data_dir)
    if not args.skip_breast_cancer:
        breast_cancer()
    print(f"\n{'all targets met' if ok else 'SOME TARGETS MISSED'} in {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
