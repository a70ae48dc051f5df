"""Attacks on the guarantees docs/statistics.md states that no other test tried to break: a researcher
choosing the spec (bins, edges, the number of hospitals), the session learning what the second sum adds,
one patient's weight in what a site sends (the sensitivity the noise is sized to), each hospital's own
noise, and differencing two studies (which the rule does not stop; the test shows what holds)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedhealth.crypto import IdentityKey
from fedhealth.data import FillRule, Imputation, TabularDataset
from fedhealth.learning import (
    STATS_RECIPE,
    InMemorySession,
    RecipeError,
    RecipeParamsError,
    SessionContext,
    StatsParams,
    _stats,
    resolve_recipe,
)
from fedhealth.learning._stats import DEFAULT_EDGES, centre_and_half_width, sensitivity
from fedhealth.protocol import RecipeSpec, SecureAggregationSpec, StudySpec
from fedhealth.runtime import check_recipe

K = 5


class ConstantNoise:
    """A noise source whose every draw is one standard deviation: what each site adds is then its std."""

    def normal(self, loc: float, scale: float, size: int) -> np.ndarray:
        return np.full(size, loc + scale, dtype=np.float64)


def dataset(name: str, X: np.ndarray, y: np.ndarray | None = None, missing: np.ndarray | None = None):
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    y = np.zeros(X.shape[0], np.int64) if y is None else np.asarray(y, np.int64)
    names = ("x", "z")[: X.shape[1]]
    imputation = None
    if missing is not None:
        imputation = Imputation(
            features=tuple(range(X.shape[1])),
            rules=(FillRule.MEAN,) * X.shape[1],
            missing_train=missing,
            missing_test=missing[:0],
        )
    return TabularDataset(
        name=name,
        X_train=X,
        y_train=y,
        X_test=X[:0],
        y_test=y[:0],
        feature_names=names,
        imputation=imputation,
    )


def run_stats(params: StatsParams, datasets: dict[str, TabularDataset], noise: Any = None) -> dict[str, Any]:
    session = InMemorySession(sorted(datasets))

    def program(member: Any) -> Any:
        ctx = SessionContext(site=member.site, seed=0, rng=np.random.default_rng(0), noise=noise)
        return STATS_RECIPE.run_site(params, datasets[member.site], member, ctx)

    session.run(program)
    assert session.relay.released is not None
    return STATS_RECIPE.finish(params, session.relay.released)


def recording_sums(monkeypatch) -> dict[str, list[np.ndarray]]:
    """Every site's local figures, per secure sum in order, as it hands them to ``exact_secure_sum``."""
    sent: dict[str, list[np.ndarray]] = {}
    honest = _stats.exact_secure_sum

    def record(session: Any, values: np.ndarray) -> np.ndarray:
        sent.setdefault(session.site, []).append(np.array(values, copy=True))
        return honest(session, values)

    monkeypatch.setattr(_stats, "exact_secure_sum", record)
    return sent


def pooled(report: dict[str, Any]) -> dict[str, Any]:
    [found] = [s for s in report["strata"] if s["stratum"] == {"label": None, "site": None}]
    return found


# --- what the orchestrator and the hospitals see -----------------------------------------------------------


def test_a_feature_withheld_as_a_whole_has_none_of_its_values_summed(monkeypatch):
    # one patient in each bin of the grid: the observed count (10) reaches k, but the bins pin each other and
    # the feature is withheld as a whole. The doc: "Cells suppressed after the first sum contribute nothing to
    # the second: the sums of their values are never computed" -- the session must not learn their sum of
    # values (nor of squares) either, though the report withholds the mean
    values = [-3.5, -2.5, -1.5, -0.75, -0.25, 0.25, 0.75, 1.5, 2.5, 3.5]
    sent = recording_sums(monkeypatch)
    empty = dataset("e", np.zeros(0))
    report = run_stats(
        StatsParams(features=["x"], min_cell_count=K),
        {"a": dataset("a", np.array(values)), "b": empty, "c": empty},
    )
    figures = pooled(report)["features"]["x"]
    assert figures["count"]["suppressed"]
    assert figures["mean"]["suppressed"]
    for site, sums in sent.items():
        counts, moments = sums
        assert counts.size > 0
        assert moments.size == 0, f"{site} summed the values of a withheld feature"


