"""The recipe registry: built-ins come from the entry-point group like any plug-in, unknown names and
versions and bad params are clear errors, a broken plug-in breaks only its own name; the logreg and
synthetic recipes compute exactly what their numpy functions compute."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict

from fedhealth.data import SchemaError, TabularDataset, breast_cancer_federation
from fedhealth.learning import (
    LOGREG_RECIPE,
    RECIPE_ENTRY_POINT_GROUP,
    SYNTHETIC_RECIPE,
    CombinationPattern,
    DataSchema,
    DpLevel,
    LocalOptimizer,
    LogRegConfig,
    LogRegParams,
    RecipeCapabilities,
    RecipeError,
    RecipeParamsError,
    RecipeRegistry,
    RecordDp,
    UnknownRecipeError,
    default_registry,
    logreg_evaluate,
    logreg_init,
    logreg_train,
    logreg_train_dp,
    resolve_recipe,
    synthetic_init,
    synthetic_train,
    task_rng,
)


def _ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=RECIPE_ENTRY_POINT_GROUP)


class ToyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = 1


class ToyCollective:
    """A collective recipe that declares everything a collective recipe must have."""

    name = "toy-sum"
    version = "2"
    params_model = ToyParams
    pattern = CombinationPattern.COLLECTIVE
    capabilities = RecipeCapabilities()

    def data_schema(self, params):
        return DataSchema()

    def run_site(self, params, dataset, session, ctx):
        raise NotImplementedError

    def finish(self, params, released):
        return {}


TOY = ToyCollective()


@pytest.fixture(scope="module")
def site() -> TabularDataset:
    return breast_cancer_federation(2, 0)[0]


def test_builtin_recipes_are_entry_points_of_the_fedhealth_distribution():
    eps = {ep.name: ep.value for ep in importlib.metadata.distribution("fedhealth").entry_points}
    assert eps["logreg"] == "fedhealth.learning:LOGREG_RECIPE"
    assert eps["synthetic"] == "fedhealth.learning:SYNTHETIC_RECIPE"
    registry = default_registry()
    assert {"logreg", "synthetic"} <= set(registry.names())
    assert registry.get("logreg", "1") is LOGREG_RECIPE
    assert registry.get("synthetic", "1") is SYNTHETIC_RECIPE


def test_an_unknown_recipe_names_what_is_installed():
    with pytest.raises(UnknownRecipeError, match=r"recipe.name: no recipe 'catboost' .*installed: .*logreg"):
        resolve_recipe("catboost", "1", {})


def test_a_version_the_site_does_not_have_is_refused_with_the_versions_it_has():
    with pytest.raises(
        UnknownRecipeError, match=r"recipe.version: recipe 'logreg' has no version '2'.*: 1\)"
    ):
        resolve_recipe("logreg", "2", {"n_features": 3})


def test_bad_params_give_one_field_rule_line_per_problem():
    with pytest.raises(RecipeParamsError) as err:
        resolve_recipe("logreg", "1", {"n_feature": 3, "learning_rate": -1, "optimizer": "lbfgs"})
    assert set(err.value.problems) == {
        "recipe.params.n_features: Field required",
        "recipe.params.n_feature: Extra inputs are not permitted",
        "recipe.params.learning_rate: Input should be greater than 0",
        "recipe.params.optimizer: Input should be 'sgd' or 'adam'",
    }
    assert isinstance(err.value, RecipeError)
    with pytest.raises(RecipeParamsError, match=r"^recipe.params: feature_names must be unique$"):
        resolve_recipe("logreg", "1", {"n_features": 2, "feature_names": ["age", "age"]})
    with pytest.raises(RecipeParamsError, match="not plain JSON"):
        resolve_recipe("logreg", "1", {"n_features": 2, "l2": float("nan")})


def test_resolving_the_same_params_twice_returns_the_cached_resolution():
    first = resolve_recipe("logreg", "1", {"n_features": 4, "learning_rate": 0.1})
    assert resolve_recipe("logreg", "1", {"learning_rate": 0.1, "n_features": 4}) is first
    assert resolve_recipe("logreg", "1", {"n_features": 4}) is not first


def test_a_plugin_that_fails_to_import_breaks_only_its_own_name():
    registry = RecipeRegistry(
        entry_points=[
            _ep("broken", "fedhealth_no_such_module:RECIPE"),
            _ep("logreg", "fedhealth.learning:LOGREG_RECIPE"),
        ]
    )
    assert registry.names() == ["broken", "logreg"]
    with pytest.raises(UnknownRecipeError, match=r"'broken' .*does not load: ModuleNotFoundError"):
        registry.get("broken", "1")
    assert registry.get("logreg", "1") is LOGREG_RECIPE


def test_an_entry_point_must_carry_its_recipes_name_and_a_recipe():
    registry = RecipeRegistry(
        entry_points=[
            _ep("linear", "fedhealth.learning:LOGREG_RECIPE"),
            _ep("config", "fedhealth.learning:LogRegConfig"),
            _ep("logreg@1", "fedhealth.learning:LOGREG_RECIPE"),
        ]
    )
    with pytest.raises(UnknownRecipeError, match="entry point 'linear' is not its name 'logreg'"):
        registry.get("linear", "1")
    with pytest.raises(UnknownRecipeError, match="not a usable recipe: it has no 'name'"):
        registry.get("config", "1")
    assert registry.get("logreg", "1") is LOGREG_RECIPE  # name@version is the recipe's own name too


def test_two_packages_registering_the_same_recipe_version_is_an_error_for_that_name():
    registry = RecipeRegistry(
        [LOGREG_RECIPE], entry_points=[_ep("synthetic", "fedhealth.learning:SYNTHETIC_RECIPE")]
    )

    class Impostor(type(LOGREG_RECIPE)):  # type: ignore[misc]
        pass

    impostor = Impostor()
    with pytest.raises(UnknownRecipeError, match="registered twice"):
        RecipeRegistry([LOGREG_RECIPE, impostor])
    assert registry.get("synthetic", "1") is SYNTHETIC_RECIPE


def test_a_collective_recipe_has_no_model_rounds():
    registry = RecipeRegistry([TOY])
    resolved = registry.resolve("toy-sum", "2", {"width": 3})
    assert resolved.collective() is TOY
    assert resolved.params == ToyParams(width=3)
    with pytest.raises(RecipeError, match="combined as 'collective', not in rounds"):
        resolved.param_specs()


def test_an_object_without_what_a_rounds_recipe_needs_is_not_registered():
    class Half:
        name, version, params_model = "half", "1", ToyParams
        pattern, capabilities = CombinationPattern.ROUNDS, RecipeCapabilities()

        def data_schema(self, params):
            return DataSchema()

        def init(self, params, seed):
            return {}

    with pytest.raises(RecipeError, match="a rounds recipe needs param_specs, train, evaluate, dp_problem"):
        RecipeRegistry([Half()])


# --- what the built-in recipes compute ---------------------------------------------------------------------


def test_logreg_recipe_trains_exactly_as_logreg_train(site):
    config = LogRegConfig(n_features=30, local_steps=7, learning_rate=0.1, batch_size=8, l2=1e-3)
    resolved = resolve_recipe("logreg", "1", LogRegParams.from_config(config).model_dump(mode="json"))
    model = resolved.init(3)
    for k, v in logreg_init(30, 3).items():
        assert np.array_equal(model[k], v)
    got = resolved.train(model, site, task_rng(3, 1, "a"))
    want = logreg_train(model, site.X_train, site.y_train, config, task_rng(3, 1, "a"))
    assert all(np.array_equal(got.params[k], want.params[k]) for k in want.params)
    assert (got.num_samples, got.train_loss, got.steps) == (want.num_samples, want.train_loss, want.steps)
    evaluation = resolved.evaluate(got.params, site)
    assert evaluation == logreg_evaluate(got.params, site.X_test, site.y_test)


def test_logreg_recipe_runs_dp_sgd_exactly_as_logreg_train_dp_and_reports_no_loss(site):
    resolved = resolve_recipe("logreg", "1", {"n_features": 30, "learning_rate": 0.5, "l2": 0.01})
    model = resolved.init(0)
    dp = RecordDp(noise_multiplier=1.3, max_grad_norm=0.7, sample_rate=0.1, steps=4)
    got = resolved.train(model, site, task_rng(0, 2, "a"), record_dp=dp)
    want, _ = logreg_train_dp(
        model,
        site.X_train,
        site.y_train,
        noise_multiplier=1.3,
        max_grad_norm=0.7,
        sample_rate=0.1,
        steps=4,
        learning_rate=0.5,
        l2=0.01,
        rng=task_rng(0, 2, "a"),
    )
    assert all(np.array_equal(got.params[k], want[k]) for k in want)
    assert (got.num_samples, got.train_loss, got.steps) == (site.num_train, None, 4)


def test_logreg_declares_both_dp_levels_and_refuses_dp_sgd_with_adam_or_fedprox():
    plain = resolve_recipe("logreg", "1", {"n_features": 3})
    assert plain.capabilities == RecipeCapabilities(
        reads_data=True,
        record_dp=True,
        site_dp=True,
        secure_sum=True,
        export_onnx=True,
        federated_scaling=True,
    )
    assert (plain.dp_problem(DpLevel.RECORD), plain.dp_problem(DpLevel.SITE)) == (None, None)
    for params in ({"optimizer": "adam"}, {"proximal_mu": 0.1}):
        resolved = resolve_recipe("logreg", "1", {"n_features": 3, **params})
        assert "plain DP-SGD" in (resolved.dp_problem(DpLevel.RECORD) or "")
        assert resolved.dp_problem(DpLevel.SITE) is None


def test_synthetic_reads_no_data_declares_no_dp_and_is_never_handed_dp_sgd():
    resolved = resolve_recipe("synthetic", "1", {"n_params": 5})
    assert resolved.capabilities == RecipeCapabilities(reads_data=False, secure_sum=True)
    assert "does not implement record-level DP" in (resolved.dp_problem(DpLevel.RECORD) or "")
    assert "does not implement site-level DP" in (resolved.dp_problem(DpLevel.SITE) or "")
    model = resolved.init(9)
    assert np.array_equal(model["weight"], synthetic_init(5, 9)["weight"])
    local = resolved.train(model, None, task_rng(9, 1, "s"))
    assert np.array_equal(
        local.params["weight"], synthetic_train(model, task_rng(9, 1, "s")).params["weight"]
    )
    assert resolved.evaluate(local.params, None) is None
    with pytest.raises(RecipeError, match="does not implement record-level DP"):
        resolved.train(
            model,
            None,
            task_rng(9, 1, "s"),
            record_dp=RecordDp(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=1),
        )


def test_logreg_params_carry_a_preset_config_through_json_unchanged():
    config = LogRegConfig(
        n_features=13,
        local_steps=100,
        learning_rate=1e-3,
        batch_size=4,
        optimizer=LocalOptimizer.ADAM,
        l2=3e-7,
    )
    wire = LogRegParams.from_config(config).model_dump(mode="json")
    assert LogRegParams.model_validate(wire).config() == config


def test_the_data_schema_refuses_a_dataset_of_another_width_or_other_feature_names(site):
    assert DataSchema(n_features=30).problem(site) is None
    with pytest.raises(SchemaError, match="has 30 features; the study's model expects 13"):
        DataSchema(n_features=13).check(site)
    names = tuple(site.feature_names)
    DataSchema(n_features=30, feature_names=names).check(site)
    swapped = (names[1], names[0], *names[2:])
    with pytest.raises(SchemaError, match=f"feature 0 is {names[0]!r}; the study expects {names[1]!r}"):
        DataSchema(feature_names=swapped).check(site)
    resolved = resolve_recipe("logreg", "1", {"n_features": 30, "feature_names": list(swapped)})
    with pytest.raises(SchemaError):
        resolved.check_dataset(site)


def test_logreg_exports_its_tensors_with_recipe_version_and_feature_names(site):
    names = list(site.feature_names)
    resolved = resolve_recipe("logreg", "1", {"n_features": 30, "feature_names": names})
    model = resolved.train(resolved.init(0), site, task_rng(0, 1, "a")).params
    exported = resolved.export(model)
    assert (exported.metadata["recipe"], exported.metadata["version"]) == ("logreg", "1")
    assert exported.metadata["feature_names"] == names
    assert sorted(exported.tensors) == ["bias", "weight"]
    assert all(np.array_equal(exported.tensors[k], model[k]) for k in model)
    assert resolve_recipe("logreg", "1", {"n_features": 30}).export(model).metadata["feature_names"] is None
