"""The privacy benchmark's plumbing (fedhealth.sim._membership_bench): the epsilon it reports is the sites'
ledgers' own, the attacks see every model once as the target, and the command refuses bad options in one
line. The full benchmark is not a test (docs/benchmarks.md)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from fedhealth.cli._bench import benchmark_app
from fedhealth.learning import HEART_DISEASE_DP_PRESETS
from fedhealth.privacy import AccountantKind, MembershipAttack
from fedhealth.runtime import planned_epsilon
from fedhealth.sim._membership_bench import accounted_epsilon, attack_setting
from fedhealth.sim._privacy_bench import dp_preset_study

# RDP: the same ledger path as PLD's, in milliseconds (importing dp-accounting is most of the time)
PRESET = replace(HEART_DISEASE_DP_PRESETS[(1.0, 1e-5)], rounds=2, accountant=AccountantKind.RDP)


def test_the_reported_epsilon_is_what_each_sites_ledger_charged_for_the_whole_study():
    spec = dp_preset_study(PRESET, noise_multiplier=3.0, name="mi", dataset="hd", train_sites=["a", "b"])
    charged = accounted_epsilon(spec)
    assert charged == pytest.approx(planned_epsilon(spec, "a"), rel=1e-9)
    assert charged > 0
    no_noise = dp_preset_study(PRESET, noise_multiplier=0.0, name="mi", dataset="hd", train_sites=["a"])
    assert accounted_epsilon(no_noise) is None


def test_each_model_is_the_target_once_and_members_are_its_training_rows():
    rng = np.random.default_rng(0)
    models, rows = 5, 400
    inside = rng.random((models, rows)) < 0.5
    labels = (rng.random(rows) < 0.5).astype(np.int64)
    # confidence in the true label: each record's own ease (mostly right), +1.5 where the model trained
    # on it, plus run-to-run noise
    conf = rng.normal(loc=1.0, size=rows) + 1.5 * inside + rng.normal(scale=0.3, size=(models, rows))
    figures, test_auc = attack_setting(conf, inside, labels)
    assert figures[MembershipAttack.LIRA_ONLINE].auc > 0.95
    assert figures[MembershipAttack.LOSS].auc > 0.75
    for f in figures.values():
        assert f.members + f.non_members == models * rows
        assert f.members == int(inside.sum())
    # the models' log-odds of label 1 are +conf for label 1 and -conf for label 0: held-out AUC is high
    assert test_auc > 0.7


def test_the_command_refuses_an_unknown_dataset_in_one_line():
    result = CliRunner().invoke(benchmark_app, ["membership", "--dataset", "mnist"])
    assert result.exit_code == 2
    assert "--dataset must be one of heart-disease, breastmnist" in result.output
    assert "Traceback" not in result.output
