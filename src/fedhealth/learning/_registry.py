"""Recipes by name and version, from the entry-point group ``fedhealth.recipes``.

Every recipe, the built-in ones included, is an entry point of an installed distribution:

.. code-block:: toml

    [project.entry-points."fedhealth.recipes"]
    logreg = "fedhealth.learning:LOGREG_RECIPE"

The entry point's name is the recipe's name (or ``name@version``, for a package that ships two versions of
one recipe); its object is the recipe itself (see :mod:`fedhealth.learning._recipe`). Plug-ins are loaded
on first use of their name, so a broken plug-in breaks only the studies that name it, with its import error
in the message. This module is the one place that looks recipes up by name: everything else asks a
:class:`ResolvedRecipe` what it needs (its tensors, capabilities, data schema...).

A recipe's code runs with the privileges of the process that loads it (orchestrator or site agent): a
hospital installs only packages it has reviewed. What it approves per study is the spec's hash, which covers
the recipe's name, version and parameters.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from pydantic import BaseModel, ValidationError

from fedhealth.core import TensorSpec
from fedhealth.data import TabularDataset
from fedhealth.learning._errors import RecipeError, RecipeParamsError, UnknownRecipeError
from fedhealth.learning._recipe import (
    CollectiveRecipe,
    CombinationPattern,
    DataSchema,
    DpLevel,
    ModelExport,
    Params,
    Recipe,
    RecipeCapabilities,
    RecordDp,
    RoundsRecipe,
    SessionDpRecipe,
)
from fedhealth.learning._results import EvalResult, TrainResult
from fedhealth.privacy import DpPlan

RECIPE_ENTRY_POINT_GROUP = "fedhealth.recipes"
# The wire's rules for the names a study spec can carry (fedhealth.protocol's Name and RecipeSpec.version):
# a recipe that breaks them could never be named, so it is refused at registration.
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}\Z")
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,31}\Z")
_RESOLVED_CACHE = 512  # resolved (name, version, params) kept per registry; a study asks every upload


@dataclass(frozen=True, slots=True)
class ResolvedRecipe:
    """A recipe with a study's validated parameters: what the runtime calls, never naming the recipe."""

    recipe: Recipe[Any]
    params: BaseModel

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def version(self) -> str:
        return self.recipe.version

    @property
    def pattern(self) -> CombinationPattern:
        return self.recipe.pattern

    @property
    def capabilities(self) -> RecipeCapabilities:
        return self.recipe.capabilities

    def data_schema(self) -> DataSchema:
        return self.recipe.data_schema(self.params)

    def describe(self) -> str:
        """The recipe's plain-language sentence for a data steward, with the study's params."""
        return self.recipe.describe(self.params)

    def check_dataset(self, dataset: TabularDataset) -> None:
        """Refuse (:class:`~fedhealth.data.SchemaError`) a dataset that does not fit the recipe's schema."""
        self.data_schema().check(dataset)

    def rounds(self) -> RoundsRecipe[Any]:
        """The recipe as a rounds recipe; :class:`RecipeError` if it is combined another way."""
        if self.recipe.pattern is not CombinationPattern.ROUNDS:
            raise RecipeError(
                f"recipe.name: recipe {self.name!r} is combined as {self.recipe.pattern.value!r}, "
                "not in rounds"
            )
        return cast(RoundsRecipe[Any], self.recipe)

    def collective(self) -> CollectiveRecipe[Any]:
        """The recipe as a collective recipe; :class:`RecipeError` if it is combined another way."""
        if self.recipe.pattern is not CombinationPattern.COLLECTIVE:
            raise RecipeError(
                f"recipe.name: recipe {self.name!r} is combined as {self.recipe.pattern.value!r}, "
                "not as a collective session"
            )
        return cast(CollectiveRecipe[Any], self.recipe)

    def export_result(self, result: Mapping[str, Any]) -> ModelExport:
        """The model in a collective study's result (what ``finish`` returned), as the recipe exports it;
        :class:`RecipeError` for a collective recipe that releases no model (e.g. statistics)."""
        export = getattr(self.collective(), "export", None)
        if not callable(export):
            raise RecipeError(f"recipe {self.name!r} (version {self.version}) releases no model to export")
        return cast(ModelExport, export(self.params, result))

    def session_dp_plan(self) -> DpPlan | None:
        """What one collective session of this study releases about a site's records under the recipe's own
        noise (``capabilities.session_dp``); None for a recipe that declares no such noise."""
        if not self.capabilities.session_dp:
            return None
        return cast(SessionDpRecipe[Any], self.collective()).dp_plan(self.params)

    # --- the rounds pattern, forwarded with the study's params ---------------------------------------------

    def param_specs(self) -> list[TensorSpec]:
        return self.rounds().param_specs(self.params)

    def init(self, seed: int) -> Params:
        return self.rounds().init(self.params, seed)

    def train(
        self,
        model: Params,
        dataset: TabularDataset | None,
        rng: np.random.Generator,
        *,
        record_dp: RecordDp | None = None,
        site_state: Params | None = None,
    ) -> TrainResult:
        if record_dp is not None and not self.capabilities.record_dp:
            # declared, never guessed: a recipe that does not say it runs DP-SGD is never handed it
            raise RecipeError(f"recipe {self.name!r} does not implement record-level DP")
        if not self.capabilities.site_state:
            if site_state is not None:
                raise RecipeError(f"recipe {self.name!r} keeps no state at the site")
            return self.rounds().train(self.params, model, dataset, rng, record_dp=record_dp)
        return self.rounds().train(
            self.params, model, dataset, rng, record_dp=record_dp, site_state=site_state
        )

    def evaluate(self, model: Params, dataset: TabularDataset | None) -> EvalResult | None:
        return self.rounds().evaluate(self.params, model, dataset)

    def dp_problem(self, level: DpLevel) -> str | None:
        """Why this study's recipe cannot run under DP at ``level`` (capability or parameters), or None."""
        if not self.capabilities.supports(level):
            what = "record-level DP (DP-SGD)" if level is DpLevel.RECORD else "site-level DP"
            return f"recipe {self.name!r} (version {self.version}) does not implement {what}"
        return self.rounds().dp_problem(self.params, level)

    def export(self, model: Params) -> ModelExport:
        return self.rounds().export(self.params, model)

    def session_retries(self) -> int:
        """How many times a collective study whose session failed starts a new session (each resuming from
        what the recipe checkpointed at its sites): what the recipe declares with its optional
        ``session_retries(params)``, part of the approved spec; 0 for a recipe combined in rounds or one
        that declares nothing."""
        if self.recipe.pattern is not CombinationPattern.COLLECTIVE:
            return 0
        declared = getattr(self.recipe, "session_retries", None)
        return 0 if declared is None else int(declared(self.params))

    def averaged_tensors(self) -> frozenset[str]:
        """The tensors the server averages plainly under every strategy (statistics of the data, not trained
        parameters): what the recipe declares with its optional ``averaged_tensors(params)``; none when it
        declares nothing."""
        declared = getattr(self.rounds(), "averaged_tensors", None)
        if declared is None:
            return frozenset()
        names = frozenset(declared(self.params))
        unknown = names - {s.name for s in self.param_specs()}
        if unknown:
            raise RecipeError(
                f"recipe {self.name!r} declares averaged tensors it does not have: {sorted(unknown)}"
            )
        return names

    def control_variate_tensors(self) -> frozenset[str]:
        """The tensors holding SCAFFOLD's server control variate c, as the recipe declares them with its
        optional ``control_variate_tensors(params)`` (none when it declares nothing)."""
        declared = getattr(self.rounds(), "control_variate_tensors", None)
        if declared is None:
            return frozenset()
        names = frozenset(declared(self.params))
        if not names:  # asked of every study (check_recipe): no model is built for the answer
            return names
        unknown = names - {s.name for s in self.param_specs()}
        if unknown:
            raise RecipeError(
                f"recipe {self.name!r} declares control variates it does not have: {sorted(unknown)}"
            )
        if not self.capabilities.site_state:
            raise RecipeError(
                f"recipe {self.name!r} declares control variates but keeps no site state for the sites' own"
            )
        return names


