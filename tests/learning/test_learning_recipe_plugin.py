"""A recipe from a package outside fedhealth's source tree (tests/plugins/fedhealth_toy) registers through
the entry-point group like the built-ins and runs a study through the same runtime (in memory here; through
the real services in tests/e2e/test_recipe_plugin.py)."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest

from fedhealth.crypto import IdentityKey
from fedhealth.learning import RecipeRegistry, UnknownRecipeError, default_registry, reload_recipes
from fedhealth.protocol import RecipeSpec, SecureAggregationSpec, StudySpec
from fedhealth.runtime import check_recipe, run_collective_in_memory, run_study_in_memory
from support import BREAST_SITES, TOY_COLLECTIVE_RECIPE, TOY_PLUGIN_PATH, TOY_RECIPE, breast_datasets


@pytest.fixture
def toy_installed(monkeypatch):
    """The toy package on sys.path, as a pip install would put it; forgotten again afterwards."""
    monkeypatch.syspath_prepend(str(TOY_PLUGIN_PATH))
    reload_recipes()
    yield
    reload_recipes()


def toy_spec(sites: list[str], rounds: int = 2) -> StudySpec:
    return StudySpec(
        name="toy",
        dataset="breast-cancer",
        recipe=RecipeSpec(name=TOY_RECIPE, params={"n_features": 30}),
        rounds=rounds,
        train_sites=sites,
        seed=3,
    )


def test_the_toy_package_registers_its_recipe_under_the_fedhealth_recipes_group():
    [dist] = importlib.metadata.distributions(path=[str(TOY_PLUGIN_PATH)])
    assert dist.metadata["Name"] == "fedhealth-toy"
    registry = RecipeRegistry.from_entry_points(path=[str(TOY_PLUGIN_PATH)])
    assert registry.names() == [TOY_RECIPE, TOY_COLLECTIVE_RECIPE]


def test_without_the_package_the_recipe_is_unknown_and_with_it_the_default_registry_finds_it(monkeypatch):
    assert TOY_RECIPE not in default_registry().names()
    with pytest.raises(UnknownRecipeError, match="no recipe 'toy-centroid' is installed"):
        check_recipe(toy_spec(["hospital-a"]))
    monkeypatch.syspath_prepend(str(TOY_PLUGIN_PATH))
    reload_recipes()
    try:
        assert {TOY_RECIPE, "logreg", "synthetic"} <= set(default_registry().names())
        assert check_recipe(toy_spec(["hospital-a"])).name == TOY_RECIPE
    finally:
        reload_recipes()


def test_a_study_of_the_toy_recipe_moves_the_centroids_to_the_sites_pooled_class_means(toy_installed):
    sites = sorted(BREAST_SITES)[:3]
    datasets = breast_datasets({s: BREAST_SITES[s] for s in sites})
    result = run_study_in_memory(toy_spec(sites), datasets)
    # one round of FedAvg (server learning rate 1) over local class means weighted by the sites' sizes
    total = sum(d.num_train for d in datasets.values())
    for label in (0, 1):
        pooled = (
            sum(d.num_train * d.X_train[d.y_train == label].mean(axis=0) for d in datasets.values()) / total
        )
        np.testing.assert_allclose(result.params[f"centroid_{label}"], pooled, rtol=1e-5, atol=1e-6)
    for site, metrics in result.evaluation.items():
        assert metrics.accuracy is not None
        assert metrics.accuracy > 0.85, site


def test_the_toy_collective_recipe_releases_exactly_the_pooled_feature_means(toy_installed):
    sites = sorted(BREAST_SITES)
    datasets = breast_datasets(BREAST_SITES)
    spec = StudySpec(
        name="toy-mean",
        dataset="breast-cancer",
        recipe=RecipeSpec(name=TOY_COLLECTIVE_RECIPE, params={"n_features": 30}),
        rounds=1,
        train_sites=sites,
        secure_aggregation=SecureAggregationSpec(
            site_keys={s: IdentityKey.generate().public().fingerprint for s in sites}
        ),
    )
    result = run_collective_in_memory(spec, datasets)
    pooled = np.concatenate([d.X_train for d in datasets.values()]).astype(np.float64)
    assert result["rows"] == pooled.shape[0]
    np.testing.assert_allclose(result["means"], pooled.mean(axis=0), rtol=0, atol=1e-9)
