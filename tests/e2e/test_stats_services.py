"""Federated statistics through the real services: four agent processes holding the four Fed-Heart-Disease
files, the orchestrator over HTTPS, ``fedhealth stats run`` as a researcher runs it.

Without noise the released statistics equal the pooled ones computed on the union of the four files (1e-9)
and, bit for bit, the in-process run of the same spec; cells under k are suppressed. With noise every site's
ledger is charged the session's Gaussian release, and a site whose budget cannot pay refuses the next one.

The same federation runs a training study with ``standardize = "federated"`` (its scaling pre-step is a
collective session of the same kind; docs/statistics.md, "Federated standardization").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import fedhealth
from fedhealth.cli import app
from fedhealth.core import decode_tensors
from fedhealth.data import (
    HEART_DISEASE_FEATURES,
    STD_EPSILON,
    heart_disease_records,
    load_heart_disease,
    open_dataset,
)
from fedhealth.learning import (
    LOGREG_RECIPE,
    LogRegParams,
    StatsParams,
    logreg_predict_proba,
    scaling_sums,
)
from fedhealth.learning._stats import count_vector, site_columns, split_limbs, strata
from fedhealth.privacy import DpPlan, GaussianRelease, epsilon
from fedhealth.protocol import (
    RecipeSpec,
    ReleasedScaling,
    SecureAggregationSpec,
    StudySpec,
    StudyStatus,
    TaskKind,
)
from fedhealth.runtime import effective_recipe, recipe_spec, run_collective_in_memory, run_study_in_memory
from fedhealth.secagg import encode_fixed
from fedhealth.sim import LocalFederation
from support import heart_data_dir

pytestmark = pytest.mark.e2e
SITES = {"cleveland": 0, "hungary": 1, "switzerland": 2, "va": 3}
EXACT = "heart-disease"  # no budget: exact statistics run
PRIVATE = "heart-disease-dp"  # the same files under a budget
DELTA = 1e-5
SIGMA = 4.0
CAPTURE_DIR = Path(__file__).with_name("relay_capture")


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("relay") / "relay.jsonl"


@pytest.fixture(scope="module")
def fed(tmp_path_factory, capture):
    folder = heart_data_dir()
    # the orchestrator's relay records what it was handed (tests/e2e/relay_capture/sitecustomize.py)
    path = os.pathsep.join(p for p in (str(CAPTURE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "FEDHEALTH_TEST_RELAY_CAPTURE": str(capture)}
    with LocalFederation(tmp_path_factory.mktemp("stats"), log_level="warning", env=env) as fed:
        fed.start_orchestrator()
        for site, center in SITES.items():
            fed.add_site(site)
            uri = f"builtin://heart-disease/{center}"
            fed.start_agent(site, {EXACT: uri, PRIVATE: uri}, extra_args=["--data-dir", str(folder)])
        fed.wait_for_sites(sorted(SITES))
        yield fed


def stats_spec(fed: LocalFederation, name: str, dataset: str, **params: Any) -> StudySpec:
    sites = sorted(SITES)
    return StudySpec(
        name=name,
        dataset=dataset,
        recipe=RecipeSpec(name="stats", params=params),
        rounds=1,
        train_sites=sites,
        round_deadline_s=180,
        secure_aggregation=SecureAggregationSpec(site_keys=fed.site_keys(sites)),
    )


def test_stats_run_releases_the_pooled_statistics_of_the_four_files_and_suppresses_cells_under_k(
    fed, tmp_path, capture
):
    capture.unlink(missing_ok=True)
    features = ["age", "sex", "chol", "thalach", "oldpeak"]
    spec = stats_spec(fed, "describe-heart", EXACT, features=features, by_label=True, min_cell_count=5)
    path = tmp_path / "stats.json"
    path.write_text(spec.model_dump_json())
    for site in SITES:
        fed.approve(site, spec)  # each steward approves the spec's hash before the researcher submits it
    out = tmp_path / "released.json"
    result = CliRunner().invoke(
        app,
        [
            "stats",
            "run",
            str(path),
            "--out",
            str(out),
            "--credential",
            str(fed.home.admin_credential),
            "--orchestrator",
            str(fed.url),
            "--signing-key",
            str(fed.workdir / "owner.key"),
            "--timeout",
            "240",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "federated statistics over 4 sites (k = 5, exact)" in result.stdout
    assert "<5" in result.stdout  # a suppressed cell shows as under k
    report = json.loads(out.read_text())

    datasets = {s: load_heart_disease(c, heart_data_dir(), download=False) for s, c in SITES.items()}
    X = np.concatenate([np.concatenate([d.X_train, d.X_test]) for d in datasets.values()])
    y = np.concatenate([np.concatenate([d.y_train, d.y_test]) for d in datasets.values()])
    names = list(datasets["va"].feature_names)
    edges = np.asarray(report["bins"]["age"])
    suppressed = 0
    for stratum in report["strata"]:
        label = stratum["stratum"]["label"]
        rows = np.ones(y.size, bool) if label is None else y == label
        assert stratum["rows"] == {"value": int(rows.sum()), "suppressed": False}
        for feature in features:
            values = X[rows, names.index(feature)]
            figures = stratum["features"][feature]
            assert figures["count"]["value"] == values.size
            assert figures["mean"]["value"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-9)
            assert figures["variance"]["value"] == pytest.approx(values.var(ddof=1), rel=1e-9, abs=1e-9)
            expected = np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)
            hidden = 0
            for cell, count in zip(figures["histogram"], expected, strict=True):
                if 0 < count < 5:
                    assert cell == {"value": None, "suppressed": True}
                if cell["suppressed"]:
                    hidden += 1
                else:
                    assert cell == {"value": int(count), "suppressed": False}
            assert hidden != 1  # one hidden bin would be the count minus the others
            suppressed += hidden
    assert suppressed > 0

    in_memory = run_collective_in_memory(spec, datasets)
    assert report["strata"] == in_memory["strata"]  # bit for bit: the same exact sums

    # what the orchestrator was handed for the first sum (the counts): every site's vector masked in every
    # coordinate it recorded. In clear the first coordinates would be the counts' top limbs, zeros.
    params = StatsParams.model_validate(spec.recipe.params)
    layout = strata(params, tuple(sorted(SITES)))
    records = [json.loads(line) for line in capture.read_text().splitlines() if line.strip()]
    # call 1 is the checked sums' key, sealed by the leader for each site; call 2 the counts
    sealed = [r for r in records if r["event"] == "received" and r["op"] == "SEAL" and r["index"] == 1]
    assert sorted(r["site"] for r in sealed) == sorted(SITES)
    first_sum = [r for r in records if r["event"] == "received" and r["op"] == "SUM" and r["index"] == 2]
    assert sorted(r["site"] for r in first_sum) == sorted(SITES)
    total = 0.0
    for record in first_sum:
        local = count_vector(params, site_columns(params, datasets[record["site"]]), record["site"], layout)
        total += local[0]
        clear = encode_fixed(split_limbs(local, len(SITES)), len(SITES))[:16].tolist()
        assert not any(a == b for a, b in zip(record["head"], clear, strict=True))
    assert total == report["strata"][0]["rows"]["value"]  # the clear vectors compared are the sites' own


def test_noisy_stats_charge_every_sites_ledger_and_a_spent_budget_refuses_the_next_session(fed):
    one = epsilon(DpPlan.of(GaussianRelease(noise_multiplier=SIGMA)), delta=DELTA)
    two = epsilon(DpPlan.of(GaussianRelease(noise_multiplier=SIGMA, count=2)), delta=DELTA)
    for site in SITES:
        fed.set_budget(site, PRIVATE, (one + two) / 2, DELTA)  # one session fits, a second does not
    params: dict[str, Any] = {"features": ["age", "chol"], "noise_multiplier": SIGMA}
    first = fed.create_study(stats_spec(fed, "noisy-1", PRIVATE, **params))
    final = fed.wait_for_study(first.study_id, timeout=240, interval=0.2)
    assert final.status is StudyStatus.COMPLETED, final.reason
    released = final.rounds[0].metrics or {}
    assert released["noise"]["noise_multiplier"] == SIGMA
    for site in SITES:
        statement = fed.budget_ledger(site).statement(PRIVATE)
        assert statement.spent_epsilon == pytest.approx(one, rel=1e-6)
        [study] = statement.studies
        assert study.study_id == first.study_id

    second = fed.create_study(stats_spec(fed, "noisy-2", PRIVATE, **params))
    refused = fed.wait_for_study(second.study_id, timeout=240, interval=0.2)
    assert refused.status is StudyStatus.FAILED
    assert "budget_exceeded" in (refused.reason or "")
    for site in SITES:  # nothing more was charged
        assert fed.budget_ledger(site).statement(PRIVATE).spent_epsilon == pytest.approx(one, rel=1e-6)


RAW_COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak")
PARAMS = LogRegParams.model_validate(
    {
        "n_features": 13,
        "learning_rate": 0.5,
        "feature_names": list(HEART_DISEASE_FEATURES),
        "preprocessing": {
            "standardize": "federated",
            "categorical": {
                "cp": {"categories": [1, 2, 3, 4], "features": ["cp_2", "cp_3", "cp_4"]},
                "restecg": {"categories": [0, 1, 2], "features": ["restecg_1", "restecg_2"]},
            },
        },
        "label_meaning": "angiographic heart disease (num > 0)",
    }
)


@pytest.fixture(scope="module")
def training_data():
    return {s: open_dataset(f"builtin://heart-disease/{c}", heart_data_dir()) for s, c in SITES.items()}


def raw_csv(path: Path, center: int, ids: tuple[str, ...]) -> None:
    by_id = {r.patient_id: r for r in heart_disease_records(center, heart_data_dir(), download=False)}
    rows = [
        {"patient_id": i, **{c: getattr(by_id[i], c) for c in RAW_COLUMNS}, "disease": by_id[i].disease}
        for i in ids
    ]
    pd.DataFrame(rows).to_csv(path, index=False)


def numbers(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [float(value)]
    return []


def test_a_federated_scaling_study_trains_on_the_pooled_scaling_and_exports_a_raw_row_model(
    fed, training_data, capture, tmp_path
):
    """``standardize = "federated"`` (docs/statistics.md): round 0 releases the pooled training rows'
    scaling, bit for bit the in-process run's; the relay held every site's [count, sum, sum of squares]
    masked in every coordinate it recorded and the stored result holds only the totals; the exported
    package predicts raw rows as the sites' own evaluation path does."""
    capture.unlink(missing_ok=True)
    datasets = training_data
    sites = sorted(SITES)
    spec = StudySpec(
        name="hd-federated-scaling",
        dataset=EXACT,
        recipe=recipe_spec(LOGREG_RECIPE, PARAMS),
        rounds=2,
        train_sites=sites,
        min_sites=len(sites),
        round_deadline_s=180.0,
        seed=3,
        secure_aggregation=SecureAggregationSpec(site_keys=fed.site_keys(sites)),
    )
    study = fed.create_study(spec)
    final = fed.wait_for_study(study.study_id, timeout=300, interval=0.2)
    assert final.status is StudyStatus.COMPLETED, final.reason
    assert [(r.number, r.kind) for r in final.rounds] == [
        (0, TaskKind.COLLECTIVE),
        (1, TaskKind.TRAIN),
        (2, TaskKind.TRAIN),
        (3, TaskKind.EVALUATE),
    ]

    # round 0 released the pooled training rows' scaling, the in-process run's bit for bit
    pre_step = final.rounds[0]
    assert pre_step.metrics is not None
    assert set(pre_step.metrics) == {"scaling", "session"}
    released = ReleasedScaling.model_validate(pre_step.metrics["scaling"])
    raw = {s: d.X_train * d.scaling.std + d.scaling.mean for s, d in datasets.items()}
    pooled = np.concatenate(list(raw.values()))
    np.testing.assert_allclose(released.mean, pooled.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(released.scale, pooled.std(axis=0, ddof=1) + STD_EPSILON, rtol=1e-9)
    assert released.rows == pooled.shape[0]
    in_memory = run_study_in_memory(spec, datasets)
    assert in_memory.scaling == released

    # what the orchestrator was handed: every site's figures masked in every coordinate recorded (in clear
    # the first coordinates would be the counts' top limbs, zeros), and nothing of one site stored
    records = [json.loads(line) for line in capture.read_text().splitlines() if line.strip()]
    sums = [r for r in records if r["event"] == "received" and r["op"] == "SUM"]
    assert sorted(r["site"] for r in sums) == sites  # one sum per site: the pre-step's
    local = {s: scaling_sums(raw[s], 13) for s in sites}
    for record in sums:
        clear = encode_fixed(split_limbs(local[record["site"]], len(sites)), len(sites))[:16].tolist()
        assert not any(a == b for a, b in zip(record["head"], clear, strict=True))
    # the stored result: the release (besides the session's call count), no task's own figures
    stored = numbers(pre_step.metrics["scaling"])
    for s in sites:
        assert not set(local[s].tolist()) & set(stored), f"a figure of {s} is in round 0's stored result"
    assert all(t.metrics is None for t in pre_step.tasks)

    # the package records the released scaling and predicts raw rows as the sites evaluated them
    out = tmp_path / "package"
    admin = ["--credential", str(fed.home.admin_credential), "--orchestrator", str(fed.url)]
    result = CliRunner().invoke(app, ["model", "export", final.study_id, "--out", str(out), *admin])
    assert result.exit_code == 0, result.output
    loaded = fedhealth.load_model(out)
    assert loaded.metadata["preprocessing"]["standardize"] == "federated"
    assert loaded.metadata["preprocessing"]["mean"] == released.mean
    model, _ = decode_tensors(fed.model_bytes(final.study_id))
    trained = LogRegParams.model_validate(effective_recipe(spec.recipe, released).params)
    evaluation = fed.report(final.study_id)["evaluation"]  # a secure study's: sums over the sites
    correct = rows = 0
    for site, dataset in datasets.items():
        csv = tmp_path / f"{site}.csv"
        raw_csv(csv, SITES[site], dataset.patient_ids_test)
        frame = pd.read_csv(csv)
        predicted = loaded.predict_proba(frame)
        assert trained.preprocessing is not None
        at_site = logreg_predict_proba(model, trained.preprocessing.apply(dataset, dataset.X_test))
        np.testing.assert_allclose(predicted, at_site, rtol=0, atol=1e-12)
        correct += int(((predicted > 0.5) == frame["disease"].to_numpy()).sum())
        rows += len(frame)
    assert evaluation["num_eval_samples"] == rows
    assert evaluation["pooled_accuracy"] == correct / rows
