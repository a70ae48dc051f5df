"""DP-SGD for images: refused at submission unless the network gives per-example gradients (GroupNorm through
Opacus' validator) and runs plain SGD; accounted by the same PLD accountant and ledger as the tabular
recipes, so the planned epsilon of an imaging study is the one of any study with the same release; and a
DP study runs through the runtime, reproducibly from the seed."""

from __future__ import annotations

import numpy as np
import pytest
from imaging_files import square_images

from fedhealth.core import InputError
from fedhealth.protocol import PrivacySpec, RecipeSpec, StudySpec
from fedhealth.runtime import check_privacy, privacy_summary, run_study_in_memory
from support import logreg_recipe

PRIVACY = PrivacySpec(delta=1e-4, noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=0.2, steps_per_round=3)
DP_CNN = {"input_size": 16, "norm": "group", "optimizer": "sgd", "learning_rate": 0.05, "batch_size": 8}


def study(recipe: RecipeSpec, sites=("a", "b"), rounds: int = 2) -> StudySpec:
    return StudySpec(
        name="imaging-dp",
        dataset="squares",
        recipe=recipe,
        rounds=rounds,
        train_sites=list(sites),
        seed=2,
        privacy=PRIVACY,
    )


def test_a_dp_study_of_a_batchnorm_network_or_adam_is_refused_at_submission():
    with pytest.raises(InputError, match="norm = 'group'"):
        check_privacy(study(RecipeSpec(name="torch", params={**DP_CNN, "norm": "batch"})))
    with pytest.raises(InputError, match="optimizer must be 'sgd'"):
        check_privacy(study(RecipeSpec(name="torch", params={**DP_CNN, "optimizer": "adam"})))
    check_privacy(study(RecipeSpec(name="torch", params=DP_CNN)))  # GroupNorm, plain SGD: accepted


def test_the_planned_epsilon_is_the_accountants_whatever_the_recipe():
    imaging = privacy_summary(study(RecipeSpec(name="torch", params=DP_CNN)))
    tabular = privacy_summary(study(logreg_recipe(256)))
    assert imaging is not None
    assert tabular is not None
    assert imaging["accountant"] == "pld"
    eps = imaging["sites"]["a"]["planned_epsilon"]
    assert eps is not None
    assert 0 < eps < 10
    assert eps == tabular["sites"]["a"]["planned_epsilon"]


def test_a_dp_imaging_study_runs_in_memory_reproducibly():
    sites = {"a": square_images(24, seed=1, name="a"), "b": square_images(24, seed=2, name="b")}
    spec = study(RecipeSpec(name="torch", params=DP_CNN))
    first = run_study_in_memory(spec, sites)
    again = run_study_in_memory(spec, sites)
    assert all(first.params[k].tobytes() == again.params[k].tobytes() for k in first.params)
    assert all(np.isfinite(v).all() for v in first.params.values())
    assert not any("running" in k for k in first.params)  # GroupNorm: no batch statistics at all
