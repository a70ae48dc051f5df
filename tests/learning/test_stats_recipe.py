"""The ``stats`` recipe in memory (threads, the real masks and relay): federated statistics equal the pooled
ones computed on the union of the sites' records, cells under k are suppressed, noise is declared to the
ledger, exact sums survive large values, and bad params or data are refused with a clear reason."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest

from fedhealth.core import InputError
from fedhealth.data import FillRule, Imputation, TabularDataset, heart_disease_records, load_heart_disease
from fedhealth.learning import (
    STATS_RECIPE,
    CombinationPattern,
    DataSchema,
    InMemorySession,
    RecipeCapabilities,
    RecipeError,
    RecipeParamsError,
    RecipeRegistry,
    SessionContext,
    StatsParams,
    exact_secure_sum,
    resolve_recipe,
)
from fedhealth.learning._stats import DEFAULT_EDGES, sensitivity, split_limbs
from fedhealth.privacy import DpPlan, GaussianRelease

HEART_FEATURES = [
    "age",
    "sex",
    "trestbps",
    "chol",
    "fbs",
    "thalach",
    "exang",
    "oldpeak",
]


def run_stats(
    params: StatsParams, datasets: dict[str, TabularDataset], *, noise_seed: int | None = None
) -> dict[str, Any]:
    """One stats session among ``datasets``' sites; the report as the orchestrator reads it."""
    session = InMemorySession(sorted(datasets))

    def program(member: Any) -> Any:
        noise = (
            None
            if noise_seed is None
            else np.random.default_rng([noise_seed, sorted(datasets).index(member.site)])
        )
        ctx = SessionContext(site=member.site, seed=0, rng=np.random.default_rng(0), noise=noise)
        return STATS_RECIPE.run_site(params, datasets[member.site], member, ctx)

    session.run(program)
    assert session.relay.released is not None
    return STATS_RECIPE.finish(params, session.relay.released)


def stratum(report: dict[str, Any], *, label: int | None = None, site: str | None = None) -> dict[str, Any]:
    [found] = [s for s in report["strata"] if s["stratum"] == {"label": label, "site": site}]
    return found


def pooled_rows(datasets: dict[str, TabularDataset]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    X = np.concatenate([np.concatenate([d.X_train, d.X_test]) for d in datasets.values()])
    y = np.concatenate([np.concatenate([d.y_train, d.y_test]) for d in datasets.values()])
    return X, y, list(next(iter(datasets.values())).feature_names)


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)


def assert_cells_equal_pooled(figures: dict[str, Any], values: np.ndarray, edges: np.ndarray, k: int) -> int:
    """Every released cell equals the pooled figure (1e-9); every cell under k is suppressed, and never
    exactly one bin (it would be the count minus the others). Returns how many bins were suppressed."""
    n = values.size
    assert figures["count"] == {"value": n, "suppressed": False}
    assert figures["mean"]["value"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-9)
    assert figures["variance"]["value"] == pytest.approx(values.var(ddof=1), rel=1e-9, abs=1e-9)
    suppressed = 0
    for cell, expected in zip(figures["histogram"], histogram(values, edges), strict=True):
        if 0 < expected < k:
            assert cell == {"value": None, "suppressed": True}
        if cell["suppressed"]:
            assert cell["value"] is None
            suppressed += 1
        else:
            assert cell["value"] == int(expected)
    assert suppressed != 1
    return suppressed


@pytest.fixture(scope="module")
def heart(heart_data_dir) -> dict[str, TabularDataset]:
    return {f"site-{c}": load_heart_disease(c, heart_data_dir, download=False) for c in range(4)}


def test_federated_statistics_of_heart_disease_equal_the_pooled_statistics_of_the_four_files(heart):
    features = list(next(iter(heart.values())).feature_names)
    params = StatsParams(features=features, by_label=True, min_cell_count=5)
    report = run_stats(params, heart)
    X, y, names = pooled_rows(heart)
    assert report["sites"] == sorted(heart)
    edges = np.asarray(DEFAULT_EDGES)
    suppressed = 0
    for label in (None, 0, 1):
        rows = np.ones(y.size, bool) if label is None else y == label
        got = stratum(report, label=label)
        assert got["rows"] == {"value": int(rows.sum()), "suppressed": False}
        for feature in features:
            values = X[rows, names.index(feature)]
            figures = got["features"][feature]
            suppressed += assert_cells_equal_pooled(figures, values, edges, 5)
            assert figures["missing"] == {"value": 0, "suppressed": False}
            assert figures["missing_fraction"] == {"value": 0.0, "suppressed": False}
    assert suppressed > 0  # the data has bins of 1-4 patients: the rule was exercised


