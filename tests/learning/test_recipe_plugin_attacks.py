"""Attacks on the recipe plug-in seam: a second installed package claiming a recipe's name and version (an
impostor beside the built-in), and a study spec naming a module path instead of a registered recipe. The
site decides which recipes run: only entry points of installed distributions, and never one whose name two
packages claim, whatever the order they were installed in."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest
from pydantic import ValidationError

from fedhealth.learning import (
    LOGREG_RECIPE,
    RECIPE_ENTRY_POINT_GROUP,
    RecipeRegistry,
    UnknownRecipeError,
    reload_recipes,
    resolve_recipe,
)
from fedhealth.protocol import RecipeSpec

IMPOSTOR_MODULE = "fedhealth_attack_impostor"
IMPOSTOR_SOURCE = """
from fedhealth.learning import LOGREG_RECIPE

class Impostor(type(LOGREG_RECIPE)):
    '''Claims to be logreg version 1; a site cannot tell which of the two a study would get.'''

RECIPE = Impostor()
"""


def _ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=RECIPE_ENTRY_POINT_GROUP)


@pytest.fixture
def impostor_on_path(tmp_path, monkeypatch):
    """A module holding a recipe that claims logreg's name and version, importable, not yet imported."""
    (tmp_path / f"{IMPOSTOR_MODULE}.py").write_text(IMPOSTOR_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, IMPOSTOR_MODULE, raising=False)
    reload_recipes()
    yield
    monkeypatch.delitem(sys.modules, IMPOSTOR_MODULE, raising=False)
    reload_recipes()


@pytest.mark.parametrize("impostor_first", [False, True], ids=["builtin-first", "impostor-first"])
def test_two_packages_claiming_one_recipe_run_neither_whatever_the_install_order(
    impostor_on_path, impostor_first
):
    builtin = _ep("logreg", "fedhealth.learning:LOGREG_RECIPE")
    impostor = _ep("logreg", f"{IMPOSTOR_MODULE}:RECIPE")
    registry = RecipeRegistry(entry_points=[impostor, builtin] if impostor_first else [builtin, impostor])
    with pytest.raises(UnknownRecipeError, match="'logreg' version '1' is registered twice"):
        registry.get("logreg", "1")
    with pytest.raises(UnknownRecipeError, match="registered twice"):
        registry.resolve("logreg", "1", {"n_features": 3})
    assert registry.versions("logreg") == []  # neither claimant is offered


def test_a_third_claimant_does_not_reinstate_a_clashing_recipe(impostor_on_path):
    registry = RecipeRegistry(
        entry_points=[
            _ep("logreg", "fedhealth.learning:LOGREG_RECIPE"),
            _ep("logreg", f"{IMPOSTOR_MODULE}:RECIPE"),
            _ep("logreg@1", "fedhealth.learning:LOGREG_RECIPE"),
        ]
    )
    with pytest.raises(UnknownRecipeError, match="registered twice"):
        registry.get("logreg", "1")


def test_one_package_visible_twice_on_the_path_is_not_a_clash():
    entry = _ep("logreg", "fedhealth.learning:LOGREG_RECIPE")
    registry = RecipeRegistry(entry_points=[entry, _ep("logreg", "fedhealth.learning:LOGREG_RECIPE")])
    assert registry.get("logreg", "1") is LOGREG_RECIPE


def test_a_recipe_name_that_is_a_module_path_imports_nothing(impostor_on_path):
    # the module is importable from sys.path, but only an installed entry point's name is ever looked up
    for name in (IMPOSTOR_MODULE, f"{IMPOSTOR_MODULE}.recipe"):
        with pytest.raises(UnknownRecipeError, match=rf"no recipe '{name}' is installed here"):
            resolve_recipe(name, "1", {})
    assert IMPOSTOR_MODULE not in sys.modules
    # an entry point's "module:attribute" form cannot even be written as a recipe name on the wire
    with pytest.raises(ValidationError):
        RecipeSpec(name=f"{IMPOSTOR_MODULE}:RECIPE")
    with pytest.raises(ValidationError):
        RecipeSpec(name="../fedhealth_attack_impostor")
