"""Calibration never overshoots its target and is the smallest noise to within its tolerance."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhealth.privacy import (
    DEFAULT_REL_TOL,
    MIN_NOISE_MULTIPLIER,
    AccountantKind,
    CalibrationError,
    DpParameterError,
    DpSgdRelease,
    calibrate_noise,
    epsilon,
    gaussian_dp_epsilon,
    gaussian_mu,
)


def eps_at(sigma: float, q: float, steps: int, delta: float, accountant: AccountantKind) -> float:
    return epsilon(
        DpSgdRelease(noise_multiplier=sigma, sample_rate=q, steps=steps), delta=delta, accountant=accountant
    )


def assert_calibrated(target: float, delta: float, q: float, steps: int, accountant: AccountantKind) -> None:
    sigma = calibrate_noise(target, delta, q, steps, accountant)
    assert eps_at(sigma, q, steps, delta, accountant) <= target
    smaller = sigma / (1 + 2 * DEFAULT_REL_TOL)
    if smaller >= MIN_NOISE_MULTIPLIER:
        assert eps_at(smaller, q, steps, delta, accountant) > target


targets = st.floats(0.3, 10.0)
deltas = st.sampled_from([1e-7, 1e-6, 1e-5, 1e-3])
# RDP's fractional orders converge slowly for large q (dp-accounting's series runs to 1000 terms there).
rates = st.one_of(st.floats(1e-3, 0.1), st.just(1.0))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=targets, delta=deltas, q=rates, steps=st.integers(1, 3000))
def test_rdp_calibration_never_overshoots_and_is_smallest(target, delta, q, steps):
    assert_calibrated(target, delta, q, steps, AccountantKind.RDP)


# PLD accounting costs 0.1-0.5 s a call: few examples, short runs.
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.floats(0.5, 8.0), delta=deltas, q=st.floats(0.005, 0.2), steps=st.integers(10, 300))
def test_pld_calibration_never_overshoots_and_is_smallest(target, delta, q, steps):
    assert_calibrated(target, delta, q, steps, AccountantKind.PLD)


@pytest.mark.parametrize(("target", "count"), [(1.0, 1), (4.377178, 1), (2.0, 50)])
def test_calibrating_plain_gaussian_matches_the_closed_form(target, count):
    # q = 1 is the Gaussian mechanism: the exact sigma solves gaussian_dp_epsilon(sqrt(T) / sigma) = target.
    delta = 1e-5
    sigma = calibrate_noise(target, delta, 1.0, count)
    assert gaussian_dp_epsilon(gaussian_mu(sigma, count), delta) <= target * (1 + 1e-5)
    lower = sigma / (1 + 2 * DEFAULT_REL_TOL)
    assert gaussian_dp_epsilon(gaussian_mu(lower, count), delta) > target
    if count == 1 and target == 4.377178:
        assert sigma == pytest.approx(1.0, rel=2 * DEFAULT_REL_TOL)


def test_loose_target_returns_the_noise_floor():
    # One step at the floor costs about epsilon 290 (RDP): a target of 1000 needs no more noise than that.
    assert eps_at(MIN_NOISE_MULTIPLIER, 0.5, 1, 1e-5, AccountantKind.RDP) <= 1000
    assert calibrate_noise(1000.0, 1e-5, 0.5, 1, AccountantKind.RDP) == MIN_NOISE_MULTIPLIER


def test_unreachable_target_is_refused():
    with pytest.raises(CalibrationError, match="no noise multiplier"):
        calibrate_noise(1e-6, 1e-5, 1.0, 100, AccountantKind.RDP)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.0, 1e-5, 0.01, 100), "target epsilon"),
        ((-1.0, 1e-5, 0.01, 100), "target epsilon"),
        ((math.inf, 1e-5, 0.01, 100), "target epsilon"),
        ((math.nan, 1e-5, 0.01, 100), "target epsilon"),
        ((1.0, 0.0, 0.01, 100), "delta"),
        ((1.0, 1.0, 0.01, 100), "delta"),
        ((1.0, 1e-5, 0.0, 100), "sample rate"),
        ((1.0, 1e-5, 1.5, 100), "sample rate"),
        ((1.0, 1e-5, 0.01, 0), "steps"),
    ],
)
def test_invalid_calibration_inputs_are_refused(args, message):
    with pytest.raises(DpParameterError, match=message):
        calibrate_noise(*args)


def test_invalid_tolerance_is_refused():
    with pytest.raises(DpParameterError, match="tolerance"):
        calibrate_noise(1.0, 1e-5, 0.01, 100, rel_tol=0.0)
