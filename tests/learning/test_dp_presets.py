import inspect
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
from fedhealth.learning import _logreg_dp as logreg_dp
from fedhealth.learning._dp_presets import (
    HEART_DISEASE_DP_DELTAS,
    HEART_DISEASE_DP_EPSILONS,
    HEART_DISEASE_DP_PRESETS,
    DpPreset,
    dp_noise_multiplier,
)
from fedhealth.privacy import AccountantKind, DpPlan, epsilon
from fedhealth.protocol import TaskKind
from fedhealth.runtime import task_plan, train_on_site
from fedhealth.sim._privacy_bench import dp_preset_study
from support import study_task

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


def test_each_site_trains_with_exactly_the_release_the_preset_accounts(heart_data_dir, monkeypatch):
    # The services' path, not this file's _run: the study spec the preset becomes, the release each site's
    # ledger reserves for a round (task_plan), and the DP-SGD steps train_on_site then actually runs, seen
    # by recording every call to the sampling and noise mechanisms. Each must be the preset's, at every
    # Fed-Heart-Disease center whatever its size.
    preset = HEART_DISEASE_DP_PRESETS[(1.0, 1e-5)]
    centers = {f"center-{c}": load_heart_disease(c, heart_data_dir, download=False) for c in range(4)}
    assert tuple(d.num_train for d in centers.values()) == HEART_TRAIN_SIZES
    spec = dp_preset_study(
        preset, name="dp-preset", dataset="heart-disease", train_sites=sorted(centers), min_sites=4, seed=0
    )
    calls: list[tuple] = []

    def recording(kind, real, *fields):
        def call(*args, **kwargs):
            bound = inspect.signature(real).bind(*args, **kwargs).arguments
            calls.append((kind, *(bound[f] for f in fields)))
            return real(*args, **kwargs)

        return call

    sample, noisy_sum = logreg_dp.poisson_sample, logreg_dp.noisy_clipped_sum
    monkeypatch.setattr(logreg_dp, "poisson_sample", recording("sample", sample, "sample_rate"))
    noise_fields = ("noise_multiplier", "max_grad_norm")
    monkeypatch.setattr(logreg_dp, "noisy_clipped_sum", recording("noise", noisy_sum, *noise_fields))
    for site, data in centers.items():
        (release,) = task_plan(spec, TaskKind.TRAIN, site).releases
        # the services calibrate the noise themselves: it must land on the preset's recorded value
        assert release.noise_multiplier == pytest.approx(preset.noise_multiplier, rel=2e-3)
        assert (release.sample_rate, release.steps) == (preset.sample_rate, preset.local_steps)
        assert (
            epsilon(DpPlan(releases=(release,) * preset.rounds), delta=preset.delta) <= preset.target_epsilon
        )
        calls.clear()
        model = logreg_init(preset.n_features, 0)
        train_on_site(study_task(spec, 1), site, model, data, reproducible_noise=True)
        step = [("sample", release.sample_rate), ("noise", release.noise_multiplier, preset.max_grad_norm)]
        assert calls == step * release.steps, site


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
