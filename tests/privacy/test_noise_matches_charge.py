"""Audit: the noise a site actually adds is the noise its ledger is charged for (docs/privacy.md, "What is
protected" and "How epsilon is accounted"; docs/statistics.md, "Noise and its accounting"; docs/imaging.md,
"Record-level DP (DP-SGD)").

Each test runs the real trainer or session on data built so that the released values are pure noise (or a
known value plus noise), measures the noise's standard deviation (or its exact scale, with a generator whose
every draw is 1), and compares it with the standard deviation the charged release stands for, within a
tolerance that a wrong clip norm, multiplier, batch divisor or share size would exceed. The charged release
is the one the site's privacy gate reserves for the same spec (``task_plan``), so a trainer and an accountant
that read the spec differently fail here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from fedhealth.data import TabularDataset
from fedhealth.learning import run_stats_in_memory
from fedhealth.learning._stats import StatsParams, count_vector, sensitivity, site_columns, strata
from fedhealth.privacy import DpPlan, DpSgdRelease, GaussianRelease, snap_grid
from fedhealth.protocol import PrivacySpec, RecipeSpec, SecureAggregationSpec, StudySpec, TaskKind
from fedhealth.runtime import initial_model, train_on_site
from fedhealth.runtime._privacy import private_mean, task_plan
from support import logreg_recipe, study_task

SITE = "site-a"


def zero_features(rows: int, width: int, *, seed: int = 0, test_rows: int = 4) -> TabularDataset:
    """Rows whose features are all 0: a logistic regression's weight gradient ``(p - y) x`` is then exactly
    0, so every weight coordinate of a DP update is the noise and nothing else."""
    rng = np.random.default_rng(seed)
    return TabularDataset(
        name="zeros",
        X_train=np.zeros((rows, width)),
        y_train=rng.integers(0, 2, rows),
        X_test=np.zeros((test_rows, width)),
        y_test=np.arange(test_rows) % 2,
        feature_names=tuple(f"f{i}" for i in range(width)),
    )


def relative_error(measured: float, expected: float) -> float:
    return abs(measured - expected) / expected


# --- record level: DP-SGD (logistic regression) -----------------------------------------------------------


def test_the_dp_sgd_update_carries_exactly_the_charged_noise_sigma_c_over_the_expected_batch():
    """2000 weight coordinates, each ``-lr * sum_t noise_t / (q N)`` with ``noise_t ~ N(0, (sigma C)^2)``:
    standard deviation ``lr sigma C sqrt(steps) / (q N)``; measured to about 1.6 % (one standard error)."""
    width, rows = 2000, 100
    sigma, clip, q, steps, lr = 1.3, 0.7, 0.5, 4, 0.1
    spec = StudySpec(
        name="noise",
        dataset="zeros",
        recipe=logreg_recipe(width, learning_rate=lr),
        rounds=1,
        train_sites=[SITE],
        privacy=PrivacySpec(
            delta=1e-5, noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q, steps_per_round=steps
        ),
    )
    charged = task_plan(spec, TaskKind.TRAIN, SITE)
    assert charged == DpPlan.of(DpSgdRelease(noise_multiplier=sigma, sample_rate=q, steps=steps))
    out = train_on_site(
        study_task(spec), SITE, initial_model(spec.recipe, spec.seed), zero_features(rows, width)
    )
    weights = out.delta["weight"].astype(np.float64)
    expected = lr * sigma * clip * math.sqrt(steps) / (q * rows)
    assert abs(float(weights.mean())) < 4 * expected / math.sqrt(width)
    assert relative_error(float(weights.std()), expected) < 0.06


def test_dp_sgd_samples_each_record_independently_at_the_charged_rate(monkeypatch):
    """The accountant's ``PoissonSampledDpEvent(q)`` assumes each record is drawn independently with
    probability q at every step, from the rows actually trained on: batch sizes are then Binomial(N, q)
    (mean Nq, variance Nq(1-q)), not a fixed batch size, and the trainer runs exactly the charged steps."""
    import fedhealth.learning._logreg_dp as logreg_dp

    calls: list[tuple[int, float, int]] = []
    real = logreg_dp.poisson_sample

    def spy(n: int, rate: float, rng: object) -> np.ndarray:
        batch = real(n, rate, rng)  # type: ignore[arg-type]
        calls.append((n, rate, int(batch.size)))
        return batch

    monkeypatch.setattr(logreg_dp, "poisson_sample", spy)
    rows, q, steps = 200, 0.1, 600
    spec = StudySpec(
        name="sampling",
        dataset="zeros",
        recipe=logreg_recipe(2, learning_rate=0.01),
        rounds=1,
        train_sites=[SITE],
        privacy=PrivacySpec(
            delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=q, steps_per_round=steps
        ),
    )
    [charged] = task_plan(spec, TaskKind.TRAIN, SITE).releases
    train_on_site(study_task(spec), SITE, initial_model(spec.recipe, spec.seed), zero_features(rows, 2))
    assert len(calls) == charged.repetitions == steps
    assert {(n, rate) for n, rate, _ in calls} == {(rows, charged.sample_rate)}
    sizes = np.array([size for _, _, size in calls], dtype=np.float64)
    mean, var = rows * q, rows * q * (1 - q)
    assert abs(sizes.mean() - mean) < 4 * math.sqrt(var / steps)
    assert 0.75 * var < sizes.var() < 1.3 * var  # a fixed batch has variance 0


def test_an_imaging_dp_sgd_update_carries_the_charged_noise_over_all_of_the_networks_parameters():
    """docs/imaging.md: Opacus per-example gradients, clipped over all the network's parameters, noise
    ``noise_multiplier * max_grad_norm``, divided by the expected batch ``q N``. With an expected batch of
    1.8 images the clipped gradients (norm at most C in total) are negligible beside the noise summed over
    ~38,000 parameters: every parameter's change is ``lr N(0, (sigma C)^2) / (q N)``."""
    pytest.importorskip("torch")
    pytest.importorskip("opacus")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "imaging"))
    from imaging_files import square_images

    sigma, clip, q, lr = 1.3, 0.7, 0.1, 0.05
    params = {"input_size": 16, "norm": "group", "optimizer": "sgd", "learning_rate": lr, "batch_size": 8}
    images = square_images(24, seed=1, name="squares")
    spec = StudySpec(
        name="imaging-noise",
        dataset="squares",
        recipe=RecipeSpec(name="torch", params=params),
        rounds=1,
        train_sites=[SITE],
        privacy=PrivacySpec(
            delta=1e-4, noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q, steps_per_round=1
        ),
    )
    assert task_plan(spec, TaskKind.TRAIN, SITE) == DpPlan.of(
        DpSgdRelease(noise_multiplier=sigma, sample_rate=q, steps=1)
    )
    out = train_on_site(study_task(spec), SITE, initial_model(spec.recipe, spec.seed), images)
    change = np.concatenate([v.ravel().astype(np.float64) for v in out.delta.values()])
    expected = lr * sigma * clip / (q * images.num_train)
    assert change.size > 10_000
    assert relative_error(float(change.std()), expected) < 0.05


