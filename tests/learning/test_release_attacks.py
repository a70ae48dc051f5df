"""Attacks on what a site releases in aggregate outside model training: the ``stats`` report (its
minimum-cell-count rule and secondary suppression), the federated-scaling release, and held-out metrics.

The attacker reads released reports only and knows the rule (docs/statistics.md): a cell is released when it
counts no record or at least k, so every suppressed cell of an exact report holds at least one record. Where a
leak is inherent to a documented design choice, the test shows exactly what holds and names the doc.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest

from agent.site_fixtures import RecordingClient, agent, approve, make_home, task
from fedhealth.core import encode_tensors, sha256_hex
from fedhealth.data import FillRule, Imputation, TabularDataset
from fedhealth.learning import (
    STATS_RECIPE,
    InMemorySession,
    SessionContext,
    StatsParams,
    logreg_evaluate,
)
from fedhealth.learning._federated_scaling import run_scaling_site
from fedhealth.learning._stats import DEFAULT_EDGES
from fedhealth.protocol import StudySpec, TaskKind
from support import logreg_recipe

K = 5


def run_stats(params: StatsParams, datasets: dict[str, TabularDataset]) -> dict[str, Any]:
    """One exact stats session among ``datasets``' sites (threads, real masks); the released report."""
    session = InMemorySession(sorted(datasets))

    def program(member: Any) -> Any:
        ctx = SessionContext(site=member.site, seed=0, rng=np.random.default_rng(0), noise=None)
        return STATS_RECIPE.run_site(params, datasets[member.site], member, ctx)

    session.run(program)
    assert session.relay.released is not None
    return STATS_RECIPE.finish(params, session.relay.released)


def dataset(name: str, values: list[float], missing: int = 0) -> TabularDataset:
    """One feature ``x`` (all rows in the training part), the first ``missing`` rows marked missing."""
    X = np.asarray(values, dtype=np.float64)[:, None]
    y = np.zeros(X.shape[0], np.int64)
    imputation = None
    if missing:
        mask = np.zeros(X.shape, bool)
        mask[:missing, 0] = True
        imputation = Imputation(
            features=(0,), rules=(FillRule.MEAN,), missing_train=mask, missing_test=mask[:0]
        )
    return TabularDataset(
        name=name,
        X_train=X,
        y_train=y,
        X_test=X[:0],
        y_test=y[:0],
        feature_names=("x",),
        imputation=imputation,
    )


def empty(name: str) -> TabularDataset:
    return dataset(name, [])


def pooled(report: dict[str, Any]) -> dict[str, Any]:
    [stratum] = [s for s in report["strata"] if s["stratum"] == {"label": None, "site": None}]
    return stratum


def pinned_cells(stratum: dict[str, Any], feature: str) -> list[str]:
    """What an attacker pins down from one released stratum: the feature's suppressed cells (bins, and the
    missing count when the count is withheld) add up to what the shown cells leave of the rows or the count;
    each holds 1 to k-1 records (zeros are released), so a total equal to their number means every one of
    them holds exactly one, and a total of k-1 times their number that each holds k-1. Returns the names of
    the cells so pinned (empty: none)."""
    figures = stratum["features"][feature]
    hist = figures["histogram"]
    hidden = [f"bin {i}" for i, c in enumerate(hist) if c["suppressed"]]
    shown = sum(c["value"] for c in hist if not c["suppressed"])
    if not figures["count"]["suppressed"]:
        total = figures["count"]["value"] - shown
    elif not stratum["rows"]["suppressed"] and len(hidden) < len(hist):
        # count and missing withheld (the observed count is at least k): rows = shown + hidden + missing
        hidden.append("missing")
        total = stratum["rows"]["value"] - shown
    else:
        return []
    return hidden if hidden and total in (len(hidden), len(hidden) * (K - 1)) else []


# --- the minimum-cell-count rule within one report ----------------------------------------------------------


