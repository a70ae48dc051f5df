"""Clipping, noise, sampling and site-level DP for updates, against their definitions and statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedhealth.privacy import (
    DpParameterError,
    GaussianRelease,
    NoiseMode,
    SiteUpdateDp,
    clip_by_l2_norm,
    clip_per_example,
    gaussian_dp_delta,
    gaussian_dp_epsilon,
    gaussian_noise,
    global_l2_norm,
    noisy_clipped_sum,
    poisson_sample,
    secure_generator,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 20), elements=finite), st.floats(1e-3, 1e3))
def test_clipped_vector_is_within_the_norm_and_keeps_its_direction(vector, max_norm):
    clipped = clip_by_l2_norm(vector, max_norm)
    norm = np.linalg.norm(vector)
    assert np.linalg.norm(clipped) <= max_norm * (1 + 1e-12)
    if norm <= max_norm:
        np.testing.assert_array_equal(clipped, vector)
    else:
        np.testing.assert_allclose(clipped, vector * (max_norm / norm), rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(0, 12), st.integers(1, 6)), elements=finite))
def test_per_example_clipping_clips_each_row_alone(grads):
    clipped, norms = clip_per_example(grads, 1.5)
    np.testing.assert_allclose(norms, np.linalg.norm(grads, axis=1))
    for row, original in zip(clipped, grads, strict=True):
        np.testing.assert_allclose(row, clip_by_l2_norm(original, 1.5), rtol=1e-12, atol=0)


def test_clipping_refuses_bad_input():
    with pytest.raises(DpParameterError):
        clip_by_l2_norm(np.ones(3), 0.0)
    with pytest.raises(DpParameterError):
        clip_by_l2_norm(np.array([1.0, math.nan]), 1.0)
    with pytest.raises(DpParameterError, match="2-D"):
        clip_per_example(np.ones(3), 1.0)
    with pytest.raises(DpParameterError):
        clip_per_example(np.array([[math.inf, 0.0]]), 1.0)


def test_gaussian_noise_has_the_requested_spread():
    rng = np.random.default_rng(7)
    noise = gaussian_noise((200_000,), 2.5, rng)
    # Standard errors: mean 2.5/sqrt(n) = 0.0056, std about 0.004; 5 standard errors either way.
    assert abs(noise.mean()) < 0.03
    assert abs(noise.std() - 2.5) < 0.02
    with pytest.raises(DpParameterError):
        gaussian_noise((3,), -1.0, rng)


def test_poisson_sample_includes_each_index_independently_at_the_rate():
    rng = np.random.default_rng(11)
    n, q, trials = 1000, 0.03, 400
    counts = np.zeros(n)
    sizes = []
    for _ in range(trials):
        batch = poisson_sample(n, q, rng)
        assert np.all(np.diff(batch) > 0)
        counts[batch] += 1
        sizes.append(batch.size)
    # Batch size is Binomial(1000, 0.03): mean 30, sd 5.4; its average over 400 trials has sd 0.27.
    assert abs(np.mean(sizes) - n * q) < 1.5
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.25)
    # Every index is drawn about trials * q = 12 times; none is favoured.
    assert counts.min() >= 1
    assert counts.max() <= 35
    assert poisson_sample(5, 1.0, rng).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DpParameterError):
        poisson_sample(10, 0.0, rng)


def test_secure_generator_is_seeded_afresh_from_the_os():
    a, b = secure_generator().random(4), secure_generator().random(4)
    assert not np.array_equal(a, b)


def test_noisy_clipped_sum_adds_noise_of_sigma_times_clip_even_to_an_empty_batch():
    rng = np.random.default_rng(3)
    draws = np.array(
        [
            noisy_clipped_sum(np.zeros((0, 4)), max_grad_norm=2.0, noise_multiplier=1.5, rng=rng)[0]
            for _ in range(5000)
        ]
    )
    assert draws.shape == (5000, 4)
    assert draws.std() == pytest.approx(3.0, rel=0.03)
    total, clipped = noisy_clipped_sum(
        np.array([[3.0, 4.0], [0.3, 0.4]]), max_grad_norm=1.0, noise_multiplier=0.0, rng=rng
    )
    np.testing.assert_allclose(total, [0.6 + 0.3, 0.8 + 0.4])
    assert clipped == 1


def _update(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "weight": rng.normal(size=(3, 4)).astype(np.float32),
        "bias": rng.normal(size=(4,)).astype(np.float32),
    }


def test_site_update_is_clipped_over_all_tensors_together():
    rng = np.random.default_rng(5)
    dp = SiteUpdateDp(clip_norm=0.5, noise_multiplier=1.0, mode=NoiseMode.CENTRAL)
    update = _update(rng)
    clipped, norm = dp.clip(update)
    assert norm == pytest.approx(
        math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values()))
    )
    assert global_l2_norm(clipped) == pytest.approx(0.5, rel=1e-6)
    assert all(clipped[k].dtype == np.float32 for k in update)
    # Central mode: the site adds nothing; the orchestrator adds the full noise to the sum.
    sent = dp.privatize(update, rng)
    np.testing.assert_array_equal(sent["weight"], clipped["weight"])
    assert dp.site_noise_std == 0.0


def test_distributed_shares_carry_at_least_the_full_noise_down_to_the_quorum():
    sigma, clip, n, quorum = 2.0, 1.0, 10, 7
    dp = SiteUpdateDp(
        clip_norm=clip, noise_multiplier=sigma, mode=NoiseMode.DISTRIBUTED, num_sites=n, min_quorum=quorum
    )
    rng = np.random.default_rng(9)
    zero = {"u": np.zeros(20_000, dtype=np.float64)}
    for survivors in (quorum, n):
        total = sum(dp.privatize(zero, rng)["u"] for _ in range(survivors))
        # Variance of the secure sum: survivors * sigma^2 C^2 / quorum >= sigma^2 C^2.
        assert total.var() == pytest.approx(survivors * (sigma * clip) ** 2 / quorum, rel=0.05)
        assert total.var() >= (sigma * clip) ** 2 * 0.95


def test_central_noise_is_added_once_at_the_orchestrator():
    dp = SiteUpdateDp(clip_norm=0.5, noise_multiplier=3.0, mode=NoiseMode.CENTRAL)
    noisy = dp.central_noise({"u": np.zeros(50_000)}, np.random.default_rng(1))["u"]
    assert noisy.std() == pytest.approx(1.5, rel=0.02)
    distributed = SiteUpdateDp(clip_norm=0.5, noise_multiplier=3.0, mode=NoiseMode.DISTRIBUTED)
    with pytest.raises(DpParameterError, match="central"):
        distributed.central_noise({"u": np.zeros(3)}, np.random.default_rng(1))


def test_record_level_release_accounts_for_sensitivity_two_c():
    dp = SiteUpdateDp(clip_norm=1.0, noise_multiplier=4.0, mode=NoiseMode.CENTRAL)
    assert dp.site_level_release(5) == GaussianRelease(noise_multiplier=4.0, count=5)
    # Two datasets differing in one patient can yield updates pointing opposite ways; once clipped they are
    # 2C apart, so the noise std divided by that distance is the record-level noise multiplier.
    with_patient, _ = dp.clip({"u": np.array([30.0, 0.0])})
    without_patient, _ = dp.clip({"u": np.array([-0.5, 0.0]) * 100})
    distance = float(np.linalg.norm(with_patient["u"] - without_patient["u"]))
    assert distance == pytest.approx(2 * dp.clip_norm)
    assert dp.record_level_release(5) == GaussianRelease(
        noise_multiplier=dp.sum_noise_std / distance, count=5
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_norm": 0.0, "noise_multiplier": 1.0, "mode": NoiseMode.CENTRAL},
        {"clip_norm": 1.0, "noise_multiplier": 0.0, "mode": NoiseMode.CENTRAL},
        {
            "clip_norm": 1.0,
            "noise_multiplier": 1.0,
            "mode": NoiseMode.DISTRIBUTED,
            "num_sites": 3,
            "min_quorum": 4,
        },
        {
            "clip_norm": 1.0,
            "noise_multiplier": 1.0,
            "mode": NoiseMode.DISTRIBUTED,
            "num_sites": 3,
            "min_quorum": 0,
        },
    ],
)
def test_invalid_site_dp_settings_are_refused(kwargs):
    with pytest.raises(DpParameterError):
        SiteUpdateDp(**kwargs)


def test_unknown_noise_mode_is_refused():
    with pytest.raises(ValueError, match="local"):
        SiteUpdateDp(clip_norm=1.0, noise_multiplier=1.0, mode="local")  # type: ignore[arg-type]


@pytest.mark.parametrize("mu", [0.1, 1.0, 3.0, 7.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
def test_gaussian_dp_profile_inverts(mu, delta):
    eps = gaussian_dp_epsilon(mu, delta)
    assert gaussian_dp_delta(mu, eps) <= delta
    if eps > 0:
        assert gaussian_dp_delta(mu, eps * (1 - 1e-9)) > delta


def test_gaussian_dp_delta_at_zero_is_total_variation():
    # At eps = 0, delta is the total variation between N(0,1) and N(mu,1): 2 Phi(mu/2) - 1.
    mu = 1.3
    assert gaussian_dp_delta(mu, 0.0) == pytest.approx(math.erf(mu / 2 / math.sqrt(2)), rel=1e-12)
