"""``fedhealth benchmark boosting``: federated LightGBM and XGBoost over the real services against the same
library on the pooled rows, on synthetic data, in one run.

Each site gets a CSV of its share of the rows (``features`` standard-normal columns, a binary label from a
noisy linear rule) and loads it through the file connector like any dataset; the pooled reference loads the
same files the same way (:func:`~fedhealth.data.open_dataset`), so both train on the same rows. Measured per
library: the pooled training (``train_pooled``, the model the federated one equals; the best of three runs),
the study's wall time from submission to completion through the orchestrator and agents (its end as the
orchestrator records it), their ratio, the session's collectives per tree, the values each site put into
secure sums (8 bytes each in the masking ring), and the share of each site's program spent inside
collective calls (waiting for the others and the relay), read from each site's own record
(``results.jsonl``), and the CPU time of the orchestrator and of each agent process during the study (read
from ``/proc``, Linux only), against the pooled run's: how much of the machine the federation kept busy, and
the ratio this machine allows at best for that much CPU (``cpu_bound_ratio``: all of it spread over every
core without a moment idle, (orchestrator + every agent) / cores / pooled wall time). A ratio target below
it needs less CPU, not less waiting.
The sites' stewards approve each spec before the clock starts (in a federation that happens ahead of time,
by people); the owner's signed submission is timed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.data import TabularDataset, open_dataset
from fedhealth.learning import (
    LIGHTGBM_RECIPE,
    XGBOOST_RECIPE,
    LightGbmModel,
    LightGbmParams,
    XGBoostModel,
    XGBoostParams,
    train_pooled,
    train_pooled_xgboost,
)
from fedhealth.protocol import SecureAggregationSpec, StudySpec, StudyStatus
from fedhealth.runtime import recipe_spec
from fedhealth.sim._federation import FederationError, LocalFederation

POOLED_RUNS = 3
STUDY_POLL_S = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class BoostingRun:
    """One library's figures: seconds pooled and federated, their ratio, and the session's costs."""

    library: str
    trees: int
    pooled_s: float
    federated_s: float
    ratio: float
    collectives_per_tree: float
    bytes_per_site: float
    waiting_share: float
    program_s: float
    identical_to_pooled: bool
    accuracy: float | None
    pooled_cpu_s: float  # CPU time of the pooled run timed (the best one)
    orchestrator_cpu_s: float | None  # during the study; None where /proc is not there to read
    site_cpu_s: float | None  # mean over the agents
    cores_busy: float | None  # (orchestrator + every agent) CPU time / federated wall time
    cpu_bound_ratio: float | None  # (orchestrator + every agent) CPU time / cores / pooled wall time


@dataclass(frozen=True, slots=True, kw_only=True)
class BoostingBenchmark:
    sites: int
    rows: int
    features: int
    trees: int
    cpus: int
    load_before: tuple[float, float, float]
    runs: tuple[BoostingRun, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _write_site_csv(path: Path, rows: int, features: int, rng: np.random.Generator) -> None:
    X = rng.normal(size=(rows, features))
    weights = np.linspace(1.0, -1.0, features)
    y = (X @ weights / np.sqrt(features) + 0.5 * rng.normal(size=rows) > 0).astype(np.int64)
    header = ",".join([*(f"x{j}" for j in range(features)), "y"])
    body = np.column_stack([X, y])
    np.savetxt(path, body, delimiter=",", header=header, comments="", fmt=["%.6f"] * features + ["%d"])


def _site_record(fed: LocalFederation, site: str, study_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """The site's own record of its part in the study's session (its results.jsonl), which the agent
    writes after the session's closing call, so possibly a moment after the study completed."""
    path = fed.site_home(site).root / "results.jsonl"
    deadline = time.monotonic() + timeout_s
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        for line in reversed(lines):
            entry = json.loads(line)
            if entry.get("study_id") == study_id:
                return dict(entry["metrics"])
        if time.monotonic() > deadline:
            raise FederationError(f"site {site} kept no record of study {study_id}")
        time.sleep(0.1)


