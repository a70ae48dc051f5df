import math
from dataclasses import replace

import numpy as np
import pytest

from fedhealth.core import ConfigError
from fedhealth.data import HEART_DISEASE_FEATURES, load_heart_disease
from fedhealth.learning import (
    StrategyConfig,
    apply_strategy,
    logreg_evaluate,
    logreg_init,
    logreg_train_dp,
    task_rng,
    weighted_mean,
)
from fedhealth.learning._dp_presets import (
    HEART_DISEASE_DP_DELTAS,
    HEART_DISEASE_DP_EPSILONS,
    HEART_DISEASE_DP_PRESETS,
    DpPreset,
    dp_noise_multiplier,
)
from fedhealth.privacy import AccountantKind, DpPlan, epsilon

# FLamby's Fed-Heart-Disease training-set sizes (Cleveland, Hungary, Switzerland, VA Long Beach)
HEART_TRAIN_SIZES = (199, 172, 30, 85)


def _run(preset: DpPreset, sites, seed: int, noise_multiplier: float):
    """Rounds as the services run them; returns the global model and each site's spent releases."""
    params = logreg_init(preset.n_features, seed)
    state: dict = {}
    spent: dict = {name: [] for name, _ in sites}
    for rnd in range(1, preset.rounds + 1):
        updates = []
        for name, data in sorted(sites, key=lambda s: s[0]):
            local, report = logreg_train_dp(
                params,
                data.X_train,
                data.y_train,
                noise_multiplier=noise_multiplier,
                max_grad_norm=preset.max_grad_norm,
                sample_rate=preset.sample_rate,
                steps=preset.local_steps,
                learning_rate=preset.learning_rate,
                l2=preset.l2,
                rng=task_rng(seed, rnd, name),
            )
            spent[name].append(report.release)
            updates.append((data.num_train, {k: local[k] - params[k] for k in params}))
        params, state = apply_strategy(preset.strategy, params, weighted_mean(updates), state)
    return params, spent


def test_presets_cover_every_target_and_fit_the_dataset():
    assert set(HEART_DISEASE_DP_PRESETS) == {
        (e, d) for e in HEART_DISEASE_DP_EPSILONS for d in HEART_DISEASE_DP_DELTAS
    }
    for (target, delta), preset in HEART_DISEASE_DP_PRESETS.items():
        assert (preset.target_epsilon, preset.delta) == (target, delta)
        assert preset.n_features == len(HEART_DISEASE_FEATURES)
        assert preset.total_steps == preset.rounds * preset.local_steps
        assert preset.accountant is AccountantKind.PLD
        assert preset.description
    with pytest.raises(TypeError):
        HEART_DISEASE_DP_PRESETS[(1.0, 1e-5)] = HEART_DISEASE_DP_PRESETS[(8.0, 1e-5)]  # type: ignore[index]


def test_recorded_noise_keeps_every_site_within_its_target_over_all_rounds():
    # A site's ledger records one release per round; the whole study is their composition.
    for (target, delta), preset in HEART_DISEASE_DP_PRESETS.items():
        plan = DpPlan(releases=tuple(preset.round_release() for _ in range(preset.rounds)))
        assert plan.merged().releases == (preset.study_release(),)
        # one common sample rate: every site, whatever its size, spends this same plan
        spent = epsilon(plan, delta=delta)
        assert spent <= target, (target, delta, preset.noise_multiplier, spent)


def test_recorded_noise_spends_the_budget_rather_than_wasting_it():
    # 1% less noise must overshoot: the noise fits the steps the preset runs (not more, not a stale schedule).
    for (target, delta), preset in HEART_DISEASE_DP_PRESETS.items():
        less = replace(preset, noise_multiplier=0.99 * preset.noise_multiplier)
        assert epsilon(less.study_release(), delta=delta) > target


@pytest.mark.parametrize("delta", HEART_DISEASE_DP_DELTAS)
def test_recorded_noise_is_what_calibration_gives(delta):
    # The two headline presets (epsilon 1); a calibration costs about a second, so not all eight here:
    # the two tests above already pin every recorded value to within 1% of its calibrated boundary.
    preset = HEART_DISEASE_DP_PRESETS[(1.0, delta)]
    fresh = dp_noise_multiplier(preset)
    assert fresh == pytest.approx(preset.noise_multiplier, rel=2e-3)
    assert epsilon(replace(preset, noise_multiplier=fresh).study_release(), delta=delta) <= 1.0