# --- site level --------------------------------------------------------------------------------------------


def distributed_spec(width: int, *, sites: int, quorum: int, sigma: float, clip: float) -> StudySpec:
    names = [SITE, *(f"site-{i}" for i in range(1, sites))]
    return StudySpec(
        name="dist",
        dataset="zeros",
        recipe=logreg_recipe(width, learning_rate=0.1),
        rounds=1,
        train_sites=names,
        min_sites=quorum,
        privacy=PrivacySpec(mode="site-distributed", delta=1e-5, noise_multiplier=sigma, max_grad_norm=clip),
        secure_aggregation=SecureAggregationSpec(
            update_clip=1e6, site_keys={s: f"{i:064x}" for i, s in enumerate(names)}
        ),
    )


def test_a_site_distributed_share_is_sized_so_that_the_quorums_sum_carries_the_charged_noise():
    """docs/privacy.md, site-distributed: each site adds ``N(0, sigma^2 C^2 / m)``, m the quorum, so a sum
    over m sites has ``sigma C``: what the site-level release (and the record-level sigma / 2) accounts."""
    width, sigma, clip, quorum = 3000, 2.0, 0.5, 3
    spec = distributed_spec(width, sites=4, quorum=quorum, sigma=sigma, clip=clip)
    assert task_plan(spec, TaskKind.TRAIN, SITE) == DpPlan.of(GaussianRelease(noise_multiplier=sigma / 2))
    global_params = initial_model(spec.recipe, spec.seed)
    shares = [
        train_on_site(study_task(spec), SITE, global_params, zero_features(50, width, seed=s)).delta["weight"]
        for s in range(quorum)
    ]
    one = shares[0].astype(np.float64)
    assert relative_error(float(one.std()), sigma * clip / math.sqrt(quorum)) < 0.06
    summed = np.sum([s.astype(np.float64) for s in shares], axis=0)
    assert relative_error(float(summed.std()), sigma * clip) < 0.06