def test_the_values_of_a_released_mean_are_summed_and_only_those(monkeypatch):
    # the control: a feature whose mean is released (20 records in one bin) has exactly its two sums added,
    # the withheld one beside it none
    sent = recording_sums(monkeypatch)
    one_each = [-3.5, -2.5, -1.5, -0.75, -0.25, 0.25, 0.75, 1.5, 2.5, 3.5]
    X = np.column_stack([[0.25] * 20 + [-2.5, 2.5], one_each + [0.0] * 12])  # z's missing cells hold a fill
    missing = np.zeros(X.shape, bool)
    missing[len(one_each) :, 1] = True  # z: ten observed (one in each bin), twelve missing
    report = run_stats(
        StatsParams(features=["x", "z"], min_cell_count=K),
        {"a": dataset("a", X, missing=missing), "b": dataset("b", X[:0]), "c": dataset("c", X[:0])},
    )
    assert pooled(report)["features"]["x"]["mean"]["suppressed"] is False
    assert pooled(report)["features"]["z"]["mean"]["suppressed"] is True
    own = sent["a"][1]
    centre, _ = centre_and_half_width(np.asarray(DEFAULT_EDGES))
    assert own.tolist() == pytest.approx([np.sum(X[:, 0] - centre), np.sum((X[:, 0] - centre) ** 2)])


def test_a_stats_study_of_two_hospitals_is_refused_before_any_sum():
    # with two hospitals the first sum less a hospital's own counts is the other's, cells under k included:
    # "never one hospital's own counts" needs at least 3, and a spec of two is refused at submission
    keys = {s: IdentityKey.generate().public().fingerprint for s in ("a", "b")}
    spec = StudySpec(
        name="two",
        dataset="d",
        recipe=RecipeSpec(name="stats", params={"features": ["x"]}),
        rounds=1,
        train_sites=["a", "b"],
        secure_aggregation=SecureAggregationSpec(site_keys=keys),
    )
    with pytest.raises(RecipeError, match="at least 3"):
        check_recipe(spec)


# --- bins chosen by the spec --------------------------------------------------------------------------------


def test_more_than_1001_bin_edges_are_refused():
    # a researcher cannot ask for a grid finer than the doc allows (one more edge than 1001 is refused)
    edges = [float(i) for i in range(1002)]
    with pytest.raises(RecipeParamsError, match="at most 1001 bin edges"):
        resolve_recipe("stats", "1", {"features": ["x"], "bins": {"x": edges}})
    with pytest.raises(RecipeParamsError, match="at most 1001 bin edges"):
        resolve_recipe("stats", "1", {"features": ["x"], "default_bins": edges})
    resolve_recipe("stats", "1", {"features": ["x"], "bins": {"x": edges[:1001]}})


def test_narrow_bins_around_one_patient_do_not_release_that_patients_bin():
    # the researcher places two edges around one patient's value: the bin of one is withheld, with the
    # smallest other non-empty bin beside it, and nothing in the report pins it
    values = [10.0] * 20 + [50.0] * 30 + [33.3]
    report = run_stats(
        StatsParams(features=["x"], bins={"x": [33.0, 33.5]}, min_cell_count=K),
        {"a": dataset("a", np.array(values)), "b": dataset("b", np.zeros(0)), "c": dataset("c", np.zeros(0))},
    )
    figures = pooled(report)["features"]["x"]
    assert figures["count"] == {"value": 51, "suppressed": False}
    assert [c["suppressed"] for c in figures["histogram"]] == [True, True, False]
    assert figures["histogram"][2]["value"] == 30