def test_raw_heart_disease_values_with_large_sums_of_squares_are_exact(heart_data_dir):
    # the UCI values before any scaling: cholesterol up to 603, so a site's sum of squares far exceeds the
    # secure sum's per-value bound of 2^23 / 4 (the limbs carry it exactly)
    datasets = {}
    for center in range(4):
        records = heart_disease_records(center, heart_data_dir, download=False)
        X = np.array([[getattr(r, f) for f in HEART_FEATURES] for r in records])
        y = np.array([r.disease for r in records])
        datasets[f"h{center}"] = TabularDataset(
            name=f"raw-{center}",
            X_train=X,
            y_train=y,
            X_test=X[:0],
            y_test=y[:0],
            feature_names=tuple(HEART_FEATURES),
        )
    bins = {"chol": [0.0, 100.0, 200.0, 300.0, 400.0, 700.0], "age": [20.0, 40.0, 60.0, 80.0]}
    params = StatsParams(features=["chol", "age", "thalach"], bins=bins, by_site=True, min_cell_count=10)
    report = run_stats(params, datasets)
    X, _, _ = pooled_rows(datasets)
    for feature in ["chol", "age", "thalach"]:
        edges = np.asarray(bins.get(feature, DEFAULT_EDGES))
        column = X[:, HEART_FEATURES.index(feature)]
        if feature == "chol":  # its centred sum of squares is beyond what one plain secure sum carries
            assert float(np.sum((column - 350.0) ** 2)) > 2**23 / 4
        assert_cells_equal_pooled(stratum(report)["features"][feature], column, edges, 10)
        for site, dataset in datasets.items():
            local = dataset.X_train[:, HEART_FEATURES.index(feature)]
            figures = stratum(report, site=site)["features"][feature]
            assert figures["mean"]["value"] == pytest.approx(local.mean(), rel=1e-9)


def test_exact_secure_sum_carries_values_far_beyond_the_fixed_point_bound():
    rng = np.random.default_rng(3)
    local = {s: rng.normal(0, 1e12, size=50) for s in ("a", "b", "c", "d")}
    local["a"][0] = 0.1  # a small value beside large ones keeps its fraction
    results = InMemorySession(sorted(local)).run(lambda m: exact_secure_sum(m, local[m.site]))
    expected = np.sum(np.stack(list(local.values())), axis=0)
    for got in results.values():
        np.testing.assert_allclose(got, expected, rtol=1e-15, atol=4 * 2.0**-40)
    counts = {s: np.array([3.0, 2.0**40 + 1]) for s in ("a", "b", "c")}
    [got, *_] = InMemorySession(sorted(counts)).run(lambda m: exact_secure_sum(m, counts[m.site])).values()
    assert got.tolist() == [9.0, 3 * (2.0**40 + 1)]  # integers come out exact


def test_a_figure_beyond_the_exact_range_is_refused_before_anything_is_sent():
    values = {s: np.array([1e30]) for s in ("a", "b", "c")}
    with pytest.raises(InputError, match="too large for an exact secure sum"):
        InMemorySession(sorted(values)).run(lambda m: exact_secure_sum(m, values[m.site]))


def small_site(name: str, n: int, offset: float = 0.0) -> TabularDataset:
    X = np.column_stack([np.linspace(-1, 1, n) + offset, np.arange(n) % 2])
    y = np.arange(n) % 2
    return TabularDataset(
        name=name, X_train=X, y_train=y, X_test=X[:0], y_test=y[:0], feature_names=("x", "z")
    )


def test_cells_under_k_are_suppressed_with_their_derived_statistics_per_site_too():
    datasets = {"a": small_site("a", 40), "b": small_site("b", 40, 0.5), "c": small_site("c", 3)}
    params = StatsParams(features=["x"], by_site=True, min_cell_count=5)
    report = run_stats(params, datasets)
    tiny = stratum(report, site="c")
    assert tiny["rows"] == {"value": None, "suppressed": True}
    for name in ("count", "missing", "missing_fraction", "mean", "variance"):
        assert tiny["features"]["x"][name] == {"value": None, "suppressed": True}
    assert all(cell["suppressed"] and cell["value"] is None for cell in tiny["features"]["x"]["histogram"])
    assert stratum(report, site="a")["rows"] == {"value": 40, "suppressed": False}
    assert stratum(report)["rows"] == {"value": 83, "suppressed": False}
    # the released JSON holds no value of a suppressed cell anywhere
    raw = json.dumps(stratum(report, site="c"))
    assert '"value": null' in raw
    assert '"value": 3' not in raw


