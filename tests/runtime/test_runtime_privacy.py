"""The privacy functions the orchestrator and the sites share: spec checks, calibrated noise, where noise is
added, and DP training through ``train_on_site`` against the learning and privacy packages directly."""

from __future__ import annotations

import numpy as np
import pytest

from fedhealth.core import InputError
from fedhealth.data import open_dataset
from fedhealth.learning import logreg_init, logreg_train_dp, task_rng, weighted_mean
from fedhealth.privacy import DpSgdRelease, GaussianRelease, calibrate_noise, epsilon, snap, snap_grid
from fedhealth.protocol import (
    PrivacySpec,
    SecureAggregationSpec,
    StudySpec,
    TaskKind,
)
from fedhealth.runtime import (
    REPRODUCIBLE_NOISE_ENV,
    aggregate,
    central_noise_on_mean,
    check_privacy,
    noise_multiplier,
    planned_epsilon,
    site_level_epsilon,
    task_plan,
    train_on_site,
)
from fedhealth.runtime._privacy import distributed_clip_room, private_mean, privatize_update
from support import logreg_recipe, study_task, synthetic_recipe

SITES = ["site-a", "site-b", "site-c"]
SITE_KEYS = {s: f"{i:064x}" for i, s in enumerate(SITES)}  # placeholders: nothing here checks them
URI = "builtin://breast-cancer/0?sites=4&seed=0"


def spec_with(privacy: dict | None, **study: object) -> StudySpec:
    fields: dict[str, object] = {
        "name": "s",
        "dataset": "bc",
        "recipe": logreg_recipe(30, learning_rate=0.5),
        "rounds": 4,
        "train_sites": SITES,
        "min_sites": 2,
        "seed": 11,
    }
    fields.update(study)
    if privacy is not None:
        fields["privacy"] = PrivacySpec.model_validate(
            {"delta": 1e-5, "max_grad_norm": 1.0, "sample_rate": 0.1, "steps_per_round": 5, **privacy}
        )
    return StudySpec.model_validate(fields)


# --- checks -----------------------------------------------------------------------------------------------

SITE_SA = SecureAggregationSpec(site_keys=SITE_KEYS, update_clip=100.0)


@pytest.mark.parametrize(
    ("privacy", "study", "message"),
    [
        ({"target_epsilon": 1.0, "noise_multiplier": 1.0}, {}, "not both"),
        ({"target_epsilon": 1.0}, {"recipe": synthetic_recipe(3)}, "does not implement record-level DP"),
        (
            {"target_epsilon": 1.0},
            {"recipe": logreg_recipe(30, optimizer="adam")},
            "sgd",
        ),
        ({"target_epsilon": 1.0}, {"recipe": logreg_recipe(30, proximal_mu=0.1)}, "proximal_mu 0"),
        ({"target_epsilon": 1e-9}, {}, "no noise multiplier up to"),
        ({"target_epsilon": 1.0, "site_sample_rates": {"elsewhere": 0.2}}, {}, "do not train"),
        (
            {"target_epsilon": 1.0, "sample_rate": None, "site_sample_rates": {"site-a": 0.2}},
            {},
            "no sampling rate for site-b, site-c",
        ),
        ({"mode": "site-central", "noise_multiplier": 0.0}, {}, "positive noise_multiplier"),
        (
            {"mode": "site-central", "noise_multiplier": 1.0},
            {"recipe": synthetic_recipe(3)},
            r"recipe 'synthetic' \(version 1\) does not implement site-level DP",
        ),
        (
            {"mode": "site-central", "noise_multiplier": 1.0, "site_sample_rates": {"site-a": 0.2}},
            {},
            "record",
        ),
        ({"mode": "site-distributed", "noise_multiplier": 1.0}, {}, "without secure aggregation"),
        (
            {"mode": "site-distributed", "noise_multiplier": 1.0},
            {"secure_aggregation": SecureAggregationSpec(site_keys=SITE_KEYS, update_clip=2.0)},
            "could clip the noisy updates",
        ),
    ],
)
def test_a_privacy_spec_the_services_cannot_honour_is_refused_with_its_reason(privacy, study, message):
    with pytest.raises(InputError, match=message):
        check_privacy(spec_with(privacy, **study))