# --- noise -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("by_label", "by_site"), [(False, False), (True, False), (True, True)])
def test_one_record_changes_what_a_site_sends_by_at_most_the_declared_sensitivity(
    monkeypatch, by_label, by_site
):
    # the noise is sized to S = sqrt(m (1 + 4F)); a record (observed at one edge, or missing) must change the
    # figures a site hands to the two sums, each in units of its noise scale, by at most S in L2
    rng = np.random.default_rng(7)
    edges = np.asarray(DEFAULT_EDGES)
    n = 200
    X = rng.uniform(edges[0], edges[-1], size=(n, 2))
    y = np.arange(n) % 2
    params = StatsParams(features=["x", "z"], by_label=by_label, by_site=by_site, min_cell_count=1)
    _, half = centre_and_half_width(edges)
    worst = 0.0
    for extra, extra_missing in (([edges[0], edges[-1] - 1e-9], [False, False]), ([0.0, 0.0], [True, False])):
        sent_without = recording_sums(monkeypatch)
        base = {"b": dataset("b", X, y), "c": dataset("c", X, y)}
        run_stats(params, {"a": dataset("a", X, y), **base})
        without = np.concatenate(sent_without["a"])
        sent_with = recording_sums(monkeypatch)
        missing = np.zeros((n + 1, 2), bool)
        missing[n] = extra_missing
        run_stats(params, {"a": dataset("a", np.vstack([X, extra]), np.append(y, 1), missing), **base})
        with_one = np.concatenate(sent_with["a"])
        assert with_one.size == without.size  # k = 1: every cell is released in both, the layouts agree
        counts = sent_with["a"][0].size
        units = np.ones(with_one.size)
        units[counts::2] = half
        units[counts + 1 :: 2] = half * half
        worst = max(worst, float(np.linalg.norm((with_one - without) / units)))
    assert 0 < worst <= sensitivity(params) + 1e-9


def test_each_hospital_adds_the_full_noise_itself():
    # a hospital's guarantee must not rely on the others: with every draw at one standard deviation, three
    # hospitals add three times z S to each count (not z S / sqrt(3) each)
    z = 2.0
    params = StatsParams(features=["x"], noise_multiplier=z, min_cell_count=K)
    std = z * sensitivity(params)
    X = np.linspace(-0.4, 0.4, 200)  # all in the bin [0, 0.5) or [-0.5, 0)
    report = run_stats(params, {s: dataset(s, X) for s in ("a", "b", "c")}, noise=ConstantNoise())
    grid = std / 8
    expected = 600 + 3 * std
    assert abs(pooled(report)["rows"]["value"] - expected) <= 0.5 + 3 * grid / 2
    edges = np.asarray(DEFAULT_EDGES)
    lone = int(np.searchsorted(edges, 2.5, side="right"))  # an empty bin: three times std, noisy count
    assert abs(pooled(report)["features"]["x"]["histogram"][lone]["value"] - 3 * std) <= 0.5 + 3 * grid / 2


# --- what the rule does not do: differencing two studies ---------------------------------------------------


def test_two_studies_whose_bins_differ_by_one_edge_isolate_a_patient_the_rule_does_not_stop_it():
    # docs/statistics.md says the rule holds within one report, not across reports: two exact studies whose
    # grids differ in one edge have every cell at k or more, and their difference still places one patient
    # in the sliver between the edges. Noise is what bounds this; the test shows exactly what holds.
    values = [10.0] * 20 + [33.3] + [50.0] * 30
    data = {
        "a": dataset("a", np.array(values)),
        "b": dataset("b", np.zeros(0)),
        "c": dataset("c", np.zeros(0)),
    }
    first = run_stats(StatsParams(features=["x"], bins={"x": [0.0, 33.0, 100.0]}, min_cell_count=K), data)
    second = run_stats(StatsParams(features=["x"], bins={"x": [0.0, 33.5, 100.0]}, min_cell_count=K), data)
    one = pooled(first)["features"]["x"]["histogram"]
    two = pooled(second)["features"]["x"]["histogram"]
    for hist in (one, two):  # each report on its own obeys the rule: every cell is 0 or at least k
        assert not any(c["suppressed"] for c in hist)
        assert all(c["value"] == 0 or c["value"] >= K for c in hist)
    # [0, 33.5) less [0, 33): one patient in [33, 33.5)
    assert two[1]["value"] - one[1]["value"] == 1