def test_a_k_larger_than_every_cell_suppresses_all_and_k_of_one_suppresses_nothing():
    datasets = {"a": small_site("a", 12), "b": small_site("b", 12), "c": small_site("c", 12)}
    everything = run_stats(StatsParams(features=["x"], min_cell_count=1000), datasets)
    assert stratum(everything)["rows"]["suppressed"] is True
    assert stratum(everything)["features"]["x"]["mean"]["value"] is None
    nothing = run_stats(StatsParams(features=["x"], min_cell_count=1), datasets)
    figures = stratum(nothing)["features"]["x"]
    assert not any(c["suppressed"] for c in figures["histogram"])
    assert figures["mean"]["value"] == pytest.approx(0.0, abs=1e-12)


def test_missing_cells_are_counted_as_missing_and_left_out_of_the_moments():
    datasets = {}
    for i, site in enumerate(("a", "b", "c")):
        base = small_site(site, 30, offset=float(i))
        missing = np.zeros((30, 1), bool)
        missing[: 6 + i, 0] = True
        datasets[site] = TabularDataset(
            name=site,
            X_train=base.X_train,
            y_train=base.y_train,
            X_test=base.X_test,
            y_test=base.y_test,
            feature_names=base.feature_names,
            imputation=Imputation(
                features=(0,), rules=(FillRule.MEAN,), missing_train=missing, missing_test=missing[:0]
            ),
        )
    report = run_stats(StatsParams(features=["x", "z"], min_cell_count=5), datasets)
    figures = stratum(report)["features"]["x"]
    assert figures["missing"] == {"value": 6 + 7 + 8, "suppressed": False}
    assert figures["count"] == {"value": 90 - 21, "suppressed": False}
    assert figures["missing_fraction"]["value"] == pytest.approx(21 / 90)
    observed = np.concatenate([d.X_train[(6 + i) :, 0] for i, d in enumerate(datasets.values())])
    assert figures["mean"]["value"] == pytest.approx(observed.mean(), rel=1e-12)
    assert figures["variance"]["value"] == pytest.approx(observed.var(ddof=1), rel=1e-12)
    assert stratum(report)["features"]["z"]["missing"]["value"] == 0


def test_noise_is_added_by_each_site_and_declared_to_the_ledger_as_one_gaussian_release():
    datasets = {"a": small_site("a", 200), "b": small_site("b", 200), "c": small_site("c", 200)}
    params = StatsParams(features=["x"], noise_multiplier=2.0, min_cell_count=5)
    assert STATS_RECIPE.dp_plan(params) == DpPlan.of(GaussianRelease(noise_multiplier=2.0))
    assert STATS_RECIPE.dp_plan(StatsParams(features=["x"])) == DpPlan()
    assert sensitivity(params) == pytest.approx(np.sqrt(1 + 4))
    first = run_stats(params, datasets, noise_seed=1)
    second = run_stats(params, datasets, noise_seed=2)
    assert first["noise"] == {"mechanism": "gaussian", "noise_multiplier": 2.0, "added_by": "each site"}
    assert stratum(first)["rows"] != stratum(second)["rows"]  # the noise differs, the sizes are not exact
    assert abs(stratum(first)["rows"]["value"] - 600) < 60  # 3 sites x std 2 sqrt(5): within 6 std
    mean = stratum(first)["features"]["x"]["mean"]["value"]
    assert -3.0 <= mean <= 3.0  # clamped to the public edges


def test_noise_calibrated_from_a_target_epsilon_is_what_the_ledger_is_told():
    params = StatsParams(features=["x"], target_epsilon=1.0, delta=1e-6)
    [release] = STATS_RECIPE.dp_plan(params).releases
    assert isinstance(release, GaussianRelease)
    assert release.noise_multiplier == pytest.approx(4.5, rel=0.2)  # about 4.4 for (1, 1e-6)
    assert DpPlan.of(release).epsilon(delta=1e-6) <= 1.0 * 1.001