def test_more_privacy_costs_more_noise():
    for delta in HEART_DISEASE_DP_DELTAS:
        sigmas = [HEART_DISEASE_DP_PRESETS[(e, delta)].noise_multiplier for e in HEART_DISEASE_DP_EPSILONS]
        assert sigmas == sorted(sigmas, reverse=True)
    for e in HEART_DISEASE_DP_EPSILONS:
        looser, tighter = (HEART_DISEASE_DP_PRESETS[(e, d)].noise_multiplier for d in (1e-3, 1e-5))
        assert looser < tighter


def test_each_site_reports_exactly_the_release_the_preset_accounts(heart_data_dir):
    preset = HEART_DISEASE_DP_PRESETS[(1.0, 1e-5)]
    centers = [load_heart_disease(c, heart_data_dir, download=False) for c in range(4)]
    assert tuple(d.num_train for d in centers) == HEART_TRAIN_SIZES
    _, spent = _run(preset, [(f"center-{c}", centers[c]) for c in range(4)], 0, preset.noise_multiplier)
    for releases in spent.values():
        assert releases == [preset.round_release()] * preset.rounds
        assert epsilon(DpPlan(releases=tuple(releases)), delta=preset.delta) <= preset.target_epsilon


def test_epsilon_one_presets_reach_seventy_percent_over_seeds_0_to_4(heart_data_dir):
    # The target we set ourselves, above FLamby's 0.702 at a nominal (under-accounted) epsilon 1.
    centers = [load_heart_disease(c, heart_data_dir, download=False) for c in range(4)]
    sites = [(f"center-{c}", centers[c]) for c in range(4)]
    for delta in HEART_DISEASE_DP_DELTAS:
        preset = HEART_DISEASE_DP_PRESETS[(1.0, delta)]
        accuracy = np.mean(
            [
                logreg_evaluate(
                    _run(preset, sites, seed, preset.noise_multiplier)[0], d.X_test, d.y_test
                ).accuracy
                for seed in range(5)
                for d in centers
            ]
        )
        assert accuracy >= 0.70, (delta, accuracy)


def test_a_dp_study_reruns_bit_for_bit_from_its_seed(heart_data_dir):
    preset = HEART_DISEASE_DP_PRESETS[(0.5, 1e-5)]
    sites = [(f"center-{c}", load_heart_disease(c, heart_data_dir, download=False)) for c in range(4)]
    a, _ = _run(preset, sites, 3, preset.noise_multiplier)
    b, _ = _run(preset, sites, 3, preset.noise_multiplier)
    c, _ = _run(preset, sites, 4, preset.noise_multiplier)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert any(a[k].tobytes() != c[k].tobytes() for k in a)


_VALID = HEART_DISEASE_DP_PRESETS[(1.0, 1e-5)]


@pytest.mark.parametrize(
    "change",
    [
        {"target_epsilon": 0.0},
        {"target_epsilon": -1.0},
        {"target_epsilon": math.inf},
        {"target_epsilon": math.nan},
        {"target_epsilon": True},
        {"delta": 0.0},
        {"delta": 1.0},
        {"delta": "1e-5"},
        {"noise_multiplier": 0.0},
        {"noise_multiplier": -1.0},
        {"noise_multiplier": math.inf},
        {"n_features": 0},
        {"n_features": 13.0},
        {"max_grad_norm": 0.0},
        {"max_grad_norm": math.inf},
        {"sample_rate": 0.0},
        {"sample_rate": 1.5},
        {"local_steps": 0},
        {"local_steps": 2.0},
        {"learning_rate": 0.0},
        {"learning_rate": math.nan},
        {"l2": -1e-3},
        {"l2": math.inf},
        {"strategy": "fedavg"},
        {"rounds": 0},
        {"rounds": False},
        {"accountant": "pld"},
    ],
    ids=lambda change: "-".join(f"{k}={v!r}" for k, v in change.items()),
)
def test_a_preset_with_a_bad_setting_is_refused(change):
    with pytest.raises(ConfigError):
        replace(_VALID, **change)


def test_a_valid_variant_is_accepted():
    variant = replace(_VALID, sample_rate=1.0, l2=1e-3, strategy=StrategyConfig(server_learning_rate=0.5))
    assert variant.total_steps == _VALID.total_steps
