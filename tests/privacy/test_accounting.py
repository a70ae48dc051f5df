"""Accounting reproduces published values (../shared/reference/README.md) and composes honestly.

Sources of the reference values: dp-accounting 0.6.0 (PLD), Opacus 1.x tests (RDP 7.32911117143), the exact
Gaussian-DP privacy profile (Dong, Roth and Su 2019; Balle and Wang 2018).
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special

from fedhealth.privacy import (
    PLD_EPSILON_CEILING,
    AccountantKind,
    DpParameterError,
    DpPlan,
    DpSgdRelease,
    GaussianRelease,
    compose,
    epsilon,
    gaussian_dp_epsilon,
    gaussian_mu,
    make_accountant,
    release_from_json,
)

PLD = AccountantKind.PLD
RDP = AccountantKind.RDP


def agrees_to_4_significant_digits(computed: float, reference: float) -> bool:
    """Within half a unit of the reference's 4th significant digit."""
    unit = 10 ** (math.floor(math.log10(abs(reference))) - 3)
    return abs(computed - reference) <= unit / 2


# (sigma, q, steps, delta, reference) from the reference table
DP_SGD_PLD = [(1.5, 0.04, 2250, 1e-5, 6.7688), (1.0, 0.01, 1000, 1e-5, 1.8282)]
DP_SGD_RDP = [(1.5, 0.04, 2250, 1e-5, 7.32911), (1.0, 0.01, 1000, 1e-5, 2.10137)]
# (sigma, count, delta, exact epsilon) of the Gaussian mechanism composed count times
GAUSSIAN_EXACT = [(1.0, 1, 1e-5, 4.377178), (1.0, 50, 1e-5, 54.3766), (5.0, 50, 1e-5, 6.572970)]


@pytest.mark.parametrize(("sigma", "q", "steps", "delta", "reference"), DP_SGD_PLD)
def test_pld_epsilon_of_dp_sgd_reproduces_dp_accounting_reference(sigma, q, steps, delta, reference):
    release = DpSgdRelease(noise_multiplier=sigma, sample_rate=q, steps=steps)
    eps = epsilon(release, delta=delta)
    assert agrees_to_4_significant_digits(eps, reference)
    # Our coarser discretization is pessimistic: it may only raise epsilon above dp-accounting's default grid.
    assert eps >= reference - 5e-5


@pytest.mark.parametrize(("sigma", "q", "steps", "delta", "reference"), DP_SGD_RDP)
def test_rdp_epsilon_of_dp_sgd_reproduces_opacus_reference(sigma, q, steps, delta, reference):
    release = DpSgdRelease(noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert agrees_to_4_significant_digits(epsilon(release, delta=delta, accountant=RDP), reference)


def test_rdp_is_never_below_opacus_full_precision_value():
    # Opacus's test asserts 7.32911117143. dp-accounting's series for fractional orders sums absolute values
    # where Opacus subtracts the negative terms, so we sit slightly above it: conservative, never below.
    release = DpSgdRelease(noise_multiplier=1.5, sample_rate=0.04, steps=2250)
    eps = epsilon(release, delta=1e-5, accountant=RDP)
    assert 7.32911117143 <= eps < 7.32911117143 * (1 + 1e-4)


def _rdp_integer_order(q: float, sigma: float, alpha: int) -> float:
    """RDP of the Poisson-sampled Gaussian at integer order (Mironov, Talwar and Zhang 2019, Sec. 3.3)."""
    k = np.arange(alpha + 1)
    log_terms = (
        special.gammaln(alpha + 1)
        - special.gammaln(k + 1)
        - special.gammaln(alpha - k + 1)
        + k * math.log(q)
        + (alpha - k) * math.log1p(-q)
        + (k * k - k) / (2 * sigma**2)
    )
    return float(special.logsumexp(log_terms)) / (alpha - 1)


def test_rdp_conversion_is_the_one_opacus_uses():
    # Balle et al. 2020, Thm 21, as in Opacus's get_privacy_spent:
    #   eps = min over orders a of  rdp(a) + log((a-1)/a) - (log(delta) + log(a)) / (a-1)
    sigma, q, steps, delta = 1.0, 0.01, 1000, 1e-5
    orders = list(range(2, 65))
    rdp = np.array([steps * _rdp_integer_order(q, sigma, a) for a in orders])
    a = np.array(orders, dtype=float)
    expected = float(np.min(rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)))
    accountant = make_accountant(RDP, orders=orders)
    release = DpSgdRelease(noise_multiplier=sigma, sample_rate=q, steps=steps)
    accountant.compose(release.to_dp_event())
    assert accountant.get_epsilon(delta) == pytest.approx(expected, rel=1e-9)
    # The default orders add fractional ones: never worse than integers alone.
    assert epsilon(release, delta=delta, accountant=RDP) <= expected + 1e-12


