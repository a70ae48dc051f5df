"""Model packages without the services: a heart-disease model trained with the federation's standardization,
written as a package, loaded with ``fedhealth.load_model`` and applied to raw rows; ONNX agreement; tampered
packages; bad tables; the preprocessing parameters and their checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pandas as pd
import pytest
from pydantic import ValidationError

import fedhealth
from fedhealth.core import canonical_json, encode_tensors, sha256_hex
from fedhealth.data import HEART_DISEASE_FEATURES, fit_scaling, heart_disease_records, load_heart_disease
from fedhealth.learning import (
    LOGREG_RECIPE,
    ONNX_FILE,
    WEIGHTS_FILE,
    LogRegParams,
    PackageError,
    PackageInputError,
    StandardizeMode,
    logreg_init,
    logreg_predict_proba,
    scaling_from_sums,
    write_package,
)
from support import heart_data_dir, package_origin

CENTERS = (0, 1)
RAW_COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak")
CATEGORICAL = {
    "cp": {"categories": [1, 2, 3, 4], "features": ["cp_2", "cp_3", "cp_4"]},
    "restecg": {"categories": [0, 1, 2], "features": ["restecg_1", "restecg_2"]},
}
LABEL_MEANING = "angiographic heart disease (num > 0)"


@pytest.fixture(scope="module")
def sites():
    folder = heart_data_dir()
    return {c: load_heart_disease(c, folder, download=False) for c in CENTERS}


def raw_train(dataset) -> np.ndarray:
    return dataset.X_train * dataset.scaling.std + dataset.scaling.mean


@pytest.fixture(scope="module")
def federated_scaling(sites):
    """What a federated statistics run releases: the per-feature secure sums over every site's training rows
    (each site computes its own three vectors; only their sums leave)."""
    parts = [raw_train(d) for d in sites.values()]
    count = sum(np.full(p.shape[1], p.shape[0], dtype=np.float64) for p in parts)
    total = sum(p.sum(axis=0) for p in parts)
    total_sq = sum((p * p).sum(axis=0) for p in parts)
    return scaling_from_sums(count, total, total_sq)


def params_for(mean: list[float], scale: list[float], **extra: Any) -> LogRegParams:
    return LogRegParams.model_validate(
        {
            "n_features": 13,
            "local_epochs": 3,
            "feature_names": list(HEART_DISEASE_FEATURES),
            "preprocessing": {
                "standardize": "given",
                "mean": mean,
                "scale": scale,
                "categorical": CATEGORICAL,
            },
            "label_meaning": LABEL_MEANING,
            **extra,
        }
    )


def trained(params: LogRegParams, sites) -> dict[str, np.ndarray]:
    model = logreg_init(13, 0)
    rng = np.random.default_rng(5)
    for _ in range(3):
        for dataset in sites.values():
            model = LOGREG_RECIPE.train(params, model, dataset, rng).params
    return model


def spec_of(params: LogRegParams) -> dict[str, Any]:
    return {
        "name": "heart",
        "recipe": {"name": "logreg", "version": "1", "params": params.model_dump(mode="json")},
    }


def package(tmp_path: Path, params: LogRegParams, model: dict[str, np.ndarray], **origin: Any) -> Path:
    export = LOGREG_RECIPE.export(params, model)
    weights = encode_tensors(export.tensors)
    fields: dict[str, Any] = {
        "study_id": "study-1",
        "software_version": fedhealth.__version__,
        "exported_at": "2026-12-06T00:00:00+00:00",
        **origin,
    }
    out = tmp_path / "package"
    origin_of = package_origin(spec_of(params), weights, **fields)
    write_package(out, export=export, weights=weights, origin=origin_of)
    return out


def raw_rows(center: int, ids: tuple[str, ...]) -> pd.DataFrame:
    """The center's rows with these ids, as a hospital's table holds them: raw values, codes for cp and
    restecg, the label, an id column."""
    by_id = {r.patient_id: r for r in heart_disease_records(center, heart_data_dir(), download=False)}
    return pd.DataFrame(
        [
            {"patient_id": i, **{c: getattr(by_id[i], c) for c in RAW_COLUMNS}, "disease": by_id[i].disease}
            for i in ids
        ]
    )


@pytest.fixture(scope="module")
def setup(sites, federated_scaling, tmp_path_factory):
    params = params_for(*federated_scaling)
    model = trained(params, sites)
    return params, model, package(tmp_path_factory.mktemp("pkg"), params, model)


def test_federated_sums_give_the_pooled_training_statistics(sites, federated_scaling):
    pooled = fit_scaling(np.concatenate([raw_train(d) for d in sites.values()]))
    mean, scale = federated_scaling
    np.testing.assert_allclose(mean, pooled.mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(scale, pooled.std, rtol=1e-9, atol=0)


def test_a_loaded_package_predicts_raw_rows_as_the_site_evaluation_does(setup, sites):
    params, model, path = setup
    loaded = fedhealth.load_model(path)
    for center, dataset in sites.items():
        frame = raw_rows(center, dataset.patient_ids_test)
        in_fedhealth = logreg_predict_proba(model, params.preprocessing.apply(dataset, dataset.X_test))
        predicted = loaded.predict_proba(frame)
        np.testing.assert_allclose(predicted, in_fedhealth, rtol=0, atol=1e-12)
        evaluation = LOGREG_RECIPE.evaluate(params, model, dataset)
        accuracy = float(((predicted > 0.5) == dataset.y_test).mean())
        assert accuracy == evaluation.accuracy
    assert loaded.metadata["label"] == {"positive_class": 1, "meaning": LABEL_MEANING}
    assert loaded.feature_names == HEART_DISEASE_FEATURES
    assert [c.name for c in loaded.input_columns] == [
        "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak", "cp", "restecg",
    ]  # fmt: skip


def test_the_onnx_file_agrees_with_the_package_to_1e_6(setup, sites):
    _, _, path = setup
    loaded = fedhealth.load_model(path)
    session = onnxruntime.InferenceSession(str(path / ONNX_FILE), providers=["CPUExecutionProvider"])
    for center, dataset in sites.items():
        frame = raw_rows(center, dataset.patient_ids_test)
        (onnx_p,) = session.run(["probability"], {"features": loaded.features(frame)})
        assert onnx_p.shape == (len(frame),)
        np.testing.assert_allclose(onnx_p, loaded.predict_proba(frame), rtol=0, atol=1e-6)


def test_columns_the_model_does_not_read_are_ignored_and_order_does_not_matter(setup, sites):
    _, _, path = setup
    loaded = fedhealth.load_model(path)
    frame = raw_rows(0, sites[0].patient_ids_test)
    shuffled = frame[list(reversed(frame.columns))].assign(note="x", extra=1.5)
    np.testing.assert_array_equal(loaded.predict_proba(shuffled), loaded.predict_proba(frame))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop(columns=["chol", "cp"]), "lacks column(s) ['chol', 'cp']"),
        (lambda f: f.assign(age=f["age"].astype(str)), "column 'age' holds"),
        (lambda f: f.assign(exang=f["exang"] > 0), "column 'exang' holds bool values, not numbers"),
        (
            lambda f: f.assign(chol=f["chol"].where(f.index != 2)),
            "column 'chol' has 1 missing value(s) (rows 2)",
        ),
        (
            lambda f: f.assign(cp=f["cp"].where(f.index != 0, 9)),
            "column 'cp' holds ['9'], not among its categories",
        ),
        (lambda f: f.assign(oldpeak=np.inf), "column 'oldpeak' holds an infinite value"),
        (lambda f: f.to_numpy(), "takes a pandas DataFrame, not ndarray"),
    ],
    ids=["missing-columns", "text", "bool", "nan", "unknown-category", "infinite", "not-a-frame"],
)
def test_a_table_that_does_not_fit_is_refused_with_what_is_wrong(setup, sites, change, message):
    _, _, path = setup
    loaded = fedhealth.load_model(path)
    frame = raw_rows(0, sites[0].patient_ids_test[:5])
    with pytest.raises(PackageInputError) as err:
        loaded.predict_proba(change(frame))
    assert message in str(err.value)


def rewrite_metadata(path: Path, edit, *, redigest: bool) -> None:
    file = path / "metadata.json"
    metadata = json.loads(file.read_text())
    edit(metadata)
    if redigest:
        rest = {k: v for k, v in metadata.items() if k != "package_digest"}
        metadata["package_digest"] = sha256_hex(canonical_json(rest))
    file.write_text(json.dumps(metadata))


def copy_of(path: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(path, tmp_path / "copy"))


def test_a_modified_weights_file_is_refused(setup, tmp_path):
    path = copy_of(setup[2], tmp_path)
    blob = bytearray((path / WEIGHTS_FILE).read_bytes())
    blob[-1] ^= 1
    (path / WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(PackageError, match=r"model\.safetensors was modified"):
        fedhealth.load_model(path)


def test_a_modified_onnx_file_is_refused(setup, tmp_path):
    path = copy_of(setup[2], tmp_path)
    (path / ONNX_FILE).write_bytes((path / ONNX_FILE).read_bytes() + b"\0")
    with pytest.raises(PackageError, match=r"model\.onnx was modified"):
        fedhealth.load_model(path)


def test_an_edited_metadata_field_is_refused(setup, tmp_path):
    path = copy_of(setup[2], tmp_path)
    rewrite_metadata(
        path, lambda m: m["privacy"] is None and m.update(privacy={"epsilon": 0.1}), redigest=False
    )
    with pytest.raises(PackageError, match="package_digest does not match"):
        fedhealth.load_model(path)


def test_an_edited_scaling_is_refused_even_with_the_digest_recomputed(setup, tmp_path):
    path = copy_of(setup[2], tmp_path)

    def shift(m: dict[str, Any]) -> None:
        for section in (m["preprocessing"], m["model"]["preprocessing"]):
            section["mean"][0] += 1.0

    rewrite_metadata(path, shift, redigest=True)
    with pytest.raises(PackageError, match="differs from what the study spec and weights give"):
        fedhealth.load_model(path)


def test_an_edited_spec_is_refused_by_its_hash(setup, tmp_path):
    path = copy_of(setup[2], tmp_path)

    def edit(m: dict[str, Any]) -> None:
        m["study_spec"]["recipe"]["params"]["preprocessing"]["mean"][0] += 1.0

    rewrite_metadata(path, edit, redigest=True)
    with pytest.raises(PackageError, match="does not match its spec hash"):
        fedhealth.load_model(path)


def test_a_folder_without_a_package_is_refused(tmp_path):
    with pytest.raises(PackageError, match=r"no metadata\.json"):
        fedhealth.load_model(tmp_path)
    with pytest.raises(PackageError, match="no such package folder"):
        fedhealth.load_model(tmp_path / "absent")


def test_a_package_is_not_written_into_a_folder_that_holds_files_unless_forced(setup, tmp_path, sites):
    params, model, _ = setup
    out = tmp_path / "package"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(PackageError, match="exists and is not empty"):
        package(tmp_path, params, model)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written
    export = LOGREG_RECIPE.export(params, model)
    weights = encode_tensors(export.tensors)
    spec = spec_of(params)
    origin = package_origin(spec, weights)
    write_package(out, export=export, weights=weights, origin=origin, force=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert fedhealth.load_model(out).model_digest == sha256_hex(weights)


def test_a_model_trained_on_per_site_scaling_has_no_onnx_and_says_how_to_feed_it(sites, tmp_path):
    params = LogRegParams(n_features=13, feature_names=HEART_DISEASE_FEATURES)
    model = trained(params, sites)
    path = package(tmp_path, params, model)
    assert not (path / ONNX_FILE).exists()
    loaded = fedhealth.load_model(path)
    assert loaded.standardize is StandardizeMode.SITE
    dataset = sites[0]
    frame = pd.DataFrame(dataset.X_test, columns=list(HEART_DISEASE_FEATURES))
    with pytest.raises(PackageInputError, match="each site standardized with its own statistics"):
        loaded.predict_proba(frame)
    np.testing.assert_array_equal(
        loaded.predict_proba(frame, assume_standardized=True), logreg_predict_proba(model, dataset.X_test)
    )


def test_without_preprocessing_training_is_unchanged(sites):
    plain = LogRegParams(n_features=13)
    assert plain.model_dump(mode="json")["preprocessing"] is None  # explicit in the spec a steward reads
    from fedhealth.learning import logreg_train

    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    via_recipe = LOGREG_RECIPE.train(plain, logreg_init(13, 0), sites[0], rng_a).params
    direct = logreg_train(
        logreg_init(13, 0), sites[0].X_train, sites[0].y_train, plain.config(), rng_b
    ).params
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(via_recipe[name], direct[name])


def test_standardize_none_trains_on_the_raw_features(sites):
    params = LogRegParams.model_validate(
        {
            "n_features": 13,
            "feature_names": list(HEART_DISEASE_FEATURES),
            "preprocessing": {"standardize": "none"},
        }
    )
    from fedhealth.learning import logreg_train

    got = LOGREG_RECIPE.train(params, logreg_init(13, 0), sites[0], np.random.default_rng(1)).params
    raw = raw_train(sites[0])
    want = logreg_train(
        logreg_init(13, 0), raw, sites[0].y_train, params.config(), np.random.default_rng(1)
    ).params
    np.testing.assert_allclose(got["weight"], want["weight"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("preprocessing", "names", "message"),
    [
        ({"standardize": "given"}, True, "needs mean and scale"),
        ({"standardize": "none", "mean": [0.0] * 13}, True, "mean and scale go with standardize = 'given'"),
        (
            {"standardize": "given", "mean": [0.0] * 12, "scale": [1.0] * 12},
            True,
            "12 values for 13 features",
        ),
        ({"standardize": "given", "mean": [0.0] * 13, "scale": [0.0] * 13}, True, "greater than 0"),
        ({"standardize": "site"}, True, "'site' is the default"),
        ({"standardize": "federated", "mean": [0.0] * 13}, True, "mean and scale go together"),
        ({"standardize": "none"}, False, "preprocessing needs feature_names"),
        (
            {"standardize": "none", "categorical": {"cp": {"categories": [1, 2], "features": ["cp_9"]}}},
            True,
            "['cp_9'] are not among feature_names",
        ),
        (
            {"standardize": "none", "categorical": {"cp": {"categories": [1, 2, 3], "features": ["cp_2"]}}},
            True,
            "1 features for 3 categories",
        ),
    ],
)
def test_preprocessing_params_are_checked_where_the_spec_is_written(preprocessing, names, message):
    fields: dict[str, Any] = {"n_features": 13, "preprocessing": preprocessing}
    if names:
        fields["feature_names"] = list(HEART_DISEASE_FEATURES)
    with pytest.raises(ValidationError) as err:
        LogRegParams.model_validate(fields)
    assert message in str(err.value)


def test_a_model_whose_study_named_no_features_is_not_packaged(sites, tmp_path):
    params = LogRegParams(n_features=13)
    with pytest.raises(PackageError, match="the study named no features"):
        package(tmp_path, params, trained(params, sites))
    assert not (tmp_path / "package").exists()