def test_site_central_noise_on_the_sum_has_the_charged_standard_deviation():
    width, sigma, clip = 4000, 1.7, 0.3
    names = [SITE, "site-b"]
    spec = StudySpec(
        name="central",
        dataset="zeros",
        recipe=logreg_recipe(width),
        rounds=1,
        train_sites=names,
        privacy=PrivacySpec(mode="site-central", delta=1e-5, noise_multiplier=sigma, max_grad_norm=clip),
    )
    assert task_plan(spec, TaskKind.TRAIN, SITE) == DpPlan.of(GaussianRelease(noise_multiplier=sigma / 2))
    zero = {"weight": np.zeros(width, np.float32), "bias": np.zeros(1, np.float32)}
    mean = private_mean(spec, [(10, zero), (10, zero)], np.random.default_rng(3))
    noise_on_sum = mean["weight"].astype(np.float64) * len(names)
    assert relative_error(float(noise_on_sum.std()), sigma * clip) < 0.06


# --- statistics -------------------------------------------------------------------------------------------


def uniform_sites(rows: int, sites: tuple[str, ...] = ("a", "b", "c")) -> dict[str, TabularDataset]:
    out = {}
    for i, site in enumerate(sites):
        rng = np.random.default_rng(i)
        X = rng.uniform(0.0, 10.0, size=(rows, 1))
        out[site] = TabularDataset(
            name=site,
            X_train=X,
            y_train=rng.integers(0, 2, rows),
            X_test=np.zeros((0, 1)),
            y_test=np.zeros(0, dtype=np.int64),
            feature_names=("age",),
        )
    return out


class UnitNoise:
    """A noise source whose every Gaussian draw is exactly +1 standard deviation: the released figure then
    moves by exactly the noise scale each site applied."""

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None):
        shape = (size,) if isinstance(size, int) else (() if size is None else tuple(size))
        return np.full(shape, float(loc) + float(scale))

    def random(self, size: int | tuple[int, ...] | None = None):  # pragma: no cover - not used by stats
        raise AssertionError("stats draws no uniforms")


STATS = {"features": ["age"], "bins": {"age": [0.0, 5.0, 10.0]}, "min_cell_count": 1}


