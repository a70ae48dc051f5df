"""The study's recipe as the services see it: looked up in fedhealth.learning's registry by the name and
version its spec carries, its params validated by the recipe itself, and then only asked (its tensors,
capabilities, data schema). Nothing outside the registry and the recipes branches on a recipe's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel

from fedhealth.core import TensorSpec
from fedhealth.data import TabularDataset
from fedhealth.learning import (
    CombinationPattern,
    Recipe,
    RecipeCapabilities,
    RecipeError,
    ResolvedRecipe,
    resolve_recipe,
)
from fedhealth.protocol import RecipeSpec, StrategyName, StudySpec, collective_plan
from fedhealth.runtime._scaling import check_federated_scaling

Params = dict[str, np.ndarray]


def study_recipe(recipe: RecipeSpec) -> ResolvedRecipe:
    """The study's recipe from the registry, its params validated by the recipe (:class:`RecipeError` with
    "field: rule" messages otherwise). Everything below asks the resolved recipe, never its name."""
    return resolve_recipe(recipe.name, recipe.version, recipe.params)


def recipe_capabilities(recipe: RecipeSpec) -> RecipeCapabilities:
    """What the study's recipe declares it does (reads data, DP levels, secure sum...)."""
    return study_recipe(recipe).capabilities


def check_recipe(spec: StudySpec) -> ResolvedRecipe:
    """Refuse a study whose recipe this installation cannot run as specified (:class:`RecipeError`): unknown
    name or version, params its model refuses, a combination pattern the services do not run, secure
    aggregation of a recipe that cannot be summed securely, a collective session the spec cannot hold
    (:func:`~fedhealth.protocol.collective_plan`: its site keys, at least 3 sites), a ``standardize =
    "federated"`` the study cannot run (:func:`~fedhealth.runtime._scaling.check_federated_scaling`).
    Privacy is otherwise :func:`check_privacy`'s. The orchestrator runs it at submission, each site
    before it reads any data."""
    check_federated_scaling(spec)  # before the params are validated: its errors say more
    recipe = study_recipe(spec.recipe)
    if recipe.pattern is CombinationPattern.COLLECTIVE:
        # one session over exactly the spec's sites, their keys bound by the spec (every sum is masked)
        try:
            collective_plan(spec)
        except ValueError as exc:
            raise RecipeError(
                f"secure_aggregation: recipe {recipe.name!r} runs a collective session: {exc}"
            ) from None
        return recipe
    if recipe.pattern is not CombinationPattern.ROUNDS:
        raise RecipeError(
            f"recipe.name: recipe {recipe.name!r} is combined as {recipe.pattern.value!r}, which this "
            "orchestrator does not run"
        )
    if spec.secure_aggregation is not None and not recipe.capabilities.secure_sum:
        raise RecipeError(
            f"secure_aggregation: recipe {recipe.name!r} does not declare secure_sum: its updates cannot "
            "travel in a secure sum"
        )
    scaffold = spec.strategy.name is StrategyName.SCAFFOLD
    if scaffold != bool(recipe.control_variate_tensors()):
        raise RecipeError(
            f"strategy.name: scaffold needs a model with control variates, which recipe {recipe.name!r} "
            "builds only when it offers them and its params ask (torch: scaffold = true)"
            if scaffold
            else f"recipe.params: the model carries SCAFFOLD control variates; strategy "
            f"{spec.strategy.name.value!r} cannot update them (use strategy 'scaffold')"
        )
    return recipe


def recipe_spec(recipe: Recipe[Any], params: BaseModel | Mapping[str, Any]) -> RecipeSpec:
    """The wire form naming ``recipe`` (its name and version) with ``params`` (a params model, dumped to
    JSON with every field explicit, so the spec a steward approves shows every setting)."""
    values = params.model_dump(mode="json") if isinstance(params, BaseModel) else dict(params)
    return RecipeSpec(name=recipe.name, version=recipe.version, params=values)


def param_specs(recipe: RecipeSpec) -> list[TensorSpec]:
    """The tensors a model of this recipe has; uploads are checked against them."""
    return study_recipe(recipe).param_specs()


def initial_model(recipe: RecipeSpec, seed: int) -> Params:
    return study_recipe(recipe).init(seed)


def check_dataset_fits(recipe: RecipeSpec, dataset: TabularDataset) -> None:
    """Refuse a dataset that does not fit the recipe's data schema (width, feature names), before any
    training (:class:`~fedhealth.data.SchemaError`)."""
    study_recipe(recipe).check_dataset(dataset)