def benchmark_boosting(
    *,
    sites: int = 4,
    rows: int = 50_000,
    features: int = 30,
    trees: int = 100,
    workdir: Path | None = None,
    on_step: Callable[[str], None] = lambda _s: None,
) -> BoostingBenchmark:
    """Federated LightGBM, then XGBoost (``trees`` rounds each, the recipes' defaults otherwise) on ``rows``
    synthetic rows in all, split evenly over ``sites`` agents, against the library on the pooled rows."""
    with tempfile.TemporaryDirectory(prefix="fedhealth-bench-boosting-") as tmp:
        root = workdir or Path(tmp)
        data = root / "data"
        data.mkdir(parents=True, exist_ok=True)
        names = [f"site-{i:02d}" for i in range(sites)]
        rng = np.random.default_rng(0)
        uris = {}
        for i, name in enumerate(names):
            share = rows // sites + (1 if i < rows % sites else 0)
            _write_site_csv(data / f"{name}.csv", share, features, rng)
            uris[name] = f"file://{data / f'{name}.csv'}?label=y"
        datasets = [open_dataset(uris[name]) for name in names]
        libraries = _libraries(features, trees)
        pooled: dict[str, tuple[float, float, str]] = {}
        for library in libraries:
            on_step(f"{library.name} on the pooled rows")
            best, best_cpu = float("inf"), 0.0
            for _ in range(POOLED_RUNS):  # the best of a few: one short run is at the mercy of the load
                started, started_cpu = time.perf_counter(), time.process_time()
                model = library.train_pooled(library.params, datasets)
                if (wall := time.perf_counter() - started) < best:
                    best, best_cpu = wall, time.process_time() - started_cpu
            pooled[library.name] = (best, best_cpu, library.trees_of(model))
        load_before = os.getloadavg()
        runs = []
        with LocalFederation(root / "federation", log_level="warning") as fed:
            fed.start_orchestrator()
            for name in names:
                fed.add_site(name)
                fed.start_agent(name, {"synthetic": uris[name]})
            fed.wait_for_sites(names)
            for library in libraries:
                on_step(f"federated {library.name} through the services")
                spec = StudySpec(
                    name=f"bench-{library.name.lower()}",
                    dataset="synthetic",
                    recipe=recipe_spec(library.recipe, library.params),
                    rounds=1,
                    train_sites=names,
                    min_sites=sites,
                    round_deadline_s=24 * 3600.0,
                    secure_aggregation=SecureAggregationSpec(
                        stage_timeout_s=600.0, site_keys=fed.site_keys(names)
                    ),
                )
                # the stewards' approvals come first, as they would days before: not part of the training
                for name in names:
                    fed.approve(name, spec)
                processes = [fed.orchestrator, *(fed.agents[name] for name in names)]
                pids = [p.pid if p is not None else None for p in processes]
                cpu_before = [_cpu_seconds(pid) for pid in pids]
                started = time.time()
                submitted = fed.create_study(spec, approve=False)
                # polled as a client would, slowly: the end is the orchestrator's own record of it
                # (ended_at, on this host's clock), so a poll neither loads the server it measures nor
                # adds its interval to the figure
                final = fed.wait_for_study(submitted.study_id, timeout=24 * 3600, interval=STUDY_POLL_S)
                if final.status is not StudyStatus.COMPLETED or final.ended_at is None:
                    raise FederationError(f"benchmark study {final.status.value}: {final.reason}")
                federated_s = final.ended_at.timestamp() - started
                cpu = _cpu_used(cpu_before, [_cpu_seconds(pid) for pid in pids])
                result = final.rounds[0].metrics or {}
                records = [_site_record(fed, name, final.study_id) for name in names]
                pooled_s, pooled_cpu_s, reference = pooled[library.name]
                identical = library.trees_of(library.from_result(result)) == reference
                built = int(result.get("trees") or trees)
                runs.append(
                    BoostingRun(
                        library=library.name,
                        trees=built,
                        pooled_s=pooled_s,
                        federated_s=federated_s,
                        ratio=federated_s / pooled_s,
                        collectives_per_tree=float(
                            np.mean([r["collective_calls"] for r in records]) / max(1, built)
                        ),
                        bytes_per_site=float(np.mean([8 * r["collectives"]["values_sent"] for r in records])),
                        waiting_share=float(np.mean([r["collective_s"] / r["program_s"] for r in records])),
                        program_s=float(np.mean([r["program_s"] for r in records])),
                        identical_to_pooled=identical,
                        accuracy=result.get("accuracy"),
                        pooled_cpu_s=pooled_cpu_s,
                        orchestrator_cpu_s=None if cpu is None else cpu[0],
                        site_cpu_s=None if cpu is None else float(np.mean(cpu[1:])),
                        cores_busy=None if cpu is None else sum(cpu) / federated_s,
                        cpu_bound_ratio=None if cpu is None else sum(cpu) / (os.cpu_count() or 1) / pooled_s,
                    )
                )
    return BoostingBenchmark(
        sites=sites,
        rows=rows,
        features=features,
        trees=trees,
        cpus=os.cpu_count() or 1,
        load_before=load_before,
        runs=tuple(runs),
    )


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far, from ``/proc`` (None where it cannot be read)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_used(before: list[float | None], after: list[float | None]) -> list[float] | None:
    """Each process's CPU time between two readings; None unless every reading was there."""
    if any(v is None for v in (*before, *after)):
        return None
    return [a - b for a, b in zip(after, before, strict=True)]  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class _Library:
    name: str
    recipe: Any
    params: Any
    train_pooled: Callable[[Any, list[TabularDataset]], Any]
    from_result: Callable[[dict[str, Any]], Any]
    trees_of: Callable[[Any], str]


def _libraries(features: int, trees: int) -> list[_Library]:
    return [
        _Library(
            "LightGBM",
            LIGHTGBM_RECIPE,
            LightGbmParams(n_features=features, num_rounds=trees),
            train_pooled,
            LightGbmModel.from_result,
            lambda m: m.model_text.split("end of trees")[0],  # the parameters name the tree learner
        ),
        _Library(
            "XGBoost",
            XGBOOST_RECIPE,
            XGBoostParams(n_features=features, num_rounds=trees),
            train_pooled_xgboost,
            XGBoostModel.from_result,
            lambda m: m.model_json,
        ),
    ]
