"""``fedhealth benchmark boosting`` at a tiny size: it runs both libraries through the real services against
the pooled rows and reports what docs/benchmarks.md quotes (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedhealth.cli import app

pytestmark = pytest.mark.e2e


def test_the_boosting_benchmark_reports_both_libraries_equal_to_pooled_with_their_costs(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "benchmark",
            "boosting",
            "--sites",
            "3",
            "--rows",
            "600",
            "--features",
            "4",
            "--trees",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["sites"], report["rows"], report["features"], report["trees"]) == (3, 600, 4, 2)
    assert [r["library"] for r in report["runs"]] == ["LightGBM", "XGBoost"]
    for run in report["runs"]:
        assert run["identical_to_pooled"], run  # the federated model is the pooled one
        assert run["trees"] == 2
        assert run["ratio"] == pytest.approx(run["federated_s"] / run["pooled_s"])
        assert run["collectives_per_tree"] >= 1
        assert run["bytes_per_site"] > 0
        assert 0 < run["waiting_share"] <= 1
        assert 0.5 <= run["accuracy"] <= 1.0
        # CPU time, from /proc: every process did work during the study, no more than wall time allows
        assert run["pooled_cpu_s"] > 0
        assert run["orchestrator_cpu_s"] > 0
        assert run["site_cpu_s"] > 0
        cpus = report["cpus"]
        assert run["cores_busy"] == pytest.approx(
            (run["orchestrator_cpu_s"] + 3 * run["site_cpu_s"]) / run["federated_s"]
        )
        assert 0 < run["cores_busy"] <= cpus + 0.5  # clock-tick rounding
        # the best ratio the host allows for that CPU: no more than the ratio measured (rounding aside)
        cpu_s = run["orchestrator_cpu_s"] + 3 * run["site_cpu_s"]
        assert run["cpu_bound_ratio"] == pytest.approx(cpu_s / cpus / run["pooled_s"])
        assert run["cpu_bound_ratio"] <= run["ratio"] * 1.1 + 0.5