def test_each_site_adds_the_full_noise_scale_to_counts_and_to_the_sum_of_values():
    """docs/statistics.md: noise ``z S u`` on every figure, u = 1 for counts and h for sums of ``x - c``.
    With every draw +1 std, the released row count moves by ``n z S`` and the released mean by
    ``(s1 + n z S h) / (observed + n z S)``."""
    z, rows, sites = 2.0, 400, ("a", "b", "c")
    data = uniform_sites(rows, sites)
    params = StatsParams.model_validate({**STATS, "noise_multiplier": z})
    big_s = sensitivity(params)
    assert big_s == pytest.approx(math.sqrt(1 + 4 * 1))
    report = run_stats_in_memory(params, data, noise=lambda _site: UnitNoise())  # type: ignore[arg-type,return-value]
    whole = report["strata"][0]  # type: ignore[index]
    shift = len(sites) * z * big_s
    grid = snap_grid(z * big_s)  # each site's noisy figure is snapped, the sum rounded to a whole count
    assert abs(whole["rows"]["value"] - (rows * len(sites) + shift)) <= len(sites) * grid / 2 + 0.5
    values = np.concatenate([d.X_train[:, 0] for d in data.values()])
    centre, half = 5.0, 5.0
    noisy_count = values.size + shift
    expected_mean = centre + (float(np.sum(values - centre)) + shift * half) / noisy_count
    assert whole["features"]["age"]["mean"]["value"] == pytest.approx(expected_mean, rel=1e-3)


def test_released_statistics_carry_at_least_the_charged_noise_over_many_sessions():
    """The charged release is one Gaussian of multiplier z on sensitivity S; with every site adding the full
    noise the released count of n sites has standard deviation ``sqrt(n) z S`` (never less than ``z S``).
    Measured over 400 real sessions (each site a fresh generator): about 3.5 % standard error."""
    z, rows, sessions = 1.0, 200, 400
    data = uniform_sites(rows)
    params = StatsParams.model_validate({**STATS, "noise_multiplier": z})
    released = []
    for i in range(sessions):
        seeds: Callable[[str], np.random.Generator] = lambda site, i=i: np.random.default_rng(  # noqa: E731
            [i, ord(site[0])]
        )
        report = run_stats_in_memory(params, data, noise=seeds)
        released.append(report["strata"][0]["rows"]["value"])  # type: ignore[index]
    measured = float(np.std(released))
    expected = math.sqrt(len(data)) * z * sensitivity(params)
    # rounding to whole counts adds 1/12 to the variance
    assert relative_error(measured, math.sqrt(expected**2 + 1 / 12)) < 0.15
    assert abs(float(np.mean(released)) - rows * len(data)) < 4 * expected / math.sqrt(sessions)


def test_one_record_moves_the_count_figures_by_no_more_than_the_sensitivity_the_noise_is_sized_for():
    """The count part of S: per stratum kind the row count (1) and, per feature, the observed count and one
    bin (2 figures): ``sqrt(kinds (1 + 2F))`` <= S. Checked by adding one record to a site, by label and by
    site, on the figures the site really sends (``count_vector``)."""
    params = StatsParams.model_validate(
        {
            "features": ["a", "b", "c"],
            "by_label": True,
            "by_site": True,
            "noise_multiplier": 1.0,
            "default_bins": [0.0, 1.0, 2.0],
        }
    )
    rng = np.random.default_rng(5)
    X = rng.uniform(-1, 3, size=(30, 3))
    y = rng.integers(0, 2, 30)

    def figures(n: int) -> np.ndarray:
        ds = TabularDataset(
            name="d",
            X_train=X[:n],
            y_train=y[:n],
            X_test=np.zeros((0, 3)),
            y_test=np.zeros(0, np.int64),
            feature_names=("a", "b", "c"),
        )
        sites = ("x", "y")
        return count_vector(params, site_columns(params, ds), "x", strata(params, sites))

    worst = max(float(np.linalg.norm(figures(n + 1) - figures(n))) for n in range(29))
    kinds, features = 4, 3
    assert worst == pytest.approx(math.sqrt(kinds * (1 + 2 * features)))
    assert worst <= sensitivity(params)
