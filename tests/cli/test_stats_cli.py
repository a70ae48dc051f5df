"""``fedhealth stats show``: a released report as a table (suppressed cells as ``<k``), and bad report files
refused with one error line. (``stats run`` through the services: tests/e2e/test_stats_services.py.)"""

from __future__ import annotations

import json

import numpy as np

from fedhealth.data import TabularDataset
from fedhealth.learning import run_stats_in_memory
from support import cli, one_error


def site(name: str, n: int) -> TabularDataset:
    X = np.column_stack([np.linspace(-2.5, 2.5, n)])
    y = np.arange(n) % 2
    return TabularDataset(name=name, X_train=X, y_train=y, X_test=X[:0], y_test=y[:0], feature_names=("x",))


def test_stats_show_prints_every_stratum_with_suppressed_cells_as_under_k(tmp_path):
    datasets = {"a": site("a", 40), "b": site("b", 40), "c": site("c", 3)}
    report = run_stats_in_memory({"features": ["x"], "by_site": True, "min_cell_count": 5}, datasets)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    result = cli("stats", "show", path)
    assert result.exit_code == 0, result.output
    assert "federated statistics over 3 sites (k = 5, exact)" in result.stdout
    assert "site=c" in result.stdout
    assert "<5" in result.stdout
    assert "83" in result.stdout  # every record together
    assert "x: -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3" in result.stdout


def test_stats_show_refuses_a_missing_file_a_non_json_file_and_another_json(tmp_path):
    assert "no such file" in one_error(cli("stats", "show", tmp_path / "absent.json"), 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not JSON" in one_error(cli("stats", "show", bad), 1)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"accuracy": 0.8}))
    assert "not a statistics report" in one_error(cli("stats", "show", other), 1)
