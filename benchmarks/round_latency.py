"""Round latency of the orchestrator's round engine in one process: this checkout against a baseline revision.

What is timed: one training round at the orchestrator, from the first site's result arriving to the next
round being open. Each site's upload is stored as the upload route stores it (the blob, then
``complete_task``), then ``RoundEngine.task_closed`` runs; the last site's call returns once the round is
aggregated (weighted mean and server step, in a worker thread as in the service) and the next round's tasks
are in the database. It is the real engine, store (SQLite in a temporary folder) and blob store, without
HTTP and without agents: what a change to the round engine can slow down, and nothing else.

Before/after in one run: with ``--baseline REV`` the script exports ``src/`` of that git revision into a
temporary folder and runs itself as child processes with that ``src/`` or with this checkout's first on
``PYTHONPATH``, alternating (``--repeats`` pairs per configuration, who goes first swapped each time), then
prints both medians and their ratio per configuration: wall-clock time (the latency) and the process's CPU
time over all its threads (the work; far steadier than wall-clock time on a loaded, shared machine).

Run: python benchmarks/round_latency.py --baseline main --repeats 4
     (one implementation only: python benchmarks/round_latency.py --child)
Exit status 1 if a wall-clock ratio (this checkout / baseline) is above ``--max-ratio`` (default 1.1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# (sites, parameters per model, training rounds timed)
CONFIGS = ((3, 1_000, 40), (10, 1_000_000, 12))
ROOT = Path(__file__).resolve().parent.parent


async def _study_rounds(
    sites: int, n_params: int, rounds: int, folder: Path
) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds (all threads: the aggregation runs in a worker) of each round."""
    from fedhealth.core import SystemClock
    from fedhealth.governance import spec_hash
    from fedhealth.learning import SYNTHETIC_RECIPE, SyntheticParams
    from fedhealth.orchestrator import (
        BlobStore,
        RoundEngine,
        Store,
        make_engine,
        sqlite_url,
        upgrade_database,
    )
    from fedhealth.orchestrator._blobs import BlobKind
    from fedhealth.orchestrator._notify import TaskNotifier
    from fedhealth.protocol import ApprovalState, ResultManifest, SiteMetrics, StudySpec, TaskKind
    from fedhealth.runtime import encode_update, param_specs, recipe_spec

    db = make_engine(sqlite_url(folder / "orchestrator.sqlite"))
    upgrade_database(db)
    store = Store(db)
    blobs = BlobStore(folder / "blobs")
    clock = SystemClock()
    engine = RoundEngine(store, blobs, clock, TaskNotifier())
    names = [f"site-{i:02d}" for i in range(sites)]
    spec = StudySpec.model_validate(
        {
            "name": "latency",
            "dataset": "none",
            "recipe": recipe_spec(SYNTHETIC_RECIPE, SyntheticParams(n_params=n_params)),
            "rounds": rounds + 1,
            "train_sites": names,
            "min_sites": sites,
            "round_deadline_s": 3600.0,
            "seed": 0,
        }
    )
    digest = spec_hash(spec.model_dump(mode="json"))
    for name in names:
        store.create_site(name, clock.now())
        store.record_approval(name, digest, ApprovalState.APPROVED, clock.now())
    study = await engine.create_study(spec)
    specs = param_specs(spec.recipe)
    timings: list[float] = []
    cpu: list[float] = []
    try:
        for number in range(1, rounds + 1):
            (r,) = [x for x in store.open_rounds() if x.study_id == study.id]
            assert r.number == number, r.number
            assert r.kind is TaskKind.TRAIN, r.kind
            tasks = store.tasks_of_round(r.id)
            # the sites' uploads, encoded before the clock starts (a site's work, not the orchestrator's)
            bodies = {
                t.id: encode_update(
                    {s.name: np.full(s.shape, 0.001 * (i + 1), np.float32) for s in specs},
                    ResultManifest(task_id=t.id, metrics=SiteMetrics(num_samples=10 + i, train_loss=0.5)),
                )
                for i, t in enumerate(tasks)
            }
            started, started_cpu = time.perf_counter(), time.process_time()
            for t in tasks:
                result = blobs.put(bodies[t.id], kind=BlobKind.UPDATE)
                assert store.complete_task(
                    t.id,
                    digest=result,
                    num_samples=10,
                    metrics=SiteMetrics(num_samples=10, train_loss=0.5),
                    when=clock.now(),
                )
                await engine.task_closed(r.id, t.id)
            timings.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
            assert store.get_round(r.id).status.value == "completed", store.get_round(r.id).reason
    finally:
        await engine.close()
        db.dispose()
    return timings, cpu


def _key(sites: int, n_params: int) -> str:
    return f"{sites} x {n_params:.0e}"


def _child(only: str | None) -> None:
    import fedhealth

    out: dict[str, object] = {"source": str(Path(fedhealth.__file__).resolve().parent.parent)}
    for sites, n_params, rounds in CONFIGS:
        if only is not None and only != _key(sites, n_params):
            continue
        with tempfile.TemporaryDirectory(prefix="round-latency-") as folder:
            wall, cpu = asyncio.run(_study_rounds(sites, n_params, rounds, Path(folder)))
        # the first round warms caches and imports
        out[_key(sites, n_params)] = {"wall": wall[1:], "cpu": cpu[1:]}
    print(json.dumps(out))


def _run_child(src: Path, only: str) -> dict[str, dict[str, list[float]]]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "--only", only],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    source = result.pop("source")
    assert Path(source) == src.resolve(), f"ran {source}, not {src}"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help="time this interpreter's fedhealth only")
    parser.add_argument("--only", help="one configuration, as printed (e.g. '3 x 1e+03')")
    parser.add_argument("--baseline", help="git revision to compare against (its src/ on PYTHONPATH)")
    parser.add_argument("--repeats", type=int, default=4, help="alternating runs of each implementation")
    parser.add_argument("--max-ratio", type=float, default=1.1)
    args = parser.parse_args()
    if args.child or args.baseline is None:
        _child(args.only)
        return 0
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # samples[implementation][configuration][wall | cpu]: every timed round of every run
    samples: dict[str, dict[str, dict[str, list[float]]]] = {"baseline": {}, "current": {}}
    with tempfile.TemporaryDirectory(prefix="round-latency-base-") as base:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.baseline, "src"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
        sources = {"baseline": Path(base) / "src", "current": ROOT / "src"}
        # Alternate per configuration and swap who goes first each time: a shared machine's load drifts.
        for sites, n_params, _ in CONFIGS:
            key = _key(sites, n_params)
            for repeat in range(args.repeats):
                order = ["baseline", "current"] if repeat % 2 == 0 else ["current", "baseline"]
                for which in order:
                    for measure, values in _run_child(sources[which], key)[key].items():
                        samples[which].setdefault(key, {}).setdefault(measure, []).extend(values)
    worst = 0.0
    print(f"round latency, median over rounds (baseline {args.baseline} = {head}; {args.repeats} runs each)")
    print(f"{'sites x params':>16} {'measure':>8} {'baseline ms':>12} {'current ms':>12} {'ratio':>7}")
    for key, measures in samples["current"].items():
        for measure, values in measures.items():
            before = statistics.median(samples["baseline"][key][measure]) * 1e3
            after = statistics.median(values) * 1e3
            if measure == "wall":
                worst = max(worst, after / before)
            print(f"{key:>16} {measure:>8} {before:12.2f} {after:12.2f} {after / before:7.3f}")
    return 1 if worst > args.max_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
