"""MONAI's networks in the torch recipe's architecture registry (the imaging extra pins monai): a federated
round runs on 28x28 grey images, the model exports without its training state, and sizes a network cannot
take are refused up front."""

from __future__ import annotations

import numpy as np
import pytest
from imaging_files import square_images

from fedhealth.learning import RecipeError, resolve_recipe, torch_predict_proba
from fedhealth.protocol import RecipeSpec, StrategySpec, StudySpec
from fedhealth.runtime import run_study_in_memory, study_recipe


def test_the_pinned_monai_is_installed_beside_the_pinned_torch():
    import monai
    import torch

    assert monai.__version__.startswith("1.6.")
    assert torch.__version__.startswith("2.13.0")  # monai pulled no other torch


def test_a_federated_round_of_monai_densenet_runs_on_28x28_images_and_the_model_exports():
    # 9 training images at batch 8: each site's last minibatch is one image, which BatchNorm must take
    sites = {
        "a": square_images(12, side=28, seed=1, name="a"),
        "b": square_images(12, side=28, seed=2, name="b"),
    }
    params = {"architecture": "monai-densenet", "input_size": 28, "batch_size": 8}
    spec = StudySpec(
        name="monai",
        dataset="squares",
        recipe=RecipeSpec(name="torch", params=params),
        strategy=StrategySpec(name="fedavg"),
        rounds=1,
        train_sites=sorted(sites),
        seed=2,
    )
    resolved = study_recipe(spec.recipe)
    start = resolved.init(spec.seed)
    assert any(k.startswith("features.denseblock1.") for k in start)
    assert 320_000 < sum(v.size for v in start.values()) < 340_000
    assert resolved.averaged_tensors()  # MONAI's BatchNorm statistics are averaged plainly too
    result = run_study_in_memory(spec, sites)
    assert set(result.params) == set(start)
    assert any(not np.array_equal(result.params[k], start[k]) for k in start)  # the round trained
    assert all(m.num_eval_samples > 0 and m.auc is not None for m in result.evaluation.values())
    export = resolved.export(result.params)
    assert export.metadata["architecture"] == "monai-densenet"
    assert export.metadata["input_shape"] == [1, 28, 28]
    assert set(export.tensors) == {s.name for s in resolved.param_specs()}
    images = sites["a"].X_test
    proba = torch_predict_proba(resolved.params, export.tensors, images)
    assert proba.shape == (images.shape[0],)
    assert np.all((proba >= 0) & (proba <= 1))


def test_monai_networks_refuse_images_their_downsampling_cannot_take():
    with pytest.raises(RecipeError, match="'monai-densenet' needs input_size of at least 16"):
        resolve_recipe("torch", "1", {"architecture": "monai-densenet", "input_size": 12})
    with pytest.raises(RecipeError, match="'monai-densenet121' needs input_size of at least 64"):
        resolve_recipe("torch", "1", {"architecture": "monai-densenet121", "input_size": 32})
    # DenseNet-121 as published (about 7 M values) builds for 64x64 grey images, with group norm for DP
    params = {"architecture": "monai-densenet121", "input_size": 64, "norm": "group"}
    big = resolve_recipe("torch", "1", params)
    assert 6_900_000 < sum(int(np.prod(s.shape)) for s in big.param_specs()) < 7_100_000
    assert not big.averaged_tensors()