def test_noise_without_a_noise_generator_is_refused():
    datasets = {"a": small_site("a", 20), "b": small_site("b", 20), "c": small_site("c", 20)}
    params = StatsParams(features=["x"], noise_multiplier=1.0)
    session = InMemorySession(sorted(datasets))

    def program(member: Any) -> Any:
        ctx = SessionContext(site=member.site, seed=0, rng=np.random.default_rng(0))
        return STATS_RECIPE.run_site(params, datasets[member.site], member, ctx)

    with pytest.raises(InputError, match="no noise generator"):
        session.run(program)


def test_an_unknown_feature_fails_the_session_with_its_name_and_no_value():
    datasets = {"a": small_site("a", 20), "b": small_site("b", 20), "c": small_site("c", 20)}
    with pytest.raises(InputError, match="has no feature 'weight'") as failed:
        run_stats(StatsParams(features=["x", "weight"]), datasets)
    assert "0.5" not in str(failed.value)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"features": ["x"], "bins": {"x": [0, 1, 1, 2]}}, "strictly increasing"),
        ({"features": ["x"], "bins": {"x": [2, 1]}}, "strictly increasing"),
        ({"features": ["x"], "bins": {"x": [0]}}, "at least 2 bin edges"),
        ({"features": ["x"], "bins": {"x": [0, float("nan")]}}, "not plain JSON"),
        ({"features": ["x"], "default_bins": [0, float("inf")]}, "not plain JSON"),
        ({"features": ["x"], "bins": {"y": [0, 1]}}, "not in features: y"),
        ({"features": ["x"], "min_cell_count": 0}, "min_cell_count"),
        ({"features": []}, "features"),
        ({"features": ["x", "x"]}, "must not repeat"),
        ({"features": ["x"], "noise_multiplier": 1.0, "target_epsilon": 1.0, "delta": 1e-5}, "not both"),
        ({"features": ["x"], "target_epsilon": 1.0}, "go together"),
        ({"features": ["x"], "noise_multiplier": -1.0}, "noise_multiplier"),
        ({"features": ["x"], "target_epsilon": 1e-9, "delta": 1e-5}, "target_epsilon"),
        ({"features": ["x"], "k": 5}, "k"),
    ],
)
def test_bad_params_are_refused_with_a_clear_reason(params, message):
    with pytest.raises(RecipeParamsError, match=message):
        resolve_recipe("stats", "1", params)


def test_the_recipe_is_registered_and_describes_what_it_releases():
    resolved = resolve_recipe("stats", "1", {"features": ["x"], "by_label": True, "noise_multiplier": 1.0})
    assert resolved.capabilities.session_dp
    assert resolved.capabilities.reads_data
    assert resolved.session_dp_plan() == DpPlan.of(GaussianRelease(noise_multiplier=1.0))
    text = resolved.describe()
    assert "per label" in text
    assert "cells under 5 records are suppressed" in text
    assert "noise" in text


@pytest.mark.parametrize("edges", [[0.0, float("nan")], [float("-inf"), 1.0]])
def test_non_finite_bin_edges_are_refused_by_the_params_model(edges):
    with pytest.raises(ValueError, match="finite"):
        StatsParams.model_validate({"features": ["x"], "bins": {"x": edges}})


def test_a_non_finite_local_figure_is_refused_before_anything_is_sent():
    with pytest.raises(InputError, match="not finite; nothing was sent"):
        split_limbs(np.array([1.0, np.inf]), 3)
    values = {s: np.array([1.0, np.nan]) for s in ("a", "b", "c")}
    with pytest.raises(InputError, match="not finite"):
        InMemorySession(sorted(values)).run(lambda m: exact_secure_sum(m, values[m.site]))


def test_a_collective_recipe_that_declares_session_dp_without_its_plan_is_not_registered():
    class Unaccounted:
        name, version, params_model = "unaccounted", "1", StatsParams
        pattern = CombinationPattern.COLLECTIVE
        capabilities = RecipeCapabilities(session_dp=True)

        def data_schema(self, params):
            return DataSchema()

        def run_site(self, params, dataset, session, ctx):
            raise AssertionError("never run")

        def finish(self, params, released):
            return {}

    with pytest.raises(RecipeError, match="a collective recipe needs dp_plan"):
        RecipeRegistry([Unaccounted()])