def _is_recipe(obj: object) -> str | None:
    """Why ``obj`` is not a recipe, or None: the attributes every recipe declares, with their types."""
    for attr in ("name", "version", "params_model", "pattern", "capabilities", "data_schema"):
        if not hasattr(obj, attr):
            return f"it has no {attr!r}"
    recipe = cast(Recipe[Any], obj)
    if not isinstance(recipe.name, str) or not _NAME.match(recipe.name):
        return f"its name {recipe.name!r} is not a lowercase name ([a-z0-9][a-z0-9_.-]*, at most 63)"
    if not isinstance(recipe.version, str) or not _VERSION.match(recipe.version):
        return f"its version {recipe.version!r} is not a version string ([0-9A-Za-z][0-9A-Za-z._+-]*)"
    if not (isinstance(recipe.params_model, type) and issubclass(recipe.params_model, BaseModel)):
        return "its params_model is not a pydantic model class"
    if not isinstance(recipe.pattern, CombinationPattern):
        return "its pattern is not a CombinationPattern"
    if not isinstance(recipe.capabilities, RecipeCapabilities):
        return "its capabilities are not RecipeCapabilities"
    needed = (
        ("param_specs", "init", "train", "evaluate", "dp_problem", "export")
        if recipe.pattern is CombinationPattern.ROUNDS
        else ("run_site", "finish")
    )
    if recipe.capabilities.session_dp:
        needed = (*needed, "dp_plan")
    missing = [m for m in needed if not callable(getattr(recipe, m, None))]
    if missing:
        return f"a {recipe.pattern.value} recipe needs {', '.join(missing)}"
    return None