def test_two_bins_of_one_patient_each_are_not_pinned_by_the_count_they_leave():
    # 20 records in one bin, one patient in each of two other bins: both single bins are suppressed, and the
    # shown count minus the shown bin leaves 2 for two cells that each hold at least one record
    values = [0.25] * 20 + [-2.5, 2.5]
    report = run_stats(
        StatsParams(features=["x"], min_cell_count=K),
        {"a": dataset("a", values), "b": empty("b"), "c": empty("c")},
    )
    stratum = pooled(report)
    assert stratum["features"]["x"]["count"] == {"value": 22, "suppressed": False}
    assert pinned_cells(stratum, "x") == []
    bins = stratum["features"]["x"]["histogram"]
    edges = np.asarray(DEFAULT_EDGES)
    for value in (-2.5, 2.5):  # the lone patients' bins stay withheld
        assert bins[int(np.searchsorted(edges, value, side="right"))]["suppressed"] is True
    # the large bin is what is withheld beside them: the empty bins stay released as zeros
    assert [cell["suppressed"] for cell in bins].count(True) == 3
    assert {"value": 0, "suppressed": False} in bins


def test_a_lone_missing_value_and_a_lone_bin_are_not_pinned_by_the_rows_they_leave():
    # the count is withheld (1 missing value, under k); exactly one bin holds one patient: rows minus the
    # shown bins leaves 2 for the missing count and that bin, each at least one
    values = [0.0] + [0.25] * 20 + [2.5]
    report = run_stats(
        StatsParams(features=["x"], min_cell_count=K),
        {"a": dataset("a", values, missing=1), "b": empty("b"), "c": empty("c")},
    )
    stratum = pooled(report)
    assert stratum["rows"] == {"value": 22, "suppressed": False}
    assert stratum["features"]["x"]["count"]["suppressed"] is True
    assert pinned_cells(stratum, "x") == []


def test_the_attacker_model_pins_cells_when_the_rule_leaves_them_so():
    # the control: the attacker above does find a pinned cell in a report that leaves one (one suppressed bin
    # beside a shown count: the first rule of secondary suppression is there to stop exactly this)
    stratum = {
        "rows": {"value": 22, "suppressed": False},
        "features": {
            "x": {
                "count": {"value": 22, "suppressed": False},
                "histogram": [
                    {"value": 21, "suppressed": False},
                    {"value": None, "suppressed": True},
                    {"value": 0, "suppressed": False},
                ],
            }
        },
    }
    assert pinned_cells(stratum, "x") == ["bin 1"]


def test_suppressed_cells_that_add_up_to_more_than_their_number_are_left_as_the_rule_says():
    # two bins of 2 (total 4 for two cells): no cell is pinned, and no extra bin is withheld for it
    values = [0.25] * 20 + [-2.5, -2.5, 2.5, 2.5]
    report = run_stats(
        StatsParams(features=["x"], min_cell_count=K),
        {"a": dataset("a", values), "b": empty("b"), "c": empty("c")},
    )
    stratum = pooled(report)
    hist = stratum["features"]["x"]["histogram"]
    assert sum(c["suppressed"] for c in hist) == 2
    assert pinned_cells(stratum, "x") == []


@pytest.mark.parametrize(
    "values",
    [
        [-2.5, -1.5, -0.75, -0.25, 0.25, 2.5],  # six patients, each alone in a bin
        [-3.5, -2.5, -1.5, -0.75, -0.25, 0.25, 0.75, 1.5, 2.5, 3.5],  # one in every bin of the grid
        [-2.5] * (K - 1) + [2.5] * (K - 1),  # two bins of k-1, nothing else
    ],
    ids=["lone-patients", "one-in-every-bin", "two-bins-of-k-minus-1"],
)
def test_a_histogram_of_small_bins_only_is_not_pinned_by_its_shown_count(values):
    # Every non-empty bin is small and their total pins them (six cells of at least one adding up to 6; two
    # of at most k-1 adding up to 2(k-1)), and there is no other non-empty bin to withhold beside them.
    # Withholding only the bins is not enough: with one patient in each of the grid's bins, a count equal to
    # the number of bins still says that every bin holds one. The feature is withheld as a whole.
    assert len(values) >= K
    report = run_stats(
        StatsParams(features=["x"], min_cell_count=K),
        {"a": dataset("a", values), "b": empty("b"), "c": empty("c")},
    )
    stratum = pooled(report)
    assert stratum["rows"] == {"value": len(values), "suppressed": False}
    figures = stratum["features"]["x"]
    for name in ("count", "missing", "missing_fraction", "mean", "variance"):
        assert figures[name] == {"value": None, "suppressed": True}, name
    assert all(cell == {"value": None, "suppressed": True} for cell in figures["histogram"])
    assert pinned_cells(stratum, "x") == []


