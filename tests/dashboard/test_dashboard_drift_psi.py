"""The population stability index of the drift page: known values, zero cells, suppressed cells, reports that
cannot be compared, thresholds."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedhealth.dashboard._drift import (
    FRACTION_FLOOR,
    DriftInputError,
    DriftPolicy,
    DriftThresholds,
    compare_reports,
    psi,
    released_psi,
)


def cell(value: float | None) -> dict[str, Any]:
    return {"value": None, "suppressed": True} if value is None else {"value": value, "suppressed": False}


def report(hists: dict[str | None, list[float | None]], edges: list[float] | None = None) -> dict[str, Any]:
    """A stats report of one feature ``x`` with a histogram per site (None: all sites)."""
    edges = edges or [0.0, 1.0, 2.0]
    return {
        "kind": "federated-statistics",
        "features": ["x"],
        "bins": {"x": edges},
        "strata": [
            {
                "stratum": {"label": None, "site": site},
                "rows": cell(sum(v or 0 for v in hist)),
                "features": {"x": {"histogram": [cell(v) for v in hist]}},
            }
            for site, hist in hists.items()
        ],
    }


def test_psi_of_known_distributions():
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5), rel=1e-12)
    # fractions or counts: the same distribution gives the same index; equal distributions give 0
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(psi([2, 2], [1, 3]))
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0, abs=1e-15)
    # symmetric in its two arguments
    assert psi([1, 2, 7], [4, 4, 2]) == pytest.approx(psi([4, 4, 2], [1, 2, 7]))


def test_zero_cells_are_floored_on_one_side_and_ignored_when_empty_on_both():
    # a bin empty in both adds nothing
    assert psi([50, 0, 50], [25, 0, 75]) == pytest.approx(psi([50, 50], [25, 75]))
    # a bin empty on one side only is floored (finite, large)
    value = psi([100, 0], [50, 50])
    expected = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - FRACTION_FLOOR) * math.log(0.5 / FRACTION_FLOOR)
    assert math.isfinite(value)
    assert value == pytest.approx(expected)


def test_bad_histograms_are_refused_with_a_reason():
    with pytest.raises(DriftInputError, match="2 and 3 bins"):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(DriftInputError, match="non-negative"):
        psi([1, -2], [1, 2])
    with pytest.raises(DriftInputError, match="without any record"):
        psi([0, 0], [1, 2])


def test_suppressed_bins_are_left_out_of_both_reports():
    ref = [cell(40), cell(None), cell(30), cell(30)]
    cur = [cell(20), cell(12), cell(None), cell(60)]
    value, left_out, why = released_psi(ref, cur)
    assert left_out == 2
    assert why == ""
    # only bins 0 and 3 are released in both: the PSI of (40, 30) against (20, 60)
    assert value == pytest.approx(psi([40, 30], [20, 60]))


def test_too_few_released_bins_give_no_psi_and_say_why():
    value, left_out, why = released_psi([cell(40), cell(None), cell(3)], [cell(None), cell(9), cell(30)])
    assert value is None
    assert left_out == 2
    assert "fewer than two bins" in why


def test_compare_reports_rates_each_site_and_feature_against_the_thresholds():
    ref = report({None: [100, 100, 100, 100], "a": [50, 50, 50, 50], "b": [50, 50, 50, 50]})
    cur = report({None: [100, 100, 100, 100], "a": [50, 50, 50, 50], "b": [5, 20, 75, 100]})
    result = compare_reports(ref, cur)
    by_site = {f["site"]: f for f in result["findings"]}
    assert by_site["a"]["level"] == "ok"
    assert by_site["a"]["psi"] == pytest.approx(0.0)
    assert by_site["b"]["level"] == "alert"
    assert by_site["b"]["psi"] > 0.25
    assert result["level"] == "alert"
    # thresholds are configurable: a higher alert threshold makes it a warning
    assert compare_reports(ref, cur, DriftThresholds(warn=0.1, alert=10.0))["level"] == "warn"
    # a whole histogram withheld at a site: no PSI, the reason given, level ok for that finding
    withheld = report({None: [100, 100, 100, 100], "a": [None, None, None, None], "b": [50, 50, 50, 50]})
    skipped = {f["site"]: f for f in compare_reports(ref, withheld)["findings"]}["a"]
    assert skipped["psi"] is None
    assert skipped["skipped"]
    assert skipped["bins_left_out"] == 4


def test_reports_on_other_bins_or_not_reports_cannot_be_compared():
    with pytest.raises(DriftInputError, match="same bins"):
        compare_reports(report({None: [1, 2, 3, 4]}), report({None: [1, 2, 3, 4]}, edges=[0.0, 1.5, 2.0]))
    with pytest.raises(DriftInputError, match="federated statistics"):
        compare_reports({"kind": "model"}, report({None: [1, 2, 3, 4]}))


@pytest.mark.parametrize(("warn", "alert"), [(0.0, 0.25), (0.3, 0.2), (0.1, math.inf), (-1.0, 0.25)])
def test_thresholds_must_be_positive_and_ordered(warn, alert):
    with pytest.raises(DriftInputError, match="0 < warn <= alert"):
        DriftThresholds(warn=warn, alert=alert)


def test_a_dataset_override_replaces_the_default_thresholds_for_that_dataset_only():
    policy = DriftPolicy.parse(DriftThresholds(0.1, 0.25), ["heart-disease=0.05,0.2", " icu.v2 = 0.3 , 0.3 "])
    assert policy.for_dataset("heart-disease") == DriftThresholds(0.05, 0.2)
    assert policy.for_dataset("icu.v2") == DriftThresholds(0.3, 0.3)
    assert policy.for_dataset("breast-cancer") == DriftThresholds(0.1, 0.25)
    assert list(policy.datasets) == ["heart-disease", "icu.v2"]
    # the same PSI is a warning under one dataset's thresholds and fine under another's
    assert policy.for_dataset("heart-disease").level(0.07) == "warn"
    assert policy.for_dataset("breast-cancer").level(0.07) == "ok"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("heart-disease", r"'heart-disease': write DATASET=WARN,ALERT"),
        ("heart-disease=0.1", r"write DATASET=WARN,ALERT"),
        ("=0.1,0.2", r"write DATASET=WARN,ALERT"),
        ("heart-disease=low,0.2", r"WARN and ALERT must be numbers"),
        ("heart-disease=0.3,0.2", r"dataset 'heart-disease': drift thresholds must satisfy 0 < warn"),
        ("heart-disease=0,0.2", r"0 < warn <= alert"),
        ("heart-disease=nan,0.2", r"0 < warn <= alert"),
    ],
)
def test_a_malformed_dataset_override_is_refused_in_one_line(override, message):
    with pytest.raises(DriftInputError, match=message) as caught:
        DriftPolicy.parse(DriftThresholds(), ["ok=0.1,0.2", override])
    assert "\n" not in str(caught.value)


def test_a_dataset_given_twice_is_refused():
    with pytest.raises(DriftInputError, match="'a' are given twice"):
        DriftPolicy.parse(DriftThresholds(), ["a=0.1,0.2", "a=0.2,0.3"])