def test_a_small_missing_count_hides_the_count_too_and_a_small_count_hides_the_missing_count():
    datasets = {}
    for site in ("a", "b", "c"):
        base = small_site(site, 30)
        missing = np.zeros((30, 2), bool)
        missing[:1, 0] = True  # x: 3 missing in all, under k: the count would give it away
        missing[3:, 1] = True  # z: 9 observed in all, under k: the missing count would give it away
        datasets[site] = TabularDataset(
            name=site,
            X_train=base.X_train,
            y_train=base.y_train,
            X_test=base.X_test,
            y_test=base.y_test,
            feature_names=base.feature_names,
            imputation=Imputation(
                features=(0, 1),
                rules=(FillRule.MEAN, FillRule.MEAN),
                missing_train=missing,
                missing_test=missing[:0],
            ),
        )
    report = run_stats(StatsParams(features=["x", "z"], min_cell_count=10), datasets)
    figures = stratum(report)
    assert figures["rows"] == {"value": 90, "suppressed": False}
    x, z = figures["features"]["x"], figures["features"]["z"]
    for name in ("count", "missing", "missing_fraction"):
        assert x[name] == {"value": None, "suppressed": True}
        assert z[name] == {"value": None, "suppressed": True}
    assert x["mean"]["suppressed"] is False  # a statistic of 87 records
    # the bins would add up to the hidden count: at least one of them is withheld
    assert any(cell["suppressed"] for cell in x["histogram"])
    assert all(cell["suppressed"] for cell in z["histogram"])
    assert z["mean"] == {"value": None, "suppressed": True}


def test_a_single_small_bin_is_hidden_with_a_second_one():
    values = np.array([-0.75] * 12 + [0.25] * 12 + [2.5] * 2)  # one bin of 2 under k = 5
    X = values[:, None]
    y = np.zeros(values.size, np.int64)
    one = TabularDataset(name="a", X_train=X, y_train=y, X_test=X[:0], y_test=y[:0], feature_names=("x",))
    empty = TabularDataset(
        name="e", X_train=X[:0], y_train=y[:0], X_test=X[:0], y_test=y[:0], feature_names=("x",)
    )
    report = run_stats(StatsParams(features=["x"]), {"a": one, "b": empty, "c": empty})
    bins = stratum(report)["features"]["x"]["histogram"]
    assert [i for i, c in enumerate(bins) if c["suppressed"]] == [3, 8]  # the 2 (bin 8), then a 12 (bin 3)
    assert stratum(report)["features"]["x"]["count"]["value"] == 26


def test_a_leader_that_broadcasts_another_report_fails_the_session(monkeypatch):
    from fedhealth.learning import _stats

    honest = _stats.build_report

    def leader_lies(params, sites, counts, moments, z):  # type: ignore[no-untyped-def]
        report = honest(params, sites, counts, moments, z)
        if threading.current_thread().name == f"collective-{sites[0]}":
            report["min_cell_count"] = 1  # e.g. claims a smaller k
        return report

    monkeypatch.setattr(_stats, "build_report", leader_lies)
    datasets = {"a": small_site("a", 20), "b": small_site("b", 20), "c": small_site("c", 20)}
    with pytest.raises(InputError, match="leader's report differs"):
        run_stats(StatsParams(features=["x"]), datasets)


def test_with_noise_values_are_clipped_for_the_sums_but_keep_their_open_ended_bins():
    values = np.array([-10.0] * 50 + [10.0] * 50)
    X = values[:, None]
    y = np.zeros(values.size, np.int64)
    data = TabularDataset(name="a", X_train=X, y_train=y, X_test=X[:0], y_test=y[:0], feature_names=("x",))
    params = StatsParams(features=["x"], noise_multiplier=0.01)  # tiny noise: the counts round to exact
    report = run_stats(params, {"a": data, "b": data, "c": data}, noise_seed=5)
    figures = stratum(report)["features"]["x"]
    hist = [c["value"] for c in figures["histogram"]]
    assert hist[0] == hist[-1] == 150  # below -3 and at or above 3, as without noise
    assert hist[1:-1] == [None] * 8  # a noisy zero is not a zero: under k, suppressed
    assert figures["mean"]["value"] == pytest.approx(0.0, abs=0.05)
    assert figures["variance"]["value"] == pytest.approx(9.0 * 300 / 299, rel=0.01)  # clipped to +-3
