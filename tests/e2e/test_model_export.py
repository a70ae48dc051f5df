"""``fedhealth model export`` against a real orchestrator and agents: a Fed-Heart-Disease study trained with
the federation's standardization and record-level DP becomes a package whose model, loaded with
``fedhealth.load_model``, predicts a raw CSV file row for row as the sites evaluated it, and whose ONNX file
agrees to 1e-6; unfinished studies and occupied folders are refused."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnxruntime
import pandas as pd
import pytest
from typer.testing import CliRunner

import fedhealth
from fedhealth.cli import app
from fedhealth.core import decode_tensors
from fedhealth.data import HEART_DISEASE_FEATURES, heart_disease_records, open_dataset
from fedhealth.learning import LOGREG_RECIPE, ONNX_FILE, LogRegParams, logreg_predict_proba, scaling_from_sums
from fedhealth.protocol import PrivacySpec, StudySpec, StudyStatus
from fedhealth.runtime import recipe_spec
from fedhealth.sim import LocalFederation
from support import heart_data_dir

pytestmark = pytest.mark.e2e
runner = CliRunner()
SITES = {"cleveland": "builtin://heart-disease/0", "hungary": "builtin://heart-disease/1"}
CENTER = {"cleveland": 0, "hungary": 1}
RAW_COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak")
DELTA = 1e-5


def cli(fed: LocalFederation, *args: object) -> Any:
    admin = ["--credential", fed.home.admin_credential, "--orchestrator", fed.url]
    return runner.invoke(app, [str(a) for a in (*args, *admin)])


@pytest.fixture(scope="module")
def datasets():
    folder = heart_data_dir()
    return {site: open_dataset(uri, folder) for site, uri in SITES.items()}


@pytest.fixture(scope="module")
def params(datasets) -> LogRegParams:
    """The spec's preprocessing: mean and scale from the per-feature sums over both sites' training rows
    (what a federated statistics run releases through secure sum), never one site's own statistics."""
    raw = [d.X_train * d.scaling.std + d.scaling.mean for d in datasets.values()]
    count = sum(np.full(13, r.shape[0], dtype=np.float64) for r in raw)
    mean, scale = scaling_from_sums(
        count, sum(r.sum(axis=0) for r in raw), sum((r * r).sum(axis=0) for r in raw)
    )
    return LogRegParams.model_validate(
        {
            "n_features": 13,
            "learning_rate": 0.5,
            "feature_names": list(HEART_DISEASE_FEATURES),
            "preprocessing": {
                "standardize": "given",
                "mean": mean,
                "scale": scale,
                "categorical": {
                    "cp": {"categories": [1, 2, 3, 4], "features": ["cp_2", "cp_3", "cp_4"]},
                    "restecg": {"categories": [0, 1, 2], "features": ["restecg_1", "restecg_2"]},
                },
            },
            "label_meaning": "angiographic heart disease (num > 0)",
        }
    )


def spec(params: LogRegParams, name: str) -> StudySpec:
    return StudySpec(
        name=name,
        dataset="heart-disease",
        recipe=recipe_spec(LOGREG_RECIPE, params),
        rounds=3,
        train_sites=sorted(SITES),
        min_sites=2,
        round_deadline_s=120.0,
        seed=3,
        privacy=PrivacySpec(
            delta=DELTA, target_epsilon=2.0, max_grad_norm=1.0, sample_rate=0.1, steps_per_round=5
        ),
    )


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    env = {"FEDHEALTH_DATA_DIR": str(heart_data_dir())}
    with LocalFederation(tmp_path_factory.mktemp("export"), env=env, log_level="warning") as fed:
        fed.start_orchestrator()
        for site, uri in SITES.items():
            fed.add_site(site)
            fed.set_budget(site, "heart-disease", 10.0, DELTA)
            fed.start_agent(site, {"heart-disease": uri})
        fed.wait_for_sites(sorted(SITES))
        yield fed


@pytest.fixture(scope="module")
def finished(fed, params):
    study = fed.create_study(spec(params, "hd-package"))
    final = fed.wait_for_study(study.study_id, timeout=600)
    assert final.status is StudyStatus.COMPLETED, final.reason
    return final


def raw_csv(path, center: int, ids: tuple[str, ...]) -> None:
    by_id = {r.patient_id: r for r in heart_disease_records(center, heart_data_dir(), download=False)}
    rows = [
        {"patient_id": i, **{c: getattr(by_id[i], c) for c in RAW_COLUMNS}, "disease": by_id[i].disease}
        for i in ids
    ]
    pd.DataFrame(rows).to_csv(path, index=False)


