"""Federated LightGBM through the real services: four Fed-Heart-Disease agents as processes, the orchestrator
over HTTPS, the session's relay instrumented from outside (``relay_capture``) to record what it held."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import onnxruntime
import pandas as pd
import pytest
import xgboost
from typer.testing import CliRunner

import fedhealth
from fedhealth.cli import app
from fedhealth.data import load_heart_disease, open_dataset
from fedhealth.learning import (
    LIGHTGBM_RECIPE,
    LightGbmModel,
    LightGbmParams,
    PackageError,
    XGBoostModel,
    XGBoostParams,
    train_pooled,
    train_pooled_xgboost,
)
from fedhealth.learning._lightgbm import cell_counts
from fedhealth.learning._survival import harrell_c
from fedhealth.orchestrator._report import report_markdown
from fedhealth.protocol import RecipeSpec, SecureAggregationSpec, StudySpec, StudyStatus, TaskKind, TaskStatus
from fedhealth.runtime import run_collective_in_memory
from fedhealth.secagg import encode_fixed
from fedhealth.sim import LocalFederation
from support import heart_data_dir

pytestmark = pytest.mark.e2e
SITES = ["center-0", "center-1", "center-2", "center-3"]
CAPTURE_DIR = Path(__file__).with_name("relay_capture")


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return heart_data_dir()


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("relay") / "relay.jsonl"


@pytest.fixture(scope="module")
def triage(tmp_path_factory) -> dict[str, Path]:
    """A small CSV per site (three features, labels 0 and 1), registered as dataset ``triage``."""
    folder = tmp_path_factory.mktemp("triage")
    files = {}
    for i, site in enumerate(SITES):
        files[site] = folder / f"{site}.csv"
        _write_triage(files[site], seed=i)
        _write_survival(_survival_csv(files[site]), seed=i)
        _write_severity(_severity_csv(files[site]), seed=i)
    return files


def _severity_csv(triage: Path) -> Path:
    return triage.with_name(f"{triage.stem}-severity.csv")


def _write_severity(path: Path, *, seed: int) -> None:
    """Rows whose label is a level 0, 1 or 2 of a noisy score (a triage level), declared ``classes=3``."""
    rng = np.random.default_rng(200 + seed)
    lines = ["x1,x2,x3,level"]
    for _ in range(80):
        x = rng.normal(size=3)
        score = x[0] + 0.5 * x[1] + rng.normal(scale=0.5)
        lines.append(f"{x[0]:.4f},{x[1]:.4f},{x[2]:.4f},{int(np.digitize(score, [-0.6, 0.6]))}")
    path.write_text("\n".join(lines) + "\n")


def _survival_csv(triage: Path) -> Path:
    return triage.with_name(f"{triage.stem}-survival.csv")


def _write_survival(path: Path, *, seed: int) -> None:
    """Survival rows: three features, a time (months) and an event indicator, a baseline hazard per site."""
    rng = np.random.default_rng(100 + seed)
    lines = ["x1,x2,x3,months,event"]
    for _ in range(90):
        x = rng.normal(size=3)
        event_time = rng.exponential(1 / np.exp(0.9 * x[0] - 0.4 * x[1])) * (20 + 5 * seed)
        censor = rng.uniform(0, 60)
        months = max(min(event_time, censor), 0.05)
        lines.append(f"{x[0]:.4f},{x[1]:.4f},{x[2]:.4f},{months:.2f},{int(event_time <= censor)}")
    path.write_text("\n".join(lines) + "\n")


def _write_triage(path: Path, *, seed: int, third_class_row: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    lines = ["x1,x2,x3,y"]
    for row in range(60):
        x = rng.normal(size=3)
        label = 2 if row == third_class_row else int(x[0] + rng.normal() > 0)
        lines.append(f"{x[0]:.4f},{x[1]:.4f},{x[2]:.4f},{label}")
    path.write_text("\n".join(lines) + "\n")


def _datasets(site: str, triage: dict[str, Path]) -> dict[str, str]:
    return {
        "heart-disease": f"builtin://heart-disease/{SITES.index(site)}",
        "triage": f"file://{triage[site]}?label=y",
        "survival": f"file://{_survival_csv(triage[site])}?label=event&time=months",
        "severity": f"file://{_severity_csv(triage[site])}?label=level&classes=3",
    }


@pytest.fixture(scope="module")
def fed(tmp_path_factory, capture, data_dir, triage):
    path = os.pathsep.join(p for p in (str(CAPTURE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "FEDHEALTH_TEST_RELAY_CAPTURE": str(capture)}
    with LocalFederation(tmp_path_factory.mktemp("boosting"), env=env, log_level="warning") as fed:
        fed.start_orchestrator()
        for site in SITES:
            fed.add_site(site)
            fed.start_agent(site, _datasets(site, triage), extra_args=["--data-dir", str(data_dir)])
        fed.wait_for_sites(SITES)
        yield fed


def _spec(fed: LocalFederation, name: str, params: dict[str, Any], timeout_s: float) -> StudySpec:
    return StudySpec(
        name=name,
        dataset="heart-disease",
        recipe=RecipeSpec(name="lightgbm", params=params),
        rounds=1,
        train_sites=SITES,
        round_deadline_s=600,
        secure_aggregation=SecureAggregationSpec(site_keys=fed.site_keys(SITES), stage_timeout_s=timeout_s),
    )


def _records(capture: Path) -> list[dict[str, Any]]:
    if not capture.exists():
        return []
    return [json.loads(line) for line in capture.read_text().splitlines() if line.strip()]


def _small(value: int) -> bool:
    """A fixed-point number a clear histogram, count or split record would hold (|x| < 2^10 at 2^-40)."""
    signed = value - (1 << 64) if value >= 1 << 63 else value
    return abs(signed) < 1 << 50


def test_federated_lightgbm_through_the_services_is_the_pooled_model_and_the_relay_holds_only_masked_sums(
    fed, capture, data_dir
):
    capture.unlink(missing_ok=True)
    params = {"n_features": 13, "num_rounds": 8, "num_leaves": 6}
    spec = _spec(fed, "lightgbm-heart", params, timeout_s=60)
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=300, interval=0.2)
    assert final.status is StudyStatus.COMPLETED, final.reason
    [session] = final.rounds
    assert session.kind is TaskKind.COLLECTIVE
    assert {t.status for t in session.tasks} == {TaskStatus.COMPLETED}
    result = session.metrics or {}
    assert result["trees"] == 8
    assert result["sites"] == 4
    assert 0.6 < result["accuracy"] <= 1.0
    assert 0.0 < result["mean_client_accuracy"] <= 1.0
    # the study report holds the session's figures and the features by gain, not the model itself
    report = fed.report(final.study_id)
    assert report["collective"]["result"]["feature_importance"] == result["feature_importance"]
    assert report["collective"]["result"]["accuracy"] == result["accuracy"]
    assert "model" not in report["collective"]["result"]
    top = result["feature_importance"][0]
    assert f"| {top['feature']} | " in report_markdown(report).split("### Feature importance")[1]

    centers = [load_heart_disease(c, data_dir, download=False) for c in range(4)]
    model = LightGbmModel.from_result(result)
    pooled = train_pooled(LightGbmParams(**params), centers)
    assert model.model_text.split("end of trees")[0] == pooled.model_text.split("end of trees")[0]
    X = np.concatenate([c.X_test for c in centers])
    assert np.array_equal(model.predict(X), pooled.predict(X))
    in_memory = run_collective_in_memory(spec, dict(zip(SITES, centers, strict=True)), call_timeout_s=120)
    assert in_memory["model"] == result["model"]  # the services compute what the in-process runner does
    exported = LIGHTGBM_RECIPE.export(LightGbmParams(**params), result)
    assert bytes(exported.tensors["model"]).decode() == result["model"]

    # what the orchestrator held: sums (masked vectors) and the final broadcast, nothing else
    records = _records(capture)
    ops = {r["op"] for r in records if r["event"] == "received"}
    assert ops <= {"SETUP", "SEAL", "SUM", "BROADCAST", "END"}
    sums = [r for r in records if r["event"] == "received" and r["op"] == "SUM" and len(r["head"]) >= 4]
    assert len(sums) > 4 * 8 * 5  # bins, per tree the root, per split step the histograms (with counts)
    for record in sums:  # a clear vector would be small fixed-point numbers; a masked one is uniform
        assert not all(_small(v) for v in record["head"]), record
    # the first sum (after the group secret's SEAL) is the grid counts, a checked sum: each site's masked
    # vector shares no coordinate with its clear counts
    lp = LightGbmParams(**params)
    low, high = zip(*lp.ranges(), strict=True)
    for site, center in zip(SITES, centers, strict=True):
        clear = encode_fixed(cell_counts(center.X_train, low, high, lp.grid_cells).reshape(-1), 4)
        [seal] = [r for r in records if r["event"] == "received" and r["index"] == 1 and r["site"] == site]
        assert seal["op"] == "SEAL"
        [first] = [r for r in records if r["event"] == "received" and r["index"] == 2 and r["site"] == site]
        assert first["op"] == "SUM"
        assert len(first["head"]) == 16
        assert not any(a == b for a, b in zip(first["head"], clear[:16].tolist(), strict=True))


def test_federated_xgboost_through_the_services_is_the_pooled_model(fed, capture, data_dir):
    capture.unlink(missing_ok=True)
    params = {"n_features": 13, "num_rounds": 6, "max_depth": 3}
    spec = _spec(fed, "xgboost-heart", params, timeout_s=60).model_copy(
        update={"recipe": RecipeSpec(name="xgboost", params=params)}
    )
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=300, interval=0.2)
    assert final.status is StudyStatus.COMPLETED, final.reason
    result = final.rounds[0].metrics or {}
    centers = [load_heart_disease(c, data_dir, download=False) for c in range(4)]
    model = XGBoostModel.from_result(result)
    pooled = train_pooled_xgboost(XGBoostParams(**params), centers)
    X = np.concatenate([c.X_test for c in centers])
    assert np.array_equal(model.predict(X), pooled.predict(X))
    assert (
        json.loads(model.model_json)["learner"]["gradient_booster"]["model"]["trees"]
        == (json.loads(pooled.model_json)["learner"]["gradient_booster"]["model"]["trees"])
    )
    records = _records(capture)
    ops = {r["op"] for r in records if r["event"] == "received"}
    assert ops <= {"SETUP", "SEAL", "SUM", "BROADCAST", "END"}
    sums = [r for r in records if r["event"] == "received" and r["op"] == "SUM" and len(r["head"]) >= 4]
    for record in sums:
        assert not all(_small(v) for v in record["head"]), record


def _cli(fed: LocalFederation, *args: object) -> Any:
    admin = ["--credential", fed.home.admin_credential, "--orchestrator", fed.url]
    return CliRunner().invoke(app, [str(a) for a in (*args, *admin)])


@pytest.mark.parametrize(
    ("recipe", "params", "native"),
    [
        ("lightgbm", {"num_rounds": 6, "num_leaves": 6}, "model.txt"),
        ("xgboost", {"num_rounds": 5, "max_depth": 3}, "model.json"),
    ],
)
def test_an_exported_boosting_model_predicts_raw_rows_as_the_federated_model_does(
    fed, data_dir, tmp_path, recipe, params, native
):
    centers = [load_heart_disease(c, data_dir, download=False) for c in range(4)]
    names = list(centers[0].feature_names)
    params = {"n_features": 13, "feature_names": names, "label_meaning": "heart disease", **params}
    spec = _spec(fed, f"{recipe}-export", params, timeout_s=60).model_copy(
        update={"recipe": RecipeSpec(name=recipe, params=params)}
    )
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=300, interval=0.2)
    assert final.status is StudyStatus.COMPLETED, final.reason
    result = final.rounds[0].metrics or {}

    out = tmp_path / "package"
    exported = _cli(fed, "model", "export", final.study_id, "--out", out, "--json")
    assert exported.exit_code == 0, exported.output
    metadata = json.loads(exported.output)
    assert set(metadata["files"]) == {"result.json", native, "model.onnx"}
    assert metadata["recipe"] == {"name": recipe, "version": "1"}
    assert metadata["feature_names"] == names
    assert metadata["label"] == {"positive_class": 1, "meaning": "heart disease"}
    assert metadata["spec_hash"] == final.spec_hash
    assert metadata["privacy"] is None  # no differential privacy in this study: the package says so
    assert set(metadata["provenance"]["sites"]) == set(SITES)
    assert (out / native).read_text() == result["model"]  # the library's own model file, as released

    # the package, loaded with the library alone, predicts the sites' rows as the federated model does
    X = np.concatenate([c.X_test for c in centers])
    frame = pd.DataFrame(X[:, ::-1], columns=names[::-1])  # columns are found by name
    package = fedhealth.load_model(out)
    ours = package.predict_proba(frame, assume_standardized=True)
    model = (LightGbmModel if recipe == "lightgbm" else XGBoostModel).from_result(result)
    assert np.array_equal(ours, model.predict(X))
    if recipe == "lightgbm":
        native_model = lightgbm.Booster(model_file=str(out / native))
        codes = model.binning.codes(X)
        assert np.array_equal(native_model.predict(codes), ours)
    else:
        native_model = xgboost.Booster()
        native_model.load_model(str(out / native))
        assert np.array_equal(native_model.predict(xgboost.DMatrix(model.binning.codes(X))), ours)

    # the ONNX file (binning and trees in one graph) takes the same rows and agrees to 1e-5
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"features": X})[-1][:, 1], ours, rtol=0, atol=1e-5)

    # an edited model file is refused, not applied
    (out / native).write_text(result["model"].replace("1", "2", 1))
    with pytest.raises(PackageError, match="was modified"):
        fedhealth.load_model(out)


def _refused_before_training(fed: LocalFederation, capture: Path, final: Any, refusing: list[str]) -> None:
    """The study failed on the refusing sites' ``dataset_invalid`` in one line, before any collective call
    carried anything of a site's data, and no site's ledger holds anything for it."""
    assert final.status is StudyStatus.FAILED
    assert "\n" not in (final.reason or "")
    [session] = final.rounds
    invalid = "dataset_invalid: the site's dataset does not fit the study (format, schema or values)"
    assert invalid in (final.reason or "")
    reasons = {t.site: t.reason or "" for t in session.tasks}
    # the first site to refuse ends the session; the others' tasks end with it, naming that refusal
    assert any(reasons[site] == invalid for site in refusing), reasons
    assert all(invalid in reason for reason in reasons.values()), reasons
    assert not [r for r in _records(capture) if r["op"] in ("SUM", "BROADCAST")]  # nothing was computed
    assert (session.metrics or {}).get("model") is None
    for site in SITES:  # nothing reserved, nothing charged
        ledger = fed.budget_ledger(site)
        assert ledger.pending() == []
        assert all(ledger.spent(budget.dataset) == 0 for budget in ledger.budgets())


def test_a_raw_value_study_over_standardizing_connectors_exports_a_package_that_scores_the_csv_rows(
    fed, triage, tmp_path
):
    # each site's file connector standardizes its CSV with the site's own statistics (the default); the
    # study asks for raw values, so every site undoes that and the trees read the CSVs' own units
    names = ["x1", "x2", "x3"]
    params = {
        "n_features": 3,
        "feature_names": names,
        "num_rounds": 6,
        "num_leaves": 6,
        "feature_ranges": [[-5.0, 5.0]] * 3,
        "preprocessing": {"standardize": "none"},
    }
    spec = _spec(fed, "lightgbm-raw", params, timeout_s=60).model_copy(update={"dataset": "triage"})
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=300, interval=0.2)
    assert final.status is StudyStatus.COMPLETED, final.reason
    result = final.rounds[0].metrics or {}
    datasets = [open_dataset(_datasets(site, triage)["triage"]) for site in SITES]
    assert all(d.scaling is not None for d in datasets)  # the connectors did standardize
    pooled = train_pooled(LightGbmParams(**params), datasets)
    assert result["model"].split("end of trees")[0] == pooled.model_text.split("end of trees")[0]

    out = tmp_path / "package"
    exported = _cli(fed, "model", "export", final.study_id, "--out", out, "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.output)["model"]["preprocessing"]["standardize"] == "none"
    rows = pd.concat([pd.read_csv(triage[site]) for site in SITES], ignore_index=True)
    package = fedhealth.load_model(out)
    ours = package.predict_proba(rows[names[::-1]])  # the CSV rows as written, no assume_standardized
    model = LightGbmModel.from_result(result)
    assert np.array_equal(ours, model.predict(rows[names].to_numpy()))
    assert len(np.unique(ours)) > 4  # the trees split on the raw values


@pytest.mark.parametrize("recipe", ["lightgbm", "xgboost"])
def test_a_site_whose_dataset_schema_differs_from_the_spec_refuses_before_training(fed, capture, recipe):
    capture.unlink(missing_ok=True)
    names = list(load_heart_disease(0, heart_data_dir(), download=False).feature_names)
    names[2] = "resting_bp"  # the spec's name for what the sites call trestbps
    params = {"n_features": 13, "num_rounds": 3, "feature_names": names}
    spec = _spec(fed, f"{recipe}-schema", params, timeout_s=30).model_copy(
        update={"recipe": RecipeSpec(name=recipe, params=params)}
    )
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=120, interval=0.2)
    _refused_before_training(fed, capture, final, SITES)


def test_a_third_label_class_at_one_site_refuses_a_binary_study_before_training(fed, capture, triage):
    capture.unlink(missing_ok=True)
    spec = _spec(fed, "lightgbm-three-classes", {"n_features": 3, "num_rounds": 3}, timeout_s=30).model_copy(
        update={"dataset": "triage"}
    )
    _write_triage(triage["center-1"], seed=1, third_class_row=17)  # a nightly export gone wrong
    try:
        final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=120, interval=0.2)
    finally:
        _write_triage(triage["center-1"], seed=1)
    _refused_before_training(fed, capture, final, ["center-1"])
    # the same study on the repaired file trains
    again = spec.model_copy(update={"name": "lightgbm-two-classes"})
    after = fed.wait_for_study(fed.create_study(again).study_id, timeout=300, interval=0.2)
    assert after.status is StudyStatus.COMPLETED, after.reason


def test_a_three_level_label_trains_a_multiclass_study_and_a_binary_study_is_refused_before_training(
    fed, capture, triage
):
    params = {"n_features": 3, "objective": "multiclass", "num_class": 3, "num_rounds": 5, "num_leaves": 4}
    spec = _spec(fed, "lightgbm-severity", params, timeout_s=60).model_copy(update={"dataset": "severity"})
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=300, interval=0.2)
    assert final.status is StudyStatus.COMPLETED, final.reason
    result = final.rounds[0].metrics or {}
    sites = [open_dataset(_datasets(site, triage)["severity"]) for site in SITES]
    assert {d.classes for d in sites} == {3}
    model = LightGbmModel.from_result(result)
    pooled = train_pooled(LightGbmParams(**params), sites)
    assert model.model_text.split("end of trees")[0] == pooled.model_text.split("end of trees")[0]
    X = np.concatenate([d.X_test for d in sites])
    assert model.predict(X).shape == (len(X), 3)

    capture.unlink(missing_ok=True)
    binary = _spec(fed, "lightgbm-severity-binary", {"n_features": 3, "num_rounds": 3}, timeout_s=30)
    refused = fed.wait_for_study(
        fed.create_study(binary.model_copy(update={"dataset": "severity"})).study_id,
        timeout=120,
        interval=0.2,
    )
    _refused_before_training(fed, capture, refused, SITES)


def test_federated_cox_through_the_services_releases_each_site_s_c_index_and_the_stratified_model(
    fed, triage
):
    params = {
        "n_features": 3,
        "objective": "survival:cox",
        "num_rounds": 5,
        "max_depth": 2,
        "time_range": [0, 60],
        "value_range": [-5, 5],
    }
    spec = _spec(fed, "cox", params, timeout_s=60).model_copy(
        update={"dataset": "survival", "recipe": RecipeSpec(name="xgboost", params=params)}
    )
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=300, interval=0.2)
    assert final.status is StudyStatus.COMPLETED, final.reason
    result = final.rounds[0].metrics or {}
    datasets = [open_dataset(_datasets(site, triage)["survival"]) for site in SITES]
    assert all(d.survival and d.feature_names == ("x1", "x2", "x3") for d in datasets)
    reference = train_pooled_xgboost(XGBoostParams(**params), datasets)
    model = XGBoostModel.from_result(result)
    X = np.concatenate([d.X_test for d in datasets])
    assert np.allclose(model.margin(X), reference.margin(X), rtol=0, atol=1e-5)
    for site, data in zip(SITES, datasets, strict=True):  # each site's exact C-index, by name
        exact = harrell_c(data.time_test, data.y_test, model.margin(data.X_test))
        assert result["c_index_sites"][site] == pytest.approx(exact, abs=1e-9)
    assert result["test_rows"] == len(X)
    assert 0.5 < result["c_index"] < 1


def test_a_killed_site_s_study_retries_and_resumes_from_the_last_common_checkpoint_to_the_pooled_model(
    fed, capture, data_dir, triage
):
    capture.unlink(missing_ok=True)
    params = {"n_features": 13, "num_rounds": 20, "num_leaves": 8, "retries": 3}
    study = fed.create_study(_spec(fed, "lightgbm-retried", params, timeout_s=6))
    deadline = time.monotonic() + 120
    while max((r["index"] for r in _records(capture) if r["event"] == "completed"), default=0) < 80:
        assert time.monotonic() < deadline, "the training did not get going"
        time.sleep(0.05)
    victim = fed.agents["center-1"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    _restart(fed, "center-1", data_dir, triage)  # the same home: its checkpoints are there
    final = fed.wait_for_study(study.study_id, timeout=240, interval=0.2)

    assert final.status is StudyStatus.COMPLETED, final.reason
    # the killed session failed with its reason; a retry may fail too while the agent restarts (its
    # session's set-up waits 6 s); the last session completed
    first, *retries, last = final.rounds
    assert first.status.value == "failed"
    assert "center-1 did not take part in collective call" in (first.reason or "")
    assert {t.status for t in first.tasks} == {TaskStatus.FAILED}
    assert all(r.status.value == "failed" for r in retries)
    assert last.status.value == "completed"
    assert [r.number for r in final.rounds] == list(range(1, len(final.rounds) + 1))
    result = last.metrics or {}
    assert result["resumed_from"] >= 1  # the retry started from the checkpointed trees
    centers = [load_heart_disease(c, data_dir, download=False) for c in range(4)]
    pooled = train_pooled(LightGbmParams(**params), centers)
    assert result["model"].split("end of trees")[0] == pooled.model_text.split("end of trees")[0]
    # the checkpoints stay in each site's home, private to it
    [folder] = (fed.site_home("center-1").root / "checkpoints").iterdir()
    assert folder.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in folder.iterdir()] == ["lightgbm-checkpoint.json"]


def test_a_site_killed_mid_training_fails_the_boosting_session_for_everyone(fed, capture):
    capture.unlink(missing_ok=True)
    params = {"n_features": 13, "num_rounds": 5000, "num_leaves": 31}
    study = fed.create_study(_spec(fed, "lightgbm-killed", params, timeout_s=5))
    deadline = time.monotonic() + 120
    while max((r["index"] for r in _records(capture) if r["event"] == "completed"), default=0) < 40:
        assert time.monotonic() < deadline, "the training did not get going"
        time.sleep(0.05)
    victim = fed.agents["center-2"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    final = fed.wait_for_study(study.study_id, timeout=120, interval=0.2)

    assert final.status is StudyStatus.FAILED
    assert "center-2 did not take part in collective call" in (final.reason or "")
    [session] = final.rounds
    assert {t.status for t in session.tasks} == {TaskStatus.FAILED}
    assert session.metrics is None or "model" not in session.metrics  # no model released
    records = _records(capture)
    completed = max(r["index"] for r in records if r["event"] == "completed")
    assert not [r for r in records if r["event"] == "completed" and r["index"] > completed]
    assert not [r for r in records if r["op"] == "BROADCAST"]  # the leader never released anything


@pytest.mark.parametrize(
    ("recipe", "params", "problem"),
    [
        ("lightgbm", {"objective": "lambdarank"}, r"recipe\.params\.objective: Input should be"),
        # LightGBM's and XGBoost's own checks, asked of the library at submission
        (
            "lightgbm",
            {"lambda_l1": -1},
            r"LightGBM 4\.7\.0 refuses these parameters: Check failed: \(lambda_l1\)",
        ),
        (
            "xgboost",
            {"min_child_weight": -1},
            r"XGBoost 3\.2\.0 refuses these parameters: value -1 for Param",
        ),
    ],
)
def test_bad_boosting_params_are_refused_at_submission_in_one_line_and_no_study_is_created(
    fed, recipe, params, problem
):
    before = {s.study_id for s in fed.operator.studies()}
    spec = _spec(fed, f"{recipe}-bad", {"n_features": 13, **params}, timeout_s=5).model_copy(
        update={"recipe": RecipeSpec(name=recipe, params={"n_features": 13, **params})}
    )
    with pytest.raises(Exception, match=problem) as err:
        fed.create_study(spec, approve=False)
    assert "\n" not in str(err.value)
    assert {s.study_id for s in fed.operator.studies()} == before


def _restart(fed: LocalFederation, site: str, data_dir: Path, triage: dict[str, Path]) -> None:
    """Start the site's agent again and wait until the new process has called the orchestrator (the site
    was seen before: ``wait_for_sites`` alone would return at once)."""
    started = datetime.now(UTC)
    fed.start_agent(site, _datasets(site, triage), extra_args=["--data-dir", str(data_dir)])
    deadline = time.monotonic() + 60
    while True:
        seen = {s.name: s.last_seen_at for s in fed.operator.sites()}.get(site)
        if seen is not None and seen > started:
            return
        assert time.monotonic() < deadline, f"{site}'s restarted agent never called the orchestrator"
        time.sleep(0.05)


def _small_xgboost_study(fed: LocalFederation, name: str) -> None:
    """A three-tree XGBoost study of all four sites that completes (a long stage timeout: it waits for any
    slow site rather than failing it)."""
    small = {"n_features": 13, "num_rounds": 3, "max_depth": 2}
    spec = _spec(fed, name, small, timeout_s=60).model_copy(
        update={"recipe": RecipeSpec(name="xgboost", params=small)}
    )
    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=300, interval=0.2)
    assert final.status is StudyStatus.COMPLETED, final.reason
    assert (final.rounds[0].metrics or {})["trees"] == 3


def test_a_killed_xgboost_session_fails_cleanly_and_the_same_agents_train_again(
    fed, capture, data_dir, triage
):
    if fed.agents["center-2"].poll() is not None:  # killed by the LightGBM test above
        _restart(fed, "center-2", data_dir, triage)
    # Every agent ready first (a restarted one has just started; XGBoost is imported at a site's first
    # XGBoost task): the session below fails a site 5 s late, and on a loaded machine a cold agent could
    # miss its set-up or first call by that much, failing the study for the wrong site.
    _small_xgboost_study(fed, "xgboost-warm")
    capture.unlink(missing_ok=True)
    params = {"n_features": 13, "num_rounds": 5000, "max_depth": 6}
    spec = _spec(fed, "xgboost-killed", params, timeout_s=5).model_copy(
        update={"recipe": RecipeSpec(name="xgboost", params=params)}
    )
    study = fed.create_study(spec)
    deadline = time.monotonic() + 120
    while max((r["index"] for r in _records(capture) if r["event"] == "completed"), default=0) < 20:
        assert time.monotonic() < deadline, "the training did not get going"
        time.sleep(0.05)
    victim = fed.agents["center-3"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    final = fed.wait_for_study(study.study_id, timeout=120, interval=0.2)
    assert final.status is StudyStatus.FAILED
    assert "center-3 did not take part in collective call" in (final.reason or "")
    assert not [r for r in _records(capture) if r["op"] == "BROADCAST"]

    # the survivors' processes (whose XGBoost was aborted mid-training) train the next study
    survivors = {site: fed.agents[site] for site in SITES if site != "center-3"}
    _restart(fed, "center-3", data_dir, triage)
    _small_xgboost_study(fed, "xgboost-again")
    assert all(fed.agents[site] is proc and proc.poll() is None for site, proc in survivors.items())