def test_two_bins_of_k_minus_one_patients_are_not_pinned_by_the_count_they_leave():
    # 20 records in one bin, k-1 in each of two others: both are suppressed, and the shown count minus the
    # shown bin leaves 2(k-1) for two cells that each hold at most k-1
    values = [0.25] * 20 + [-2.5] * (K - 1) + [2.5] * (K - 1)
    report = run_stats(
        StatsParams(features=["x"], min_cell_count=K),
        {"a": dataset("a", values), "b": empty("b"), "c": empty("c")},
    )
    stratum = pooled(report)
    assert stratum["features"]["x"]["count"] == {"value": len(values), "suppressed": False}
    assert pinned_cells(stratum, "x") == []
    bins = stratum["features"]["x"]["histogram"]
    assert [cell["suppressed"] for cell in bins].count(True) == 3  # the bin of 20 is withheld beside them
    assert stratum["features"]["x"]["mean"]["suppressed"] is False


def test_k_minus_one_missing_values_and_a_bin_of_k_minus_one_are_not_pinned_by_the_rows_they_leave():
    # the count is withheld (k-1 missing values); one bin holds k-1 patients: rows minus the shown bins
    # leaves 2(k-1) for the missing count and that bin, each at most k-1
    values = [0.0] * (K - 1) + [0.25] * 20 + [2.5] * (K - 1)
    report = run_stats(
        StatsParams(features=["x"], min_cell_count=K),
        {"a": dataset("a", values, missing=K - 1), "b": empty("b"), "c": empty("c")},
    )
    stratum = pooled(report)
    assert stratum["rows"] == {"value": len(values), "suppressed": False}
    assert stratum["features"]["x"]["count"]["suppressed"] is True
    assert pinned_cells(stratum, "x") == []


def test_the_attacker_model_pins_cells_at_k_minus_one_when_the_rule_leaves_them_so():
    # the control for the upper bound: two suppressed bins beside a shown count that leaves 2(k-1)
    stratum = {
        "rows": {"value": 20 + 2 * (K - 1), "suppressed": False},
        "features": {
            "x": {
                "count": {"value": 20 + 2 * (K - 1), "suppressed": False},
                "histogram": [
                    {"value": None, "suppressed": True},
                    {"value": 20, "suppressed": False},
                    {"value": None, "suppressed": True},
                ],
            }
        },
    }
    assert pinned_cells(stratum, "x") == ["bin 0", "bin 2"]


# --- the federated-scaling release ------------------------------------------------------------------------


