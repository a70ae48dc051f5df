"""Federated LightGBM and XGBoost on Fed-Heart-Disease: wall time, collectives, bytes, against pooled rows.

Three runs of the same parameters: LightGBM on one machine on the pooled training rows (``train_pooled``), the
four centers over an in-memory session (threads of this process, real masks), and, with ``--services``, the
four centers as agent processes with the orchestrator over HTTPS (``fedhealth.sim.LocalFederation``). Checks
that the federated models equal the pooled one bit for bit, and prints accuracy (pooled over the test rows and
the plain mean over the four centers, FLamby's metric) beside FLamby's logistic-regression baselines.

Run: FEDHEALTH_DATA_DIR=../shared/datasets python benchmarks/boosting_heart.py [--rounds 100] [--services]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fedhealth.data import load_heart_disease
from fedhealth.learning import (
    InMemorySession,
    LightGbmModel,
    LightGbmParams,
    XGBoostModel,
    XGBoostParams,
    train_pooled,
    train_pooled_xgboost,
    train_site,
    train_site_xgboost,
)
from fedhealth.protocol import RecipeSpec, SecureAggregationSpec, StudySpec, StudyStatus

FLAMBY_POOLED = 0.7353  # FLamby's logistic regression, pooled
FLAMBY_FEDAVG = 0.685
SITES = ["center-0", "center-1", "center-2", "center-3"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--leaves", type=int, default=31)
    parser.add_argument("--depth", type=int, default=6, help="XGBoost's max_depth")
    parser.add_argument("--services", action="store_true")
    args = parser.parse_args()
    centers = [load_heart_disease(c, download=False) for c in range(4)]
    params = LightGbmParams(n_features=13, num_rounds=args.rounds, num_leaves=args.leaves)
    out: dict[str, object] = {"rounds": args.rounds, "num_leaves": args.leaves}

    started = time.perf_counter()
    pooled = train_pooled(params, centers)
    out["pooled_s"] = time.perf_counter() - started

    started = time.perf_counter()
    runs = InMemorySession(SITES, call_timeout_s=120).run(
        lambda m: train_site(params, centers[SITES.index(m.site)], m)
    )
    out["in_memory_s"] = time.perf_counter() - started
    federated, calls = runs[SITES[0]]
    trees = federated.booster().num_trees()
    collectives = sum(v for k, v in calls.items() if k != "values_sent") + sum(
        1
        for _ in range(calls["split_records"])  # each split-record gather is followed by a count sum
    )
    out["collectives_per_tree"] = collectives / trees
    out["mb_sent_per_site"] = calls["values_sent"] * 8 / 1e6
    out["identical_to_pooled"] = _trees(federated) == _trees(pooled)
    out.update(_accuracy(federated, centers))

    if args.services:
        from fedhealth.sim import LocalFederation

        with tempfile.TemporaryDirectory() as tmp, LocalFederation(Path(tmp), log_level="warning") as fed:
            fed.start_orchestrator()
            for i, site in enumerate(SITES):
                fed.add_site(site)
                fed.start_agent(site, {"heart-disease": f"builtin://heart-disease/{i}"})
            fed.wait_for_sites(SITES)
            spec = StudySpec(
                name="lightgbm-bench",
                dataset="heart-disease",
                recipe=RecipeSpec(
                    name="lightgbm", params=params.model_dump(mode="json", exclude_defaults=True)
                ),
                rounds=1,
                train_sites=SITES,
                round_deadline_s=3600,
                secure_aggregation=SecureAggregationSpec(site_keys=fed.site_keys(SITES), stage_timeout_s=120),
            )
            started = time.perf_counter()
            final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=3600, interval=0.2)
            out["services_s"] = time.perf_counter() - started
            assert final.status is StudyStatus.COMPLETED, final.reason
            served = LightGbmModel.from_result(final.rounds[0].metrics or {})
            out["services_identical_to_pooled"] = _trees(served) == _trees(pooled)
    out["xgboost"] = _xgboost(args, centers)
    print(json.dumps(out, indent=2))


def _xgboost(args: argparse.Namespace, centers: list) -> dict[str, object]:
    params = XGBoostParams(n_features=13, num_rounds=args.rounds, max_depth=args.depth)
    out: dict[str, object] = {"rounds": args.rounds, "max_depth": args.depth}
    started = time.perf_counter()
    pooled = train_pooled_xgboost(params, centers)
    out["pooled_s"] = time.perf_counter() - started
    started = time.perf_counter()
    runs = InMemorySession(SITES, call_timeout_s=120).run(
        lambda m: train_site_xgboost(params, centers[SITES.index(m.site)], m)
    )
    out["in_memory_s"] = time.perf_counter() - started
    federated, calls = runs[SITES[0]]
    out["collectives_per_tree"] = sum(v for k, v in calls.items() if k != "values_sent") / args.rounds
    out["mb_sent_per_site"] = calls["values_sent"] * 8 / 1e6
    out["identical_to_pooled"] = federated.model_json == pooled.model_json
    out.update(_accuracy(federated, centers))
    if args.services:
        from fedhealth.sim import LocalFederation

        with tempfile.TemporaryDirectory() as tmp, LocalFederation(Path(tmp), log_level="warning") as fed:
            fed.start_orchestrator()
            for i, site in enumerate(SITES):
                fed.add_site(site)
                fed.start_agent(site, {"heart-disease": f"builtin://heart-disease/{i}"})
            fed.wait_for_sites(SITES)
            spec = StudySpec(
                name="xgboost-bench",
                dataset="heart-disease",
                recipe=RecipeSpec(name="xgboost", params=params.model_dump(mode="json", exclude_unset=True)),
                rounds=1,
                train_sites=SITES,
                round_deadline_s=3600,
                secure_aggregation=SecureAggregationSpec(site_keys=fed.site_keys(SITES), stage_timeout_s=120),
            )
            started = time.perf_counter()
            final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=3600, interval=0.2)
            out["services_s"] = time.perf_counter() - started
            assert final.status is StudyStatus.COMPLETED, final.reason
            served = XGBoostModel.from_result(final.rounds[0].metrics or {})
            out["services_identical_to_pooled"] = served.model_json == pooled.model_json
    return out


def _trees(model: LightGbmModel) -> str:
    return model.model_text.split("end of trees")[0]


def _accuracy(model: LightGbmModel | XGBoostModel, centers: list) -> dict[str, float]:
    per_center = [float(np.mean((model.predict(c.X_test) >= 0.5) == c.y_test)) for c in centers]
    X = np.concatenate([c.X_test for c in centers])
    y = np.concatenate([c.y_test for c in centers])
    return {
        "accuracy_pooled_test": float(np.mean((model.predict(X) >= 0.5) == y)),
        "mean_client_accuracy": float(np.mean(per_center)),
        "flamby_logreg_pooled": FLAMBY_POOLED,
        "flamby_logreg_fedavg": FLAMBY_FEDAVG,
    }


if __name__ == "__main__":
    main()
