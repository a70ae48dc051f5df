"""A whole study driven in memory, through the same runtime functions the services call.

This is the transport seam of the design: what the orchestrator and the agents compute over HTTP must equal,
bit for bit, what this loop computes in one process (the end-to-end tests check exactly that).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from fedhealth.core import InputError
from fedhealth.data import TabularDataset
from fedhealth.governance import spec_hash
from fedhealth.learning import InMemorySession
from fedhealth.protocol import ReleasedScaling, SiteMetrics, StudySpec, Task, TaskKind, TaskStatus
from fedhealth.runtime._rounds import (
    Aggregate,
    Aggregated,
    CloseTasks,
    Combination,
    ConcludeSession,
    FailStudy,
    FinishStudy,
    OpenRound,
    RoundCommand,
    RoundState,
    SessionDone,
    StudyRules,
    TaskClosed,
    first_round,
)
from fedhealth.runtime._scaling import finish_scaling, released_scaling, run_scaling_program
from fedhealth.runtime._tasks import Params, aggregate, evaluate_on_site, initial_model, train_on_site

# The in-memory study's time: deadlines mean nothing here (no site is ever late), so no clock is read.
_START = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class InMemoryResult:
    """The final model, each evaluation site's metrics, and (``standardize = "federated"``) the scaling
    the pre-step released."""

    params: Params
    evaluation: dict[str, SiteMetrics]
    scaling: ReleasedScaling | None = None


def _scaling_step(
    spec: StudySpec, sites: tuple[str, ...], datasets: Mapping[str, TabularDataset | None]
) -> ReleasedScaling:
    """The scaling pre-step's session among ``sites`` in this process (threads, the real masks and relay),
    read as the orchestrator reads it."""
    session = InMemorySession(
        sorted(sites), study_id="memory", spec_hash=spec_hash(spec.model_dump(mode="json"))
    )
    session.run(lambda member: run_scaling_program(spec, datasets.get(member.site), member))
    try:
        released = released_scaling(finish_scaling(session.relay.released))
    except ValueError as exc:
        raise InputError(str(exc)) from None
    assert released is not None
    return released


def _task(spec: StudySpec, number: int, kind: TaskKind, scaling: ReleasedScaling | None = None) -> Task:
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
        scaling=scaling,
    )


def run_study_in_memory(
    spec: StudySpec,
    datasets: Mapping[str, TabularDataset | None],
    *,
    central_rng: np.random.Generator | None = None,
) -> InMemoryResult:
    """Every round with every training site (no dropouts), then the evaluation round, as the round rules
    (:class:`~fedhealth.runtime.RoundState`, the orchestrator's) open, count and end them.

    Differential-privacy noise at the sites is drawn from each task's generator (reproducible, as a site
    agent does with ``FEDHEALTH_REPRODUCIBLE_NOISE=1``); site-central noise from ``central_rng`` (default:
    a secure generator, as the orchestrator does). The study is computed the plain way whatever its spec
    says of secure aggregation: the reference that secure studies are compared against. A study with
    ``standardize = "federated"`` runs its scaling pre-step (round 0) first, as a real in-process session
    (InputError with the one-line reason when it refuses, e.g. a constant feature).
    """
    rules = StudyRules.of(spec, Combination.PLAIN)
    params = initial_model(spec.recipe, spec.seed)
    state: Params = {}
    site_states: dict[str, Params | None] = {}  # what each site keeps between its rounds (SCAFFOLD's c_i)
    evaluation: dict[str, SiteMetrics] = {}
    scaling: ReleasedScaling | None = None
    opening: OpenRound | None = first_round(rules, _START)
    while opening is not None:
        current = RoundState.opened(rules, opening)
        if current.combination is Combination.SESSION:  # the scaling pre-step
            scaling = _scaling_step(spec, opening.sites, datasets)
        task = _task(spec, opening.number, opening.kind, scaling)
        updates: dict[str, tuple[int, Params]] = {}
        commands: list[RoundCommand] = []
        for site in sorted(opening.sites):
            if opening.kind is TaskKind.COLLECTIVE:
                pass  # its part was the session above
            elif opening.kind is TaskKind.TRAIN:
                outcome = train_on_site(
                    task,
                    site,
                    params,
                    datasets[site],
                    reproducible_noise=True,
                    site_state=site_states.get(site),
                )
                site_states[site] = outcome.site_state
                updates[site] = (outcome.metrics.num_samples, outcome.delta)
            else:
                evaluation[site] = evaluate_on_site(task, params, datasets[site])
            commands.extend(current.handle(TaskClosed(site=site, status=TaskStatus.COMPLETED)))
        opening = None
        while commands:
            command = commands.pop(0)
            match command:
                case Aggregate(contributors=contributors):
                    if current.kind is TaskKind.TRAIN:
                        params, state = aggregate(
                            spec.strategy,
                            params,
                            [updates[site] for site in contributors],
                            state,
                            spec=spec,
                            rng=central_rng,
                        )
                    commands.extend(current.handle(Aggregated(at=_START)))
                case ConcludeSession():
                    commands.extend(current.handle(SessionDone()))
                case OpenRound():
                    opening = command
                case FailStudy():  # every site answers every task here: a failure is a bug
                    raise RuntimeError(f"the in-memory study failed: {command.study_reason}")
                case FinishStudy() | CloseTasks():
                    pass
                case _:
                    raise AssertionError(f"a plain round asked for {command!r}")
    return InMemoryResult(
        params={k: np.asarray(v) for k, v in params.items()}, evaluation=evaluation, scaling=scaling
    )
