"""Transport benchmarks over a real local federation (orchestrator + agents as processes, loopback HTTP)."""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedhealth.protocol import RecipeSpec, StudySpec, StudyStatus, TaskKind
from fedhealth.sim._federation import FederationError, LocalFederation


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundBenchmark:
    sites: int
    params: int
    rounds: int
    median_s: float
    p90_s: float
    min_s: float
    round_times_s: tuple[float, ...]


def benchmark_rounds(
    *,
    sites: int,
    params: int,
    rounds: int = 20,
    warmup: int = 2,
    workdir: Path | None = None,
    orchestrator_args: tuple[str, ...] = (),
    agent_args: tuple[str, ...] = (),
) -> RoundBenchmark:
    """Median wall time of a training round of a synthetic model of ``params`` float32 parameters.

    A round is timed by the orchestrator from its opening to its close: task delivery by long-poll, model
    download, the (trivial) local step, upload, validation, aggregation and the next round's opening.
    The first ``warmup`` rounds are dropped (they include the agents' start-up).
    """
    with tempfile.TemporaryDirectory(prefix="fedhealth-bench-") as tmp:
        root = workdir or Path(tmp)
        with LocalFederation(root, log_level="warning", orchestrator_args=orchestrator_args) as fed:
            fed.start_orchestrator()
            names = [f"site-{i:02d}" for i in range(sites)]
            for name in names:
                fed.add_site(name)
                fed.start_agent(name, {}, extra_args=agent_args)
            spec = StudySpec(
                name="bench-rounds",
                dataset="none",
                recipe=RecipeSpec(name="synthetic", n_params=params),
                rounds=rounds + warmup,
                train_sites=names,
                min_sites=sites,
                round_deadline_s=120.0,
            )
            study = fed.create_study(spec)
            final = fed.wait_for_study(study.study_id, timeout=600, interval=0.5)
            if final.status is not StudyStatus.COMPLETED:
                raise FederationError(f"benchmark study {final.status.value}: {final.reason}")
            times = [
                (r.ended_at - r.started_at).total_seconds()
                for r in final.rounds
                if r.kind is TaskKind.TRAIN and r.ended_at is not None
            ][warmup:]
    ordered = sorted(times)
    return RoundBenchmark(
        sites=sites,
        params=params,
        rounds=len(times),
        median_s=statistics.median(times),
        p90_s=ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        min_s=ordered[0],
        round_times_s=tuple(times),
    )