def test_valid_specs_pass_the_check():
    check_privacy(spec_with(None))
    check_privacy(spec_with({"target_epsilon": 1.0}))
    check_privacy(spec_with({"noise_multiplier": 0.0}))  # DP-SGD without noise: a baseline, epsilon infinite
    check_privacy(spec_with({"mode": "site-central", "target_epsilon": 2.0}))
    # the share of a site is sigma C / sqrt(fewest contributors); the codec needs room for C plus the
    # standard deviations that keep every noisy value of the study unclipped but for 1 % of delta
    spec = spec_with({"mode": "site-distributed", "noise_multiplier": 1.0}, secure_aggregation=SITE_SA)
    room, stds = distributed_clip_room(spec)
    assert room == pytest.approx(1.0 + stds * 1.0 / np.sqrt(2))
    sa = SecureAggregationSpec(site_keys=SITE_KEYS, update_clip=room * 1.0001)
    check_privacy(spec_with({"mode": "site-distributed", "noise_multiplier": 1.0}, secure_aggregation=sa))


# --- noise and plans --------------------------------------------------------------------------------------


def test_record_noise_is_calibrated_for_the_whole_study_at_each_sites_own_rate():
    spec = spec_with({"target_epsilon": 2.0, "site_sample_rates": {"site-a": 0.3}})
    assert noise_multiplier(spec, "site-a") == calibrate_noise(2.0, 1e-5, 0.3, 5 * 4)
    assert noise_multiplier(spec, "site-b") == calibrate_noise(2.0, 1e-5, 0.1, 5 * 4)
    for site in SITES:
        assert planned_epsilon(spec, site) <= 2.0
        [release] = task_plan(spec, TaskKind.TRAIN, site).releases
        assert release == DpSgdRelease(
            noise_multiplier=noise_multiplier(spec, site), sample_rate=release.sample_rate, steps=5
        )
    assert task_plan(spec, TaskKind.EVALUATE, "site-a").is_empty


def test_site_noise_is_calibrated_so_that_each_sites_patients_are_charged_the_target():
    spec = spec_with({"mode": "site-central", "target_epsilon": 2.0})
    sigma = noise_multiplier(spec)
    # a patient moves the clipped update by up to twice the clip: the ledger charges sigma / 2 per round
    assert sigma == 2 * calibrate_noise(2.0, 1e-5, 1.0, 4)
    assert task_plan(spec, TaskKind.TRAIN, "site-a").releases == (
        GaussianRelease(noise_multiplier=sigma / 2),
    )
    assert planned_epsilon(spec, "site-a") <= 2.0
    assert site_level_epsilon(spec) == epsilon(GaussianRelease(noise_multiplier=sigma, count=4), delta=1e-5)
    assert site_level_epsilon(spec) < planned_epsilon(spec, "site-a")


# --- where the noise goes ---------------------------------------------------------------------------------


def test_site_central_mean_is_the_unweighted_mean_of_reclipped_updates_plus_noise_on_the_sum():
    spec = spec_with({"mode": "site-central", "noise_multiplier": 0.5, "max_grad_norm": 2.0})
    updates = [
        (10, {"w": np.array([3.0, 4.0], np.float32)}),  # norm 5: clipped to 2
        (1000, {"w": np.array([0.0, 1.0], np.float32)}),  # within the clip; its weight does not count
    ]
    got = private_mean(spec, updates, np.random.default_rng(7))
    noise = np.random.default_rng(7).normal(0.0, 0.5 * 2.0, size=2)
    # the noisy sum is snapped to a grid of 1/8 of the noise's std (the floating-point mitigation)
    expected = snap(np.array([1.2, 1.6]) + np.array([0.0, 1.0]) + noise, 0.5 * 2.0) / 2
    assert snap_grid(0.5 * 2.0) == 0.125
    np.testing.assert_allclose(got["w"], expected, rtol=1e-6)


def test_site_distributed_adds_the_quorum_share_of_the_noise_at_the_site_and_none_at_the_orchestrator():
    sa = SecureAggregationSpec(site_keys=SITE_KEYS, update_clip=100.0)
    spec = spec_with(
        {"mode": "site-distributed", "noise_multiplier": 2.0}, secure_aggregation=sa, min_sites=2
    )
    delta = {"w": np.full(20_000, 0.01, np.float32)}  # norm sqrt(2) > clip 1
    private = privatize_update(spec, delta, np.random.default_rng(3))
    share = private["w"] - delta["w"] / np.sqrt(2.0)
    # the share's standard deviation is sigma C / sqrt(min_sites) = 2 / sqrt(2)
    assert np.std(share) == pytest.approx(2.0 / np.sqrt(2.0), rel=0.02)
    assert private["w"].dtype == np.float32
    # the orchestrator sums the noisy updates untouched (no clip: it would cut the noise) and adds none
    noisy = [(1, {"w": np.full(3, 5.0)}), (1, {"w": np.zeros(3)})]
    np.testing.assert_array_equal(private_mean(spec, noisy, np.random.default_rng(0))["w"], np.full(3, 2.5))