def _params_problems(exc: ValidationError) -> list[str]:
    """pydantic's errors as ``recipe.params.<field>: <rule>`` lines."""
    out = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        rule = error["msg"].removeprefix("Value error, ")  # a validator's own sentence, untagged
        out.append(f"recipe.params{'.' + where if where else ''}: {rule}")
    return out


def _canonical(params: Mapping[str, Any]) -> str:
    try:
        return json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RecipeParamsError([f"recipe.params: not plain JSON ({exc})"]) from exc


class RecipeRegistry:
    """Recipes by (name, version): the ones given, and those of the entry points given (loaded on first use
    of their name). :meth:`from_entry_points` builds the registry of the installed distributions."""

    def __init__(
        self,
        recipes: Iterable[Recipe[Any]] = (),
        *,
        entry_points: Iterable[importlib.metadata.EntryPoint] = (),
    ) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[importlib.metadata.EntryPoint]] = {}
        self._loaded: dict[str, dict[str, Recipe[Any]]] = {}
        self._failed: dict[str, str] = {}
        self._clashes: set[tuple[str, str]] = set()  # (name, version) two packages claim: neither runs
        self._resolved: OrderedDict[tuple[str, str, str], ResolvedRecipe] = OrderedDict()
        for recipe in recipes:
            problem = _is_recipe(recipe)
            if problem is not None:
                raise RecipeError(f"not a recipe: {problem}")
            self._add(recipe, origin="given")
        seen: set[tuple[str, str]] = set()
        for ep in entry_points:
            if (ep.name, ep.value) in seen:  # one distribution visible twice on the path
                continue
            seen.add((ep.name, ep.value))
            self._pending.setdefault(ep.name.split("@", 1)[0], []).append(ep)

    @classmethod
    def from_entry_points(cls, path: Sequence[str] | None = None) -> RecipeRegistry:
        """The recipes the distributions on ``path`` (default: ``sys.path``) register under
        ``fedhealth.recipes``."""
        if path is None:
            eps: Iterable[importlib.metadata.EntryPoint] = importlib.metadata.entry_points(
                group=RECIPE_ENTRY_POINT_GROUP
            )
        else:
            eps = [
                ep
                for dist in importlib.metadata.distributions(path=list(path))
                for ep in dist.entry_points
                if ep.group == RECIPE_ENTRY_POINT_GROUP
            ]
        return cls(entry_points=eps)

    def _add(self, recipe: Recipe[Any], origin: str) -> None:
        versions = self._loaded.setdefault(recipe.name, {})
        other = versions.get(recipe.version)
        if (recipe.name, recipe.version) in self._clashes or (other is not None and other is not recipe):
            # two packages claim the same recipe: which one ran would depend on install order, so neither
            # does (not the first loaded, nor a third claimant after them)
            versions.pop(recipe.version, None)
            self._clashes.add((recipe.name, recipe.version))
            raise UnknownRecipeError(
                f"recipe.name: recipe {recipe.name!r} version {recipe.version!r} is registered twice "
                f"(again by {origin}); uninstall one of them"
            )
        versions[recipe.version] = recipe

    def _load(self, name: str) -> dict[str, Recipe[Any]]:
        """The versions of ``name``, loading its entry points on first use (under the lock)."""
        for ep in self._pending.pop(name, []):
            dist = ep.dist.name if ep.dist is not None else "an unnamed distribution"
            try:
                obj = ep.load()
            except Exception as exc:  # a plug-in's import may raise anything; it breaks only its own name
                self._failed[name] = (
                    f"recipe.name: the plug-in for recipe {name!r} ({ep.value}, from {dist}) does not load: "
                    f"{type(exc).__name__}: {exc}"
                )
                continue
            problem = _is_recipe(obj)
            if problem is None and ep.name not in (obj.name, f"{obj.name}@{obj.version}"):
                problem = (
                    f"the entry point {ep.name!r} is not its name {obj.name!r} (or {obj.name}@{obj.version})"
                )
            if problem is not None:
                self._failed[name] = (
                    f"recipe.name: {ep.value} (from {dist}) is not a usable recipe: {problem}"
                )
                continue
            try:
                self._add(obj, origin=dist)
            except UnknownRecipeError as exc:
                self._failed[name] = str(exc)
        return self._loaded.get(name, {})

    def names(self) -> list[str]:
        """Every recipe name known, loaded or not (sorted)."""
        with self._lock:
            return sorted({*self._loaded, *self._pending})

    def versions(self, name: str) -> list[str]:
        """The versions of ``name`` that load (sorted)."""
        with self._lock:
            return sorted(self._load(name))

    def get(self, name: str, version: str) -> Recipe[Any]:
        """The recipe ``name`` at ``version``; :class:`UnknownRecipeError` naming what is installed."""
        with self._lock:
            versions = self._load(name)
            failed = self._failed.get(name)
            known = sorted({*self._loaded, *self._pending})
        recipe = versions.get(version)
        if recipe is not None:
            return recipe
        if failed is not None:
            raise UnknownRecipeError(failed)
        if not versions:
            have = ", ".join(n for n in known if n != name) or "none"
            raise UnknownRecipeError(f"recipe.name: no recipe {name!r} is installed here (installed: {have})")
        raise UnknownRecipeError(
            f"recipe.version: recipe {name!r} has no version {version!r} here "
            f"(installed: {', '.join(sorted(versions))})"
        )

    def resolve(self, name: str, version: str, params: Mapping[str, Any]) -> ResolvedRecipe:
        """The recipe with ``params`` validated by its parameter model; :class:`RecipeError` with "field:
        rule" lines otherwise. Cached: the same study asks for every task and upload."""
        key = (name, version, _canonical(params))
        with self._lock:
            hit = self._resolved.get(key)
            if hit is not None:
                self._resolved.move_to_end(key)
                return hit
        recipe = self.get(name, version)
        try:
            validated = recipe.params_model.model_validate(dict(params))
        except ValidationError as exc:
            raise RecipeParamsError(_params_problems(exc)) from exc
        resolved = ResolvedRecipe(recipe=recipe, params=validated)
        with self._lock:
            self._resolved[key] = resolved
            while len(self._resolved) > _RESOLVED_CACHE:
                self._resolved.popitem(last=False)
        return resolved


_default: RecipeRegistry | None = None
_default_lock = threading.Lock()


def default_registry() -> RecipeRegistry:
    """The registry of this process: the installed distributions' ``fedhealth.recipes`` entry points."""
    global _default
    with _default_lock:
        if _default is None:
            _default = RecipeRegistry.from_entry_points()
        return _default


def reload_recipes() -> None:
    """Forget the recipes found so far; the next lookup scans the entry points again (after a plug-in was
    installed, or ``sys.path`` changed, while the process runs)."""
    global _default
    with _default_lock:
        _default = None


def load_recipe(name: str, version: str = "1") -> Recipe[Any]:
    """The installed recipe ``name`` at ``version`` (:class:`UnknownRecipeError` if there is none)."""
    return default_registry().get(name, version)


def resolve_recipe(name: str, version: str, params: Mapping[str, Any]) -> ResolvedRecipe:
    """The installed recipe with ``params`` validated (:class:`RecipeError` otherwise)."""
    return default_registry().resolve(name, version, params)
