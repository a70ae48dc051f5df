"""``standardize = "federated"`` as the services run it: which studies have the scaling pre-step, the checks
that refuse it, the site's part in its session, the orchestrator's reading of its release, and the recipe a
later task trains with (the spec's, the released mean and scale filled in).

The pre-step is round 0 of the study (:class:`~fedhealth.runtime.RoundState`): one collective session over
the training sites, every participant or nobody, run through the same session machinery as the collective
recipes; the numerics are :mod:`fedhealth.learning._federated_scaling`.

Differential privacy: refused. The pre-step releases exact sums that no DP guarantee of the study would
cover, and a hospital engineer reading "epsilon 1" must be able to trust that nothing else left the site;
a DP study standardizes with ``"given"`` statistics from a noisy ``fedhealth stats run`` (charged to the
ledger) or with ``"none"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import JsonValue

from fedhealth.core import InputError
from fedhealth.data import TabularDataset
from fedhealth.learning import (
    Collectives,
    CombinationPattern,
    RecipeError,
    load_recipe,
    read_scaling,
    run_scaling_site,
)
from fedhealth.protocol import RecipeSpec, ReleasedScaling, StudySpec, Task, collective_plan

FEDERATED = "federated"
SCALING_ROUND = 0  # the pre-step's round number: before round 1


def federated_scaling_requested(recipe: RecipeSpec) -> bool:
    """Whether the study's recipe params ask for ``standardize = "federated"`` (read from the params as
    written, before the recipe validates them, so that a recipe without the capability gets a clear
    error rather than an unknown-field one)."""
    pre = recipe.params.get("preprocessing")
    return isinstance(pre, Mapping) and pre.get("standardize") == FEDERATED


def check_federated_scaling(spec: StudySpec) -> None:
    """Refuse a study whose ``standardize = "federated"`` cannot run (:class:`RecipeError`, one line): a
    recipe that does not declare ``federated_scaling``, mean or scale written in the spec, no collective
    session the spec can hold (secure_aggregation with every site's key, at least 3 sites), or differential
    privacy (module docstring). Nothing is run or charged before this check."""
    if not federated_scaling_requested(spec.recipe):
        return
    recipe = load_recipe(spec.recipe.name, spec.recipe.version)
    if recipe.pattern is not CombinationPattern.ROUNDS or not recipe.capabilities.federated_scaling:
        raise RecipeError(
            f"recipe.params.preprocessing: recipe {spec.recipe.name!r} does not support standardize = "
            "'federated' (it does not declare federated_scaling)"
        )
    pre = spec.recipe.params.get("preprocessing")
    assert isinstance(pre, Mapping)
    if pre.get("mean") is not None or pre.get("scale") is not None:
        raise RecipeError(
            "recipe.params.preprocessing: standardize = 'federated' computes mean and scale itself; "
            "give them only with standardize = 'given'"
        )
    if spec.privacy is not None:
        raise RecipeError(
            "privacy: standardize = 'federated' releases exact sums that the study's differential privacy "
            "would not cover; use standardize = 'given' with a noisy `fedhealth stats run`, or 'none'"
        )
    try:
        collective_plan(spec)
    except ValueError as exc:
        raise RecipeError(
            f"secure_aggregation: standardize = 'federated' sums through a collective session: {exc}"
        ) from None


def _feature_names(recipe: RecipeSpec) -> tuple[str, ...]:
    from fedhealth.runtime._recipes import study_recipe

    names = getattr(study_recipe(recipe).params, "feature_names", None)
    if not names:  # the recipe's own validation requires them with preprocessing
        raise RecipeError("recipe.params.feature_names: standardize = 'federated' needs them")
    return tuple(names)


def run_scaling_program(spec: StudySpec, dataset: TabularDataset | None, session: Collectives) -> bytes:
    """A site's part in the pre-step's session, over its kept training rows; returns the release."""
    return run_scaling_site(session, dataset, _feature_names(spec.recipe))


def finish_scaling(released: bytes | None) -> dict[str, JsonValue]:
    """At the orchestrator: the pre-step's round result (``{"scaling": {mean, scale, rows}}``) from what
    its session released; ValueError with the one-line reason when it refused (a constant feature)."""
    try:
        scaling = read_scaling(released)
    except InputError as exc:
        raise ValueError(str(exc)) from None
    return {"scaling": {"mean": list(scaling.mean), "scale": list(scaling.scale), "rows": scaling.rows}}


def released_scaling(metrics: Mapping[str, Any] | None) -> ReleasedScaling | None:
    """The scaling recorded in the pre-step round's metrics (None if it has none)."""
    if not metrics or not isinstance(metrics.get("scaling"), Mapping):
        return None
    return ReleasedScaling.model_validate(metrics["scaling"])


def effective_recipe(recipe: RecipeSpec, scaling: ReleasedScaling | None) -> RecipeSpec:
    """The recipe a task trains, evaluates or exports with: ``recipe`` itself, or for ``standardize =
    "federated"`` the same with the released mean and scale filled in. InputError for a federated study
    without its scaling, a scaling for a study that has none, or one of the wrong width (before any data is
    read: the recipe itself would notice only once it standardizes the rows)."""
    if not federated_scaling_requested(recipe):
        if scaling is not None:
            raise InputError("the task carries a federated scaling, but the study does not standardize so")
        return recipe
    if scaling is None:
        raise InputError("standardize = 'federated': the task came without the scaling its pre-step released")
    if len(scaling.mean) != len(scaling.scale):
        raise InputError(
            f"the federated scaling has {len(scaling.mean)} means but {len(scaling.scale)} scales"
        )
    if len(scaling.mean) != (width := len(_feature_names(recipe))):
        raise InputError(
            f"the federated scaling has {len(scaling.mean)} values per statistic for the study's {width} "
            "features"
        )
    pre = dict(recipe.params["preprocessing"])  # type: ignore[arg-type]
    pre["mean"] = list(scaling.mean)
    pre["scale"] = list(scaling.scale)
    return recipe.model_copy(update={"params": {**recipe.params, "preprocessing": pre}})


def task_recipe(task: Task) -> RecipeSpec:
    """The recipe ``task`` runs (:func:`effective_recipe` of its recipe and scaling)."""
    return effective_recipe(task.recipe, task.scaling)