def test_the_federated_scaling_release_holds_the_federations_figures_and_no_sites_own():
    # a site's own count, sum or sum of squares is never in the release: with two of the three sites
    # contributing nothing, the release is the third's figures, so that is what an orchestrator can read when
    # (and only when) the others collude, as docs/statistics.md says of every secure sum
    rows = {
        "a": np.array([[1.0], [2.0], [4.0]]),
        "b": np.array([[10.0], [20.0]]),
        "c": np.array([[-3.0], [7.0], [8.0], [9.0]]),
    }
    datasets = {
        name: TabularDataset(
            name=name,
            X_train=X,
            y_train=np.zeros(len(X), np.int64),
            X_test=X[:0],
            y_test=np.zeros(0, np.int64),
            feature_names=("x",),
        )
        for name, X in rows.items()
    }
    session = InMemorySession(sorted(datasets))
    session.run(lambda member: run_scaling_site(member, datasets[member.site], ["x"]))
    assert session.relay.released is not None
    release = json.loads(session.relay.released)
    assert set(release) == {"kind", "mean", "scale", "rows"}
    everything = np.concatenate(list(rows.values()))
    assert release["rows"] == everything.shape[0]
    assert release["mean"] == [pytest.approx(float(everything.mean()), abs=1e-9)]
    for X in rows.values():  # no site's own mean is what was released
        assert release["mean"][0] != pytest.approx(float(X.mean()), abs=1e-6)


# --- held-out metrics ---------------------------------------------------------------------------------------


def test_a_crafted_model_evaluated_on_one_held_out_patient_gets_no_figure_of_it_below_k(tmp_path):
    # The attack: a model whose weights single out one feature turns the loss on a lone held-out row into
    # that row's value (loss = log(1 + exp(-x)) for label 1), as the recipe computes it.
    secret = 0.37
    crafted = {"weight": np.array([0.0, 1.0], np.float32), "bias": np.array([0.0], np.float32)}
    result = logreg_evaluate(crafted, np.array([[5.0, secret]]), np.array([1]))
    assert -np.log(np.expm1(result.loss)) == pytest.approx(secret, abs=1e-5)
    # What a site releases of it (docs/privacy.md, held-out metrics; docs/governance.md, step 10): no figure
    # computed from fewer than its k held-out patients. 40 patients, one held out (no stratification: the
    # label has a class of two), the orchestrator's crafted model sent for evaluation and for training.
    rows = [f"p{i:04d},{i % 7 / 3:.3f},{(i * 37 % 11) / 10:.2f},{int(i < 2)}" for i in range(40)]
    (tmp_path / "d.csv").write_text("patient_id,age,marker,label\n" + "\n".join(rows) + "\n")
    uri = f"file://{tmp_path / 'd.csv'}?label=label&id=patient_id&test_fraction=0.025"
    spec = StudySpec.model_validate(
        {
            "name": "crafted",
            "dataset": "cohort",
            "recipe": logreg_recipe(2, learning_rate=0.5),
            "rounds": 1,
            "train_sites": ["hospital-a"],
        }
    )
    blob = encode_tensors(crafted)
    model = {"model_digest": sha256_hex(blob), "model_inline": base64.b64encode(blob).decode()}

    def attack(policy: str) -> RecordingClient:
        home = make_home(tmp_path / f"site-{len(policy)}")
        home.policy_path.write_text(policy)
        approve(home, spec)
        site, client = agent(home, {"cohort": uri})
        site.handle(task(spec, task_id="tk-train").model_copy(update=model))
        site.handle(task(spec, kind=TaskKind.EVALUATE, round=2, task_id="tk-eval").model_copy(update=model))
        return client

    client = attack("")  # the default k = 10
    (trained,) = client.results  # the site still trains on its 39 training patients
    assert trained.metrics is not None
    assert trained.metrics.num_samples == 39
    assert (trained.metrics.num_eval_samples, trained.metrics.eval_loss) == (0, None)
    assert (trained.metrics.accuracy, trained.metrics.auc) == (None, None)
    assert client.failures == []
    (answered,) = client.evaluations  # answered, with nothing computed from the lone held-out patient
    assert answered.metrics is not None
    assert (answered.metrics.num_eval_samples, answered.metrics.eval_loss) == (0, None)
    assert (answered.metrics.accuracy, answered.metrics.auc) == (None, None)
    # control: a site whose steward set k = 1 releases the loss the attack inverts
    client = attack("min_cohort_k = 1\n")
    (evaluated,) = client.evaluations
    assert evaluated.metrics is not None
    assert evaluated.metrics.num_eval_samples == 1
    assert evaluated.metrics.eval_loss is not None
