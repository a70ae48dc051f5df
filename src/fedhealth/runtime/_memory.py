"""A whole study driven in memory, through the same runtime functions the services call.

This is the transport seam of the design: what the orchestrator and the agents compute over HTTP must equal,
bit for bit, what this loop computes in one process (the end-to-end tests check exactly that).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from fedhealth.data import TabularDataset
from fedhealth.protocol import SiteMetrics, StudySpec, Task, TaskKind
from fedhealth.runtime._tasks import Params, aggregate, evaluate_on_site, initial_model, train_on_site


@dataclass(frozen=True, slots=True, kw_only=True)
class InMemoryResult:
    params: Params
    evaluation: dict[str, SiteMetrics]


def _task(spec: StudySpec, number: int, kind: TaskKind) -> Task:
    return Task(
        task_id=f"memory-{number}",
        study_id="memory",
        round=number,
        kind=kind,
        dataset=spec.dataset,
        recipe=spec.recipe,
        model_digest="0" * 64,
        seed=spec.seed,
        deadline=datetime.now(UTC),
        spec=spec,
    )


def run_study_in_memory(
    spec: StudySpec,
    datasets: Mapping[str, TabularDataset | None],
    *,
    central_rng: np.random.Generator | None = None,
) -> InMemoryResult:
    """Every round with every training site (no dropouts), then the evaluation round.

    Differential-privacy noise at the sites is drawn from each task's generator (reproducible, as a site
    agent does with ``FEDHEALTH_REPRODUCIBLE_NOISE=1``); site-central noise from ``central_rng`` (default:
    a secure generator, as the orchestrator does).
    """
    params = initial_model(spec.recipe, spec.seed)
    state: Params = {}
    for number in range(1, spec.rounds + 1):
        task = _task(spec, number, TaskKind.TRAIN)
        updates = []
        for site in sorted(spec.train_sites):
            outcome = train_on_site(task, site, params, datasets[site], reproducible_noise=True)
            updates.append((outcome.metrics.num_samples, outcome.delta))
        params, state = aggregate(spec.strategy, params, updates, state, spec=spec, rng=central_rng)
    task = _task(spec, spec.rounds + 1, TaskKind.EVALUATE)
    evaluation = {
        site: evaluate_on_site(task, params, datasets[site]) for site in sorted(spec.evaluation_sites)
    }
    return InMemoryResult(params={k: np.asarray(v) for k, v in params.items()}, evaluation=evaluation)
