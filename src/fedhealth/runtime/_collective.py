"""Collective studies as the services run them: which studies are sessions, the context a site program gets,
the orchestrator's reading of what a session released, and a whole session in one process.

The recipe is asked, never named (:mod:`fedhealth.runtime._recipes`): a study is collective when its recipe's
combination pattern is COLLECTIVE, and the recipe's ``run_site`` and ``finish`` do the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import JsonValue

from fedhealth.data import TabularDataset
from fedhealth.governance import spec_hash
from fedhealth.learning import (
    Collectives,
    CombinationPattern,
    InMemorySession,
    ResolvedRecipe,
    SessionContext,
    SiteSessionOutcome,
    task_rng,
)
from fedhealth.protocol import RecipeSpec, StudySpec, collective_plan
from fedhealth.runtime._privacy import noise_generator
from fedhealth.runtime._recipes import study_recipe


def is_collective(spec: StudySpec) -> bool:
    """Whether the study runs one collective session instead of training rounds (asks its recipe)."""
    return study_recipe(spec.recipe).pattern is CombinationPattern.COLLECTIVE


def session_attempts(spec: StudySpec) -> int:
    """How many sessions a collective study may run: the first and the retries its recipe's params allow
    (1 for a study combined in rounds)."""
    return 1 + study_recipe(spec.recipe).session_retries()


def session_context(
    spec: StudySpec,
    site: str,
    round_number: int = 1,
    *,
    reproducible_noise: bool | None = None,
    checkpoints: Path | None = None,
) -> SessionContext:
    """What a site program knows besides its data and session: the site, the study seed, a generator
    fixed by (seed, session round, site), the same in every attempt, and the generator for DP noise (a
    secure one, unless ``reproducible_noise`` or ``FEDHEALTH_REPRODUCIBLE_NOISE=1``: see
    :func:`~fedhealth.runtime.noise_generator`); ``checkpoints``: the site's own directory for this study's
    checkpoints (kept across the study's sessions), or None."""
    rng = task_rng(spec.seed, round_number, site)
    noise_rng = task_rng(spec.seed, round_number, f"{site}/noise")
    return SessionContext(
        site=site,
        seed=spec.seed,
        rng=rng,
        noise=noise_generator(noise_rng, reproducible_noise),
        checkpoints=checkpoints,
    )


def run_site_program(
    recipe: ResolvedRecipe,
    spec: StudySpec,
    dataset: TabularDataset | None,
    session: Collectives,
    round_number: int = 1,
    *,
    checkpoints: Path | None = None,
) -> SiteSessionOutcome:
    """The recipe's site program at one site, over ``session`` (``checkpoints``: see
    :func:`session_context`)."""
    return recipe.collective().run_site(
        recipe.params,
        dataset,
        session,
        session_context(spec, session.site, round_number, checkpoints=checkpoints),
    )


def finish_session(recipe: RecipeSpec, released: bytes | None) -> dict[str, JsonValue]:
    """At the orchestrator: the session's public result as the recipe reads it from what was released (the
    leader's last broadcast); ValueError when nothing was released."""
    if released is None:
        raise ValueError("the session released nothing (no broadcast)")
    resolved = study_recipe(recipe)
    return resolved.collective().finish(resolved.params, released)


def run_collective_in_memory(
    spec: StudySpec, datasets: Mapping[str, TabularDataset | None], *, call_timeout_s: float = 30.0
) -> dict[str, Any]:
    """A collective study in this process: the recipe's site program at every participant of the spec's
    session (threads, the real masks and relay), then the orchestrator's reading of what it released: what
    the services compute for the same spec and data (the round's metrics, less the session's attempt)."""
    recipe = study_recipe(spec.recipe)
    plan = collective_plan(spec)
    session = InMemorySession(
        plan.sites,
        study_id="memory",
        spec_hash=spec_hash(spec.model_dump(mode="json")),
        collusion=plan.collusion,
        call_timeout_s=call_timeout_s,
    )
    session.run(lambda member: run_site_program(recipe, spec, datasets.get(member.site), member))
    return finish_session(spec.recipe, session.relay.released)
