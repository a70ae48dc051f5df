"""``standardize = "federated"`` through the real services: three agent processes holding three
Fed-Heart-Disease centres, the orchestrator over HTTPS, a small secure logistic-regression study.

Round 0 (the scaling pre-step) releases the mean and std of the pooled training rows, bit for bit the
in-process run's; the orchestrator's relay held every site's [count, sum, sum of squares] masked in every
coordinate it recorded, and its stored results hold only the federation's totals; the exported package
predicts raw rows exactly as the sites' own evaluation path does.
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
from fedhealth.data import HEART_DISEASE_FEATURES, STD_EPSILON, heart_disease_records, open_dataset
from fedhealth.learning import LOGREG_RECIPE, LogRegParams, logreg_predict_proba, scaling_sums
from fedhealth.learning._stats import split_limbs
from fedhealth.protocol import ReleasedScaling, SecureAggregationSpec, StudySpec, StudyStatus, TaskKind
from fedhealth.runtime import effective_recipe, recipe_spec, run_study_in_memory
from fedhealth.secagg import encode_fixed
from fedhealth.sim import LocalFederation
from support import heart_data_dir

pytestmark = pytest.mark.e2e
SITES = {"cleveland": 0, "hungary": 1, "va": 3}
CAPTURE_DIR = Path(__file__).with_name("relay_capture")
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
def capture(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("relay") / "relay.jsonl"


@pytest.fixture(scope="module")
def fed(tmp_path_factory, capture):
    path = os.pathsep.join(p for p in (str(CAPTURE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    env = {
        "PYTHONPATH": path,
        "FEDHEALTH_TEST_RELAY_CAPTURE": str(capture),
        "FEDHEALTH_DATA_DIR": str(heart_data_dir()),
    }
    with LocalFederation(tmp_path_factory.mktemp("fedstd"), log_level="warning", env=env) as fed:
        fed.start_orchestrator()
        for site, center in SITES.items():
            fed.add_site(site)
            fed.start_agent(site, {"heart-disease": f"builtin://heart-disease/{center}"})
        fed.wait_for_sites(sorted(SITES))
        yield fed


@pytest.fixture(scope="module")
def datasets():
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
    fed, datasets, capture, tmp_path
):
    sites = sorted(SITES)
    spec = StudySpec(
        name="hd-federated-scaling",
        dataset="heart-disease",
        recipe=recipe_spec(LOGREG_RECIPE, PARAMS),
        rounds=2,
        train_sites=sites,
        min_sites=3,
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
        clear = encode_fixed(split_limbs(local[record["site"]], 3), 3)[:16].tolist()
        assert not any(a == b for a, b in zip(record["head"], clear, strict=True))
    stored = numbers(pre_step.model_dump(mode="json"))
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
    report = fed.report(final.study_id)
    for site, dataset in datasets.items():
        csv = tmp_path / f"{site}.csv"
        raw_csv(csv, SITES[site], dataset.patient_ids_test)
        frame = pd.read_csv(csv)
        predicted = loaded.predict_proba(frame)
        assert trained.preprocessing is not None
        at_site = logreg_predict_proba(model, trained.preprocessing.apply(dataset, dataset.X_test))
        np.testing.assert_allclose(predicted, at_site, rtol=0, atol=1e-12)
        evaluated = report["evaluation"]["per_site"][site]
        assert evaluated["num_eval_samples"] == len(frame)
        assert float(((predicted > 0.5) == frame["disease"].to_numpy()).mean()) == evaluated["accuracy"]
