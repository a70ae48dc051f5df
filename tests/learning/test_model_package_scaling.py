"""Federation-wide standardization from a federated statistics report (recipe ``stats``): the pooled mean and
variance become the spec's ``mean`` and ``scale`` (``scaling_from_statistics``, ``fedhealth model scaling``);
suppressed or absent figures are refused."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fedhealth.cli import app
from fedhealth.core import InputError
from fedhealth.data import STD_EPSILON
from fedhealth.learning import LogRegParams, scaling_from_statistics

runner = CliRunner()
FEATURES = ("age", "chol", "thalach")


def cell(value: float | None) -> dict[str, Any]:
    return {"value": value, "suppressed": value is None}


def report_of(sites: dict[str, np.ndarray]) -> dict[str, Any]:
    """A report in the ``stats`` recipe's released form (docs/statistics.md), from each site's raw rows."""
    pooled = np.concatenate(list(sites.values()))
    features = {
        f: {
            "count": cell(float(pooled.shape[0])),
            "missing": cell(0.0),
            "missing_fraction": cell(0.0),
            "mean": cell(float(pooled[:, j].mean())),
            "variance": cell(float(pooled[:, j].var(ddof=1))),
            "histogram": [],
        }
        for j, f in enumerate(FEATURES)
    }
    return {
        "kind": "federated-statistics",
        "sites": sorted(sites),
        "features": list(FEATURES),
        "bins": {},
        "min_cell_count": 5,
        "noise": None,
        "variance_ddof": 1,
        "strata": [
            {"stratum": {"label": 0, "site": None}, "rows": cell(None), "features": {}},
            {
                "stratum": {"label": None, "site": None},
                "rows": cell(float(len(pooled))),
                "features": features,
            },
        ],
    }


@pytest.fixture
def sites() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a": rng.normal([54, 240, 150], [9, 50, 22], size=(80, 3)),
        "b": rng.normal([50, 220, 140], [8, 45, 25], size=(60, 3)),
    }


def test_the_pooled_mean_and_std_of_the_report_become_the_spec_scaling(sites):
    names, mean, scale = scaling_from_statistics(report_of(sites))
    pooled = np.concatenate(list(sites.values()))
    assert names == list(FEATURES)
    np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(scale, pooled.std(axis=0, ddof=1) + STD_EPSILON, rtol=1e-12)
    names, mean, _ = scaling_from_statistics(report_of(sites), ["thalach", "age"])
    assert names == ["thalach", "age"]
    assert mean == pytest.approx([pooled[:, 2].mean(), pooled[:, 0].mean()], rel=1e-12)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda r: r["strata"][1]["features"]["chol"].update(variance=cell(None)),
            "'chol': its variance is suppressed",
        ),
        (lambda r: r["strata"][1]["features"].pop("age"), "no statistics for feature 'age'"),
        (lambda r: r["strata"].pop(1), "no stratum over every site and label"),
        (lambda r: r.update(variance_ddof=0), "variance_ddof 1"),
        (lambda r: r.pop("strata"), "not a federated statistics report"),
    ],
    ids=["suppressed", "absent-feature", "no-pooled-stratum", "population-variance", "not-a-report"],
)
def test_a_report_without_usable_figures_is_refused(sites, edit, message):
    report = report_of(sites)
    edit(report)
    with pytest.raises(InputError) as err:
        scaling_from_statistics(report)
    assert message in str(err.value)


def test_model_scaling_prints_a_preprocessing_section_a_spec_accepts(sites, tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(report_of(sites)))
    result = runner.invoke(app, ["model", "scaling", str(path)])
    assert result.exit_code == 0, result.output
    section = tomllib.loads(result.stdout)["recipe"]["params"]["preprocessing"]
    _, mean, scale = scaling_from_statistics(report_of(sites))
    assert section == {"standardize": "given", "mean": mean, "scale": scale}  # exact: repr round-trips
    params = LogRegParams.model_validate(
        {"n_features": 3, "feature_names": list(FEATURES), "preprocessing": section}
    )
    assert params.preprocessing is not None
    assert list(params.preprocessing.mean or ()) == mean


def test_model_scaling_on_a_bad_file_is_one_error_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    result = runner.invoke(app, ["model", "scaling", str(tmp_path / "bad.json")])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: ")
    assert "cannot be read as JSON" in result.stderr
    missing = runner.invoke(app, ["model", "scaling", str(tmp_path / "absent.json")])
    assert missing.exit_code == 1
    assert "no such report file" in missing.stderr


def test_a_real_stats_session_on_raw_heart_disease_gives_the_pooled_scaling(heart_data_dir):
    """The workflow docs/model-packages.md describes, end to end in this process: the four hospitals' raw
    values go through a federated statistics session (masked sums only), and its report gives the spec's
    ``mean`` and ``scale``: those of the union of the four files, which no single site could compute."""
    from fedhealth.data import TabularDataset, heart_disease_records
    from fedhealth.learning import StatsParams, run_stats_in_memory

    datasets = {}
    for center in range(4):
        records = heart_disease_records(center, heart_data_dir, download=False)
        X = np.array([[getattr(r, f) for f in FEATURES] for r in records], dtype=float)
        y = np.array([r.disease for r in records])
        datasets[f"h{center}"] = TabularDataset(
            name=f"raw-{center}", X_train=X, y_train=y, X_test=X[:0], y_test=y[:0], feature_names=FEATURES
        )
    bins = {
        "age": [20.0, 40.0, 60.0, 80.0],
        "chol": [0.0, 200.0, 400.0, 700.0],
        "thalach": [50.0, 150.0, 250.0],
    }
    report = run_stats_in_memory(StatsParams(features=list(FEATURES), bins=bins), datasets)
    names, mean, scale = scaling_from_statistics(json.loads(json.dumps(report)))
    pooled = np.concatenate([d.X_train for d in datasets.values()])
    assert names == list(FEATURES)
    np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(scale, pooled.std(axis=0, ddof=1) + STD_EPSILON, rtol=1e-9)
    # and no single site's own figures would have given it
    for dataset in datasets.values():
        assert not np.allclose(dataset.X_train.mean(axis=0), mean, rtol=1e-3)