@pytest.mark.parametrize(("sigma", "count", "delta", "exact"), GAUSSIAN_EXACT)
def test_closed_form_gaussian_epsilon_reproduces_table(sigma, count, delta, exact):
    assert agrees_to_4_significant_digits(gaussian_dp_epsilon(gaussian_mu(sigma, count), delta), exact)


@pytest.mark.parametrize(("sigma", "count", "delta", "exact"), GAUSSIAN_EXACT)
def test_pld_of_repeated_gaussian_matches_exact_value_from_above(sigma, count, delta, exact):
    eps = epsilon(GaussianRelease(noise_multiplier=sigma, count=count), delta=delta)
    exact_full = gaussian_dp_epsilon(gaussian_mu(sigma, count), delta)
    assert agrees_to_4_significant_digits(eps, exact)
    assert exact_full <= eps <= exact_full * (1 + 1e-5)


def test_rdp_of_fifty_gaussians_reproduces_reference():
    eps = epsilon(GaussianRelease(noise_multiplier=1.0, count=50), delta=1e-5, accountant=RDP)
    assert agrees_to_4_significant_digits(eps, 57.3017)


def test_plan_builds_the_documented_event_tree():
    plan = DpPlan.of(
        DpSgdRelease(noise_multiplier=1.1, sample_rate=0.02, steps=30),
        GaussianRelease(noise_multiplier=4.0, count=3),
    )
    assert plan.to_dp_event() == dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1)), 30
            ),
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(4.0), 3),
        ]
    )


