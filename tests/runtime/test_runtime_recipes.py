"""The study's recipe as the services see it: the wire form {name, version, params}, the spec hash over all
three, and what check_recipe refuses before a study is stored or a site reads data."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fedhealth.governance import spec_hash
from fedhealth.learning import (
    LOGREG_RECIPE,
    SYNTHETIC_RECIPE,
    CombinationPattern,
    DataSchema,
    LogRegParams,
    RecipeCapabilities,
    RecipeError,
    RecipeRegistry,
    SyntheticRecipe,
)
from fedhealth.protocol import RecipeSpec, SecureAggregationSpec, StudySpec
from fedhealth.runtime import check_recipe, param_specs, recipe_spec
from support import logreg_recipe, synthetic_recipe

SITES = ["site-a", "site-b"]


class Session:
    """A collective recipe (the pattern collective sessions will run)."""

    name, version = "session-sum", "1"
    params_model = LogRegParams
    pattern = CombinationPattern.COLLECTIVE
    capabilities = RecipeCapabilities()

    def data_schema(self, params):
        return DataSchema()

    def run_site(self, params, dataset, session, ctx):
        raise NotImplementedError

    def finish(self, params, released):
        return {}


class Unsummable(SyntheticRecipe):
    """A rounds recipe whose updates cannot travel in a secure sum."""

    name = "unsummable"
    capabilities = RecipeCapabilities(reads_data=False, secure_sum=False)


@pytest.fixture
def registry(monkeypatch):
    registry = RecipeRegistry([LOGREG_RECIPE, SYNTHETIC_RECIPE, Session(), Unsummable()])
    monkeypatch.setattr("fedhealth.learning._registry._default", registry)
    return registry


def spec(recipe: RecipeSpec, **fields: object) -> StudySpec:
    return StudySpec(name="s", dataset="d", recipe=recipe, rounds=1, train_sites=SITES, **fields)


def test_the_wire_form_names_a_recipe_its_version_and_params_and_the_spec_hash_covers_each():
    base = spec(logreg_recipe(30))
    assert base.recipe.name == "logreg"
    assert base.recipe.version == "1"
    assert base.recipe.params["n_features"] == 30
    digest = spec_hash(base.model_dump(mode="json"))
    changed = [
        base.recipe.model_copy(update={"version": "2"}),
        base.recipe.model_copy(update={"params": {**base.recipe.params, "learning_rate": 0.06}}),
        base.recipe.model_copy(update={"name": "logreg2"}),
    ]
    for recipe in changed:
        assert spec_hash(spec(recipe).model_dump(mode="json")) != digest


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "LogReg"}, "pattern"),
        ({"name": "logreg", "version": "1 beta"}, "pattern"),
        ({"name": "logreg", "params": {"l2": float("nan")}}, "finite"),
        ({"name": "logreg", "params": {"nested": [1, {"x": float("-inf")}]}}, "finite"),
        ({"name": "logreg", "n_features": 3}, "Extra inputs"),  # the old flat form is gone
    ],
)
def test_the_wire_form_refuses_bad_names_versions_non_finite_params_and_flat_fields(fields, message):
    with pytest.raises(ValidationError, match=message):
        RecipeSpec.model_validate(fields)


def test_recipe_spec_writes_every_param_of_a_params_model_explicitly():
    wire = recipe_spec(LOGREG_RECIPE, LogRegParams(n_features=4))
    assert (wire.name, wire.version) == ("logreg", "1")
    assert set(wire.params) == set(LogRegParams.model_fields)
    assert LogRegParams.model_validate(wire.params) == LogRegParams(n_features=4)
    assert [s.name for s in param_specs(wire)] == ["bias", "weight"]


def test_check_recipe_accepts_the_builtins_and_refuses_what_it_cannot_run(registry):
    assert check_recipe(spec(logreg_recipe(30))).recipe is LOGREG_RECIPE
    assert check_recipe(spec(synthetic_recipe(8))).recipe is SYNTHETIC_RECIPE
    with pytest.raises(RecipeError, match=r"recipe.params.n_features: Input should be greater than or equal"):
        check_recipe(spec(RecipeSpec(name="logreg", params={"n_features": 0})))


def test_a_collective_recipe_runs_only_a_session_its_spec_can_hold(registry):
    session = RecipeSpec(name="session-sum", params={"n_features": 3})
    with pytest.raises(RecipeError, match=r"runs a collective session: .*site_keys"):
        check_recipe(spec(session))  # no keys to bind the participants to
    three = [*SITES, "site-c"]
    secure = SecureAggregationSpec(site_keys={s: f"{i:064x}" for i, s in enumerate(three)})
    with pytest.raises(RecipeError, match="at least 3 sites"):
        check_recipe(
            spec(
                session,
                secure_aggregation=secure.model_copy(
                    update={"site_keys": {s: k for s, k in secure.site_keys.items() if s in SITES}}
                ),
            )
        )
    held = StudySpec(
        name="s", dataset="d", recipe=session, rounds=1, train_sites=three, secure_aggregation=secure
    )
    assert check_recipe(held).name == "session-sum"


def test_secure_aggregation_is_refused_for_a_recipe_that_does_not_declare_secure_sum(registry):
    secure = SecureAggregationSpec(site_keys={s: f"{i:064x}" for i, s in enumerate(SITES)})
    with pytest.raises(
        RecipeError, match="secure_aggregation: recipe 'unsummable' does not declare secure_sum"
    ):
        check_recipe(spec(RecipeSpec(name="unsummable", params={"n_params": 4}), secure_aggregation=secure))
    assert check_recipe(spec(RecipeSpec(name="unsummable", params={"n_params": 4}))).name == "unsummable"
    assert check_recipe(spec(synthetic_recipe(4), secure_aggregation=secure)).name == "synthetic"