def test_an_exported_model_predicts_a_raw_csv_as_the_sites_evaluated_it(
    fed, finished, params, datasets, tmp_path
):
    out = tmp_path / "package"
    result = cli(fed, "model", "export", finished.study_id, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"packaged in {out}" in result.output
    loaded = fedhealth.load_model(out)
    assert loaded.model_digest == finished.model_digest
    assert loaded.spec_hash == finished.spec_hash
    report = fed.report(finished.study_id)
    final_model, _ = decode_tensors(fed.model_bytes(finished.study_id))
    session = onnxruntime.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    for site, dataset in datasets.items():
        csv = tmp_path / f"{site}.csv"
        raw_csv(csv, CENTER[site], dataset.patient_ids_test)
        frame = pd.read_csv(csv)
        predicted = loaded.predict_proba(frame)
        # the site's own evaluation path: its dataset under the spec's preprocessing, the final model
        at_site = logreg_predict_proba(final_model, params.preprocessing.apply(dataset, dataset.X_test))
        np.testing.assert_allclose(predicted, at_site, rtol=0, atol=1e-12)
        evaluated = report["evaluation"]["per_site"][site]
        assert evaluated["num_eval_samples"] == len(frame)
        assert float(((predicted > 0.5) == frame["disease"].to_numpy()).mean()) == evaluated["accuracy"]
        (onnx_p,) = session.run(["probability"], {"features": loaded.features(frame)})
        np.testing.assert_allclose(onnx_p, predicted, rtol=0, atol=1e-6)


def test_the_package_states_provenance_and_the_privacy_guarantee(fed, finished, tmp_path):
    out = tmp_path / "package"
    result = cli(fed, "model", "export", finished.study_id, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    metadata = json.loads((out / "metadata.json").read_text())
    assert json.loads(result.stdout) == metadata
    assert metadata["provenance"]["model_digest"] == finished.model_digest
    assert metadata["provenance"]["spec_hash"] == finished.spec_hash
    privacy = metadata["privacy"]
    per_site = metadata["provenance"]["epsilon_spent"]
    assert sorted(per_site) == sorted(SITES)
    assert privacy["level"] == "record"
    assert privacy["delta"] == DELTA
    assert privacy["epsilon"] == max(per_site.values())
    assert 0 < privacy["epsilon"] <= 2.0 + 1e-9  # the spec's target, calibrated
    assert metadata["label"]["meaning"] == "angiographic heart disease (num > 0)"
    assert metadata["recipe"] == {"name": "logreg", "version": "1"}


def one_error(result: Any) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_export_refuses_a_study_that_has_not_completed(fed, params, tmp_path):
    waiting = fed.create_study(spec(params, "hd-waiting"), approve=False)
    out = tmp_path / "package"
    line = one_error(cli(fed, "model", "export", waiting.study_id, "--out", out))
    assert "is awaiting_approval; only a completed study's final model is packaged" in line
    assert not out.exists()


def test_export_refuses_a_folder_that_is_not_empty_unless_forced(fed, finished, tmp_path):
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "readme.txt").write_text("mine")
    line = one_error(cli(fed, "model", "export", finished.study_id, "--out", out))
    assert "exists and is not an empty folder" in line
    assert [p.name for p in out.iterdir()] == ["readme.txt"]
    result = cli(fed, "model", "export", finished.study_id, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert fedhealth.load_model(out).model_digest == finished.model_digest
    assert (out / "readme.txt").read_text() == "mine"


def test_model_predict_applies_a_package_to_a_raw_csv(fed, finished, datasets, tmp_path):
    out = tmp_path / "package"
    assert cli(fed, "model", "export", finished.study_id, "--out", out).exit_code == 0
    csv = tmp_path / "cleveland.csv"
    raw_csv(csv, 0, datasets["cleveland"].patient_ids_test)
    result = runner.invoke(
        app,
        [
            "model",
            "predict",
            "--package",
            str(out),
            "--csv",
            str(csv),
            "--id",
            "patient_id",
            "--label",
            "disease",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    frame = pd.read_csv(csv, dtype={"patient_id": str})
    assert [p["id"] for p in body["predictions"]] == frame["patient_id"].tolist()
    np.testing.assert_array_equal(
        [p["probability"] for p in body["predictions"]], fedhealth.load_model(out).predict_proba(frame)
    )
    assert body["model_digest"] == finished.model_digest
    assert (
        body["accuracy"] == fed.report(finished.study_id)["evaluation"]["per_site"]["cleveland"]["accuracy"]
    )
    both = runner.invoke(
        app, ["model", "predict", "--package", str(out), "--model", str(out), "--csv", str(csv)]
    )
    assert both.exit_code == 2
    assert "give exactly one of --model FILE and --package DIR" in both.stderr