def test_repeated_rounds_compose_like_one_longer_run():
    round_release = DpSgdRelease(noise_multiplier=1.0, sample_rate=0.01, steps=250)
    four_rounds = DpPlan.of(*[round_release] * 4)
    one_run = DpSgdRelease(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
    assert four_rounds.merged() == DpPlan.of(one_run)
    assert epsilon(four_rounds, delta=1e-5, accountant=RDP) == epsilon(one_run, delta=1e-5, accountant=RDP)
    assert agrees_to_4_significant_digits(epsilon(four_rounds, delta=1e-5), 1.8282)


def test_composition_of_different_releases_is_below_the_sum_and_above_each():
    a = DpSgdRelease(noise_multiplier=1.0, sample_rate=0.01, steps=500)
    b = GaussianRelease(noise_multiplier=8.0, count=10)
    eps_a, eps_b = epsilon(a, delta=1e-5), epsilon(b, delta=1e-5)
    both = epsilon(compose(a, b), delta=1e-5)
    assert max(eps_a, eps_b) < both < eps_a + eps_b


def test_empty_plan_spends_nothing_and_noiseless_release_is_infinite():
    assert epsilon(DpPlan(), delta=1e-5) == 0.0
    noiseless = DpSgdRelease(noise_multiplier=0.0, sample_rate=1.0, steps=1)
    assert epsilon(noiseless, delta=1e-5) == math.inf
    mixed = compose(noiseless, GaussianRelease(noise_multiplier=3.0))
    assert epsilon(mixed, delta=1e-5, accountant=RDP) == math.inf


def test_huge_epsilon_skips_pld_and_reports_an_rdp_upper_bound():
    # sigma 0.05: PLD would need gigabytes; the integer-order RDP bound answers in milliseconds.
    tiny_noise = DpSgdRelease(noise_multiplier=0.05, sample_rate=0.01, steps=1000)
    eps = epsilon(tiny_noise, delta=1e-5)
    assert PLD_EPSILON_CEILING < eps < math.inf
    # Fewer orders can only give a larger (still valid) RDP bound than the full RDP accountant's.
    assert eps >= epsilon(tiny_noise, delta=1e-5, accountant=RDP)


def test_pld_is_the_default_and_tighter_than_rdp_on_reference_case():
    release = DpSgdRelease(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
    assert epsilon(release, delta=1e-5) < epsilon(release, delta=1e-5, accountant=RDP)


release_strategy = st.one_of(
    st.builds(
        DpSgdRelease,
        noise_multiplier=st.floats(0.0, 50.0, allow_nan=False),
        sample_rate=st.floats(1e-6, 1.0).filter(lambda q: q > 0),
        steps=st.integers(1, 10**6),
    ),
    st.builds(
        GaussianRelease, noise_multiplier=st.floats(0.0, 50.0, allow_nan=False), count=st.integers(1, 10**6)
    ),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(release_strategy, max_size=5))
def test_plan_json_round_trips(releases):
    plan = DpPlan(releases=tuple(releases))
    assert DpPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"mechanism": "laplace", "noise_multiplier": 1.0, "count": 1}, "unknown mechanism"),
        ({"noise_multiplier": 1.0, "count": 1}, "unknown mechanism"),
        ({"mechanism": "gaussian", "noise_multiplier": 1.0}, "missing"),
        ({"mechanism": "gaussian", "noise_multiplier": 1.0, "count": 1, "extra": 2}, "unexpected"),
        ({"mechanism": "gaussian", "noise_multiplier": "1.0", "count": 1}, "must be a number"),
        ({"mechanism": "gaussian", "noise_multiplier": 1.0, "count": 1.5}, "whole number"),
        ({"mechanism": "gaussian", "noise_multiplier": 1.0, "count": True}, "whole number"),
        ({"mechanism": "dp_sgd", "noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1}, "sample rate"),
        ({"mechanism": "dp_sgd", "noise_multiplier": -1.0, "sample_rate": 0.5, "steps": 1}, "negative"),
        ({"mechanism": "dp_sgd", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 0}, "at least 1"),
        ([1, 2], "JSON object"),
    ],
)
def test_malformed_release_json_is_refused(bad, message):
    with pytest.raises(DpParameterError, match=message):
        release_from_json(bad)


def test_plan_json_must_be_a_list():
    with pytest.raises(DpParameterError, match="JSON list"):
        DpPlan.from_json({"mechanism": "gaussian", "noise_multiplier": 1.0, "count": 1})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": math.nan, "sample_rate": 0.1, "steps": 1},
        {"noise_multiplier": math.inf, "sample_rate": 0.1, "steps": 1},
        {"noise_multiplier": -0.5, "sample_rate": 0.1, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 1.01, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": math.nan, "steps": 1},
        {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 0},
        {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2.0},
    ],
)
def test_invalid_dp_sgd_parameters_are_refused(kwargs):
    with pytest.raises(DpParameterError):
        DpSgdRelease(**kwargs)


@pytest.mark.parametrize("count", [0, -3])
def test_gaussian_release_needs_a_positive_count(count):
    with pytest.raises(DpParameterError):
        GaussianRelease(noise_multiplier=1.0, count=count)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, math.nan])
def test_epsilon_needs_delta_in_open_unit_interval(delta):
    with pytest.raises(DpParameterError, match="delta"):
        epsilon(GaussianRelease(noise_multiplier=1.0), delta=delta)


def test_unknown_accountant_is_refused():
    with pytest.raises(ValueError, match="prv"):
        epsilon(GaussianRelease(noise_multiplier=1.0), delta=1e-5, accountant="prv")  # type: ignore[arg-type]
