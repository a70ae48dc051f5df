"""Which site program a collective study runs, and what its session's result means at the orchestrator.

Until recipes are plug-ins (a registry answering "is this recipe COLLECTIVE, and what is its run_site and
finish"), this is the one place that maps a study's recipe to a collective program; the only one today is
the collective benchmark's probe. The round engine asks :func:`is_collective`; the agent asks
:func:`collective_program`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedhealth.data import TabularDataset
from fedhealth.governance import spec_hash
from fedhealth.learning import (
    BenchmarkCollectives,
    Collectives,
    InMemorySession,
    ProbeSettings,
    probe_report,
    run_probe,
)
from fedhealth.protocol import RecipeName, RecipeSpec, StudySpec, collective_plan

DEFAULT_PROBE_CALLS = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveProgram:
    """A collective recipe's two halves: the site program (run at every participant with the session) and
    the orchestrator's reading of the session's released result (the leader's last broadcast)."""

    reads_data: bool
    run_site: Callable[[RecipeSpec, TabularDataset | None, Collectives], None]
    finish: Callable[[RecipeSpec, bytes | None], dict[str, Any]]


def _probe_settings(recipe: RecipeSpec) -> ProbeSettings:
    """The probe's parameters in today's flat recipe fields (until recipes carry their own parameters):
    ``n_params`` values per sum, ``local_steps`` timed calls, ``local_epochs`` 0 for no unmasked baseline."""
    assert recipe.n_params is not None
    return ProbeSettings(
        size=recipe.n_params,
        calls=recipe.local_steps or DEFAULT_PROBE_CALLS,
        baseline=recipe.local_epochs > 0,
    )


def _run_probe(recipe: RecipeSpec, dataset: TabularDataset | None, session: Collectives) -> None:
    if not isinstance(session, BenchmarkCollectives):
        raise TypeError("the collective probe needs a session with unmasked sums (a benchmark session)")
    run_probe(_probe_settings(recipe), session)


PROBE = CollectiveProgram(
    reads_data=False, run_site=_run_probe, finish=lambda _, released: probe_report(released)
)


def collective_program(recipe: RecipeSpec) -> CollectiveProgram | None:
    """The recipe's collective program, or None for a recipe that runs rounds."""
    if recipe.name is RecipeName.COLLECTIVE_PROBE:
        return PROBE
    return None


def is_collective(spec: StudySpec) -> bool:
    """Whether the study runs one collective session instead of training rounds."""
    return collective_program(spec.recipe) is not None


def run_collective_in_memory(
    spec: StudySpec, datasets: Mapping[str, TabularDataset | None], *, call_timeout_s: float = 30.0
) -> dict[str, Any]:
    """A collective study in this process: the recipe's site program at every participant of the spec's
    session (threads, the real masks and relay), then the orchestrator's reading of what it released. What
    the services compute for the same spec and data (the round's metrics, less the session's attempt)."""
    program = collective_program(spec.recipe)
    if program is None:
        raise ValueError(f"recipe {spec.recipe.name.value!r} does not run a collective session")
    plan = collective_plan(spec)
    session = InMemorySession(
        plan.sites,
        study_id="memory",
        spec_hash=spec_hash(spec.model_dump(mode="json")),
        collusion=plan.collusion,
        call_timeout_s=call_timeout_s,
    )
    session.run(lambda member: program.run_site(spec.recipe, datasets.get(member.site), member))
    return program.finish(spec.recipe, session.relay.released)