def test_without_privacy_aggregation_is_the_sample_weighted_mean_bit_for_bit():
    params = {"w": np.zeros(3, np.float32)}
    updates = [
        (3, {"w": np.array([1.0, 2.0, 3.0], np.float32)}),
        (5, {"w": np.array([0.5, 0.0, 1.0], np.float32)}),
    ]
    spec = spec_with(None)
    new, _ = aggregate(spec.strategy, params, updates, {}, spec=spec)
    np.testing.assert_array_equal(new["w"], weighted_mean(updates)["w"].astype(np.float32))


# --- training ----------------------------------------------------------------------------------------------


def test_record_mode_trains_with_dp_sgd_from_the_task_generator_when_noise_is_reproducible():
    spec = spec_with({"noise_multiplier": 1.3})
    data = open_dataset(URI)
    params = logreg_init(30, 0)
    outcome = train_on_site(study_task(spec, round=2), "site-a", params, data, reproducible_noise=True)
    local, _ = logreg_train_dp(
        params,
        data.X_train,
        data.y_train,
        noise_multiplier=1.3,
        max_grad_norm=1.0,
        sample_rate=0.1,
        steps=5,
        learning_rate=0.5,
        rng=task_rng(11, 2, "site-a"),
    )
    for k in params:
        np.testing.assert_array_equal(outcome.delta[k], local[k] - params[k])
    assert outcome.metrics.num_samples == data.num_train
    assert outcome.metrics.train_loss is None  # computed from the records without noise: never reported
    assert outcome.metrics.accuracy is not None


def test_dp_noise_comes_from_a_secure_generator_unless_the_site_asks_for_reproducible_noise(monkeypatch):
    spec = spec_with({"noise_multiplier": 1.3})
    data = open_dataset(URI)
    params = logreg_init(30, 0)
    monkeypatch.delenv(REPRODUCIBLE_NOISE_ENV, raising=False)
    first = train_on_site(study_task(spec), "site-a", params, data).delta["weight"]
    second = train_on_site(study_task(spec), "site-a", params, data).delta["weight"]
    assert not np.array_equal(first, second)  # the study seed does not determine the noise
    monkeypatch.setenv(REPRODUCIBLE_NOISE_ENV, "1")
    again = train_on_site(study_task(spec), "site-a", params, data).delta["weight"]
    once_more = train_on_site(study_task(spec), "site-a", params, data).delta["weight"]
    np.testing.assert_array_equal(again, once_more)


def test_site_mode_training_reports_only_the_record_count_and_sends_a_clipped_update():
    spec = spec_with({"mode": "site-central", "noise_multiplier": 1.0, "max_grad_norm": 0.01})
    outcome = train_on_site(study_task(spec), "site-a", logreg_init(30, 0), open_dataset(URI))
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in outcome.delta.values()))
    assert norm <= 0.01 * (1 + 1e-6)
    m = outcome.metrics
    assert m.num_samples > 0
    assert (m.train_loss, m.accuracy, m.auc, m.eval_loss) == (None, None, None, None)


def test_a_sites_noise_share_does_not_depend_on_the_order_its_tensors_arrived_in():
    sa = SecureAggregationSpec(site_keys=SITE_KEYS, update_clip=100.0)
    spec = spec_with({"mode": "site-distributed", "noise_multiplier": 2.0}, secure_aggregation=sa)
    delta = {"weight": np.full(5, 0.01, np.float32), "bias": np.full(1, 0.02, np.float32)}
    forward = privatize_update(spec, delta, np.random.default_rng(5))
    backward = privatize_update(spec, dict(reversed(delta.items())), np.random.default_rng(5))
    for k in delta:
        np.testing.assert_array_equal(forward[k], backward[k])


def test_central_noise_under_secure_aggregation_has_the_central_standard_deviation():
    spec = spec_with(
        {"mode": "site-central", "noise_multiplier": 2.0, "max_grad_norm": 0.5}, secure_aggregation=SITE_SA
    )
    check_privacy(spec)  # site-central with secure aggregation: the orchestrator noises the decoded sum
    contributors, size = 4, 20_000
    mean = {"weight": np.full(size, 0.25, np.float32)}
    noisy = central_noise_on_mean(spec, mean, contributors, np.random.default_rng(1))
    # N(0, (sigma * C)^2) on the sum, so (sigma * C / n) on the mean
    assert np.std(noisy["weight"] - 0.25) == pytest.approx(2.0 * 0.5 / contributors, rel=0.03)
    assert abs(float(np.mean(noisy["weight"])) - 0.25) < 0.01
