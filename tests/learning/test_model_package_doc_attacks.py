"""Each guarantee docs/model-packages.md states, attacked: a package someone edited (recomputing every digest
the package itself carries), a folder with files the metadata does not list, hostile JSON, hostile tables
and CSV files at predict time. ``fedhealth.load_model`` must refuse a bad package with one
:class:`~fedhealth.learning.PackageError` line, ``predict_proba`` a bad table with one
:class:`~fedhealth.learning.PackageInputError` line, and ``fedhealth model predict`` either with one
``error:`` line. The sibling audits are tests/packaging/test_package_attacks.py and
tests/learning/test_model_package.py; this file covers what they leave open."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
import pytest

import fedhealth
from fedhealth.core import canonical_json, encode_tensors, sha256_hex
from fedhealth.learning import (
    LIGHTGBM_RECIPE,
    LOGREG_RECIPE,
    LightGbmParams,
    LogRegParams,
    PackageError,
    PackageInputError,
    StandardizeMode,
    logreg_init,
    train_pooled,
    write_package,
)
from fedhealth.learning import _package as package_module
from support import cli, heart_data_dir, one_error, package_origin

FEATURES = ["age", "chol", "cp_2", "cp_3"]
PREPROCESSING: dict[str, Any] = {
    "standardize": "given",
    "mean": [50.0, 200.0, 0.3, 0.3],
    "scale": [10.0, 40.0, 0.5, 0.5],
    "categorical": {"cp": {"categories": [1, 2, 3], "features": ["cp_2", "cp_3"]}},
}
ROWS = pd.DataFrame({"age": [40.0, 70.0, 55.0], "chol": [180.0, 260.0, 220.0], "cp": [1, 2, 3]})


def params_of(preprocessing: dict[str, Any] | None = PREPROCESSING) -> LogRegParams:
    body: dict[str, Any] = {"n_features": 4, "feature_names": FEATURES, "label_meaning": "the outcome"}
    if preprocessing is not None:
        body["preprocessing"] = preprocessing
    return LogRegParams.model_validate(body)


def spec_of(params: LogRegParams) -> dict[str, Any]:
    return {
        "name": "s",
        "recipe": {"name": "logreg", "version": "1", "params": params.model_dump(mode="json")},
    }


def model_of(weight: float) -> dict[str, np.ndarray]:
    model = logreg_init(4, 0)
    return {"weight": np.linspace(-weight, weight, 4).astype(np.float32), "bias": model["bias"] + 0.1}


def write_logreg(
    out: Path,
    weight: float = 0.8,
    *,
    params: LogRegParams | None = None,
    spec: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    params = params or params_of()
    export = LOGREG_RECIPE.export(params, model_of(weight))
    weights = encode_tensors(export.tensors)
    origin = package_origin(spec or spec_of(params), weights)
    write_package(out, export=export, weights=weights, origin=origin, force=force)
    return out


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_logreg(tmp_path_factory.mktemp("pkg") / "good")


def copy_of(path: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(path, tmp_path / name, symlinks=True))


def metadata_of(path: Path) -> dict[str, Any]:
    return json.loads((path / "metadata.json").read_text())


def redigest(
    path: Path, edit: Callable[[dict[str, Any]], None] = lambda m: None, *, model: bool = True
) -> None:
    """Apply ``edit`` to the metadata and recompute the digests the package carries, as an attacker would:
    each listed file's, the spec hash, the model digest (unless ``model`` is False) and the package digest."""
    metadata = metadata_of(path)
    edit(metadata)
    for name in metadata["files"]:
        if (path / name).is_file() and not (path / name).is_symlink():
            metadata["files"][name] = sha256_hex((path / name).read_bytes())
    holder = "result.json" if "result.json" in metadata["files"] else "model.safetensors"
    if model:
        metadata["model_digest"] = sha256_hex((path / holder).read_bytes())
    metadata["spec_hash"] = sha256_hex(canonical_json(metadata["study_spec"]))
    claimed = {k: v for k, v in metadata.items() if k != "package_digest"}
    metadata["package_digest"] = sha256_hex(canonical_json(claimed))
    (path / "metadata.json").write_text(json.dumps(metadata))


def refusal(path: Path, match: str | None = None) -> str:
    with pytest.raises(PackageError, match=match) as caught:
        fedhealth.load_model(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_untouched_package_and_its_redigested_copy_load(good, tmp_path):
    """The control: redigesting without an edit changes nothing the loader checks."""
    path = copy_of(good, tmp_path)
    redigest(path)
    assert metadata_of(path) == metadata_of(good)
    p = fedhealth.load_model(path).predict_proba(ROWS)
    assert p.dtype == np.float64
    assert p.shape == (3,)


# --- what a package holds: every file listed, nothing beside it ---------------------------------------------


def test_an_onnx_file_the_metadata_does_not_list_is_refused(good, tmp_path):
    """The doc tells the hospital to run ``model.onnx`` with onnxruntime: one the metadata stopped listing
    would be checked by nothing (here: the ONNX file of another model, every digest recomputed)."""
    other = write_logreg(tmp_path / "other", weight=-5.0)
    path = copy_of(good, tmp_path)
    shutil.copyfile(other / "model.onnx", path / "model.onnx")
    redigest(path, lambda m: m["files"].pop("model.onnx"))
    refusal(path, r"holds model\.onnx, which its metadata does not list")


@pytest.mark.parametrize("name", ["model.txt", "model.json", "model.ubj", "model.pkl", "result.json"])
def test_a_model_file_beside_a_package_that_its_metadata_does_not_list_is_refused(good, tmp_path, name):
    path = copy_of(good, tmp_path)
    (path / name).write_text("a model the package does not vouch for")
    refusal(path, f"holds {name}, which its metadata does not list")


def test_files_that_are_not_model_files_may_sit_beside_a_package(good, tmp_path):
    """``--force`` leaves other files in the folder; they are not package files and do not stop loading."""
    path = copy_of(good, tmp_path)
    (path / "README.txt").write_text("notes")
    (path / "predictions.csv").write_text("id,probability\n")
    (path / "model.md").write_text("# what this model is for")  # a note named after the model is no model
    (path / "model.csv").write_text("feature,meaning\n")
    assert fedhealth.load_model(path).model_digest == metadata_of(good)["model_digest"]


def test_a_listed_file_that_is_missing_is_refused(good, tmp_path):
    path = copy_of(good, tmp_path)
    (path / "model.onnx").unlink()
    refusal(path, r"model\.onnx is missing")


def test_weights_of_another_model_are_refused_unless_the_model_digest_changes_with_them(good, tmp_path):
    """A weights file of the same shape swapped in under the same name, its entry in ``files`` and the
    package digest recomputed: refused while ``model_digest`` (what provenance names) is kept; with it
    recomputed too the package loads, but names another digest than the orchestrator's, which is the
    comparison the doc asks for."""
    other = write_logreg(tmp_path / "other", weight=-5.0)
    path = copy_of(good, tmp_path)
    shutil.copyfile(other / "model.safetensors", path / "model.safetensors")
    (path / "model.onnx").unlink()
    redigest(path, lambda m: m["files"].pop("model.onnx"), model=False)
    refusal(path, r"model\.safetensors is not the model the metadata names")
    redigest(path)
    assert fedhealth.load_model(path).model_digest != metadata_of(good)["model_digest"]


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_weights_are_refused_with_every_digest_recomputed(good, tmp_path, value):
    path = copy_of(good, tmp_path)
    model = model_of(0.8)
    model["weight"][1] = value
    (path / "model.safetensors").write_bytes(encode_tensors(model))
    (path / "model.onnx").unlink()
    redigest(path, lambda m: m["files"].pop("model.onnx"))
    refusal(path)


def test_metadata_that_names_another_recipe_is_refused_even_with_the_digest_recomputed(good, tmp_path):
    """The top-level ``recipe`` says which plug-in made the model: it must be the one the model section
    (re-exported from the spec and weights) states."""
    path = copy_of(good, tmp_path)
    redigest(path, lambda m: m.update(recipe={"name": "xgboost", "version": "1"}))
    refusal(path, "the metadata's recipe differs from its model section")


@pytest.mark.parametrize("params", ["abc", [1, 2], [["n_features", 4]]], ids=["text", "list", "pairs"])
def test_spec_params_that_are_not_a_table_are_one_line(good, tmp_path, params):
    path = copy_of(good, tmp_path)
    redigest(path, lambda m: m["study_spec"]["recipe"].update(params=params))
    refusal(path, "recipe params are not a table")


# --- hostile metadata: not JSON a hash can cover, too deep, too large, not a file ---------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_metadata_with_a_number_that_is_not_finite_is_one_line(good, tmp_path, literal):
    path = copy_of(good, tmp_path)
    text = (path / "metadata.json").read_text()
    (path / "metadata.json").write_text(text.replace('"exported_at": "now"', f'"exported_at": {literal}'))
    refusal(path, "cannot be read as JSON")


@pytest.mark.parametrize("depth", [65, 5_000, 200_000])
def test_deeply_nested_metadata_is_one_line(good, tmp_path, depth):
    """A field nested past the interpreter's recursion limit (the JSON parser, canonical JSON) or past the
    package's bound, with the package digest recomputed where canonical JSON can compute it."""
    path = copy_of(good, tmp_path)
    metadata = metadata_of(path)
    body = json.dumps({k: v for k, v in metadata.items() if k != "package_digest"})
    nested = "[" * depth + "]" * depth
    text = body[:-1] + f', "extra": {nested}'
    if depth < 500:
        claimed = json.loads(text + "}")
        text += f', "package_digest": "{sha256_hex(canonical_json(claimed))}"'
    (path / "metadata.json").write_text(text + "}")
    refusal(path, "nested")


def test_a_metadata_file_over_its_cap_is_refused_before_it_is_read(good, tmp_path):
    path = copy_of(good, tmp_path)
    with (path / "metadata.json").open("r+b") as f:
        f.truncate((64 << 20) + 1)  # sparse: the loader must refuse by its size, not read 64 MiB of zeros
    refusal(path, r"metadata\.json is too large")


def test_a_weights_file_over_its_cap_is_refused_before_it_is_read(good, tmp_path):
    path = copy_of(good, tmp_path)
    (path / "model.onnx").unlink()
    redigest(path, lambda m: m["files"].pop("model.onnx"))
    with (path / "model.safetensors").open("r+b") as f:
        f.truncate((4 << 30) + 1)  # sparse, 4 GiB and one byte
    refusal(path, r"model\.safetensors is too large")


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("metadata.json", "copy"),
        ("model.safetensors", "/dev/zero"),
        ("model.safetensors", "copy"),
        ("model.onnx", "copy"),
    ],
)
def test_a_package_file_that_is_a_symbolic_link_is_refused(good, tmp_path, name, target):
    """Even a link to a byte-identical copy: what it points to can change after the check."""
    path = copy_of(good, tmp_path)
    if target == "copy":
        target = str(shutil.copyfile(good / name, tmp_path / f"elsewhere-{name}"))
    (path / name).unlink()
    os.symlink(target, path / name)
    refusal(path, "symbolic link")


# --- ONNX ---------------------------------------------------------------------------------------------------


def test_the_onnx_file_has_the_interface_the_doc_states(good):
    model = onnx.load_model_from_string((good / "model.onnx").read_bytes())
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (features,) = model.graph.input
    assert features.name == "features"
    assert features.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    dims = [d.dim_param or d.dim_value for d in features.type.tensor_type.shape.dim]
    assert dims == ["rows", len(FEATURES)]
    (probability,) = model.graph.output
    assert probability.name == "probability"
    assert probability.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert [d.dim_param for d in probability.type.tensor_type.shape.dim] == ["rows"]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["feature_names"]) == FEATURES


def test_a_package_with_an_onnx_file_is_refused_without_the_onnx_tools(good, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails, as when it is not installed
    message = refusal(good, r"model\.onnx cannot be checked")
    assert "fedhealth[onnx]" in message


def test_a_federated_packages_scaling_is_checked_for_form_but_its_figures_only_at_the_orchestrator(tmp_path):
    """``standardize = "federated"``: the spec hash covers the request, not the released figures. A scaling
    of the wrong form is refused; different figures with an ONNX file rebuilt for them load (the doc says
    to compare them with round 0's result), and change every prediction."""
    request = {"standardize": "federated"}
    released = {"standardize": "federated", "mean": PREPROCESSING["mean"], "scale": PREPROCESSING["scale"]}
    good = write_logreg(tmp_path / "good", params=params_of(released), spec=spec_of(params_of(request)))
    genuine = fedhealth.load_model(good).predict_proba(ROWS.drop(columns="cp").assign(cp_2=0, cp_3=1))

    def scaling(**values: Any) -> Callable[[dict[str, Any]], None]:
        def edit(m: dict[str, Any]) -> None:
            for section in (m["preprocessing"], m["model"]["preprocessing"]):
                section.update(values)

        return edit

    for n, values in enumerate([{"scale": [0.0, 1.0, 1.0, 1.0]}, {"mean": [0.0], "scale": [1.0]}]):
        path = copy_of(good, tmp_path, f"malformed-{n}")
        redigest(path, scaling(**values))
        refusal(path, "cannot be used here")
    path = copy_of(good, tmp_path, "refigured")
    redigest(path, scaling(mean=[0.0, 0.0, 0.0, 0.0]))
    refusal(path, r"model\.onnx is not the model the package holds")
    forged = params_of({**released, "mean": [0.0, 0.0, 0.0, 0.0]})
    build = LOGREG_RECIPE.export(forged, model_of(0.8)).onnx
    assert build is not None
    (path / "model.onnx").write_bytes(build())
    redigest(path)
    loaded = fedhealth.load_model(path)
    assert loaded.standardize is StandardizeMode.FEDERATED
    assert not np.allclose(loaded.predict_proba(ROWS.drop(columns="cp").assign(cp_2=0, cp_3=1)), genuine)


# --- collective (boosting) packages -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightgbm_package(tmp_path_factory) -> Path:
    from fedhealth.data import load_heart_disease

    centers = [load_heart_disease(c, heart_data_dir(), download=False) for c in range(2)]
    full: dict[str, Any] = {
        "n_features": 13,
        "feature_names": list(centers[0].feature_names),
        "num_rounds": 2,
        "objective": "binary",
        "num_leaves": 4,
    }
    params = LightGbmParams(**full)
    model = train_pooled(params, centers)
    result = {"model": model.model_text, "binning": model.binning.to_json()}
    export = LIGHTGBM_RECIPE.export(params, result)
    weights = canonical_json(result)
    spec = {"name": "s", "recipe": {"name": "lightgbm", "version": "1", "params": full}}
    out = tmp_path_factory.mktemp("boosting") / "lightgbm"
    write_package(out, export=export, weights=weights, origin=package_origin(spec, weights), collective=True)
    return out


def test_a_listed_model_file_that_the_study_result_does_not_hold_is_refused(lightgbm_package, tmp_path):
    """A LightGBM package that also ships ``model.json`` (an XGBoost model of anything), listed with its
    digest: only ``model.txt`` is checked against the result, so the extra file must not be there."""
    path = copy_of(lightgbm_package, tmp_path)
    fedhealth.load_model(path)  # the control
    (path / "model.json").write_text('{"learner": {"note": "another model"}}')
    redigest(path, lambda m: m["files"].update({"model.json": ""}))
    refusal(path, r"lists model\.json, a model file the study's result does not hold")


# --- export: --force, and the order files land in -----------------------------------------------------------


def test_a_forced_export_replaces_the_package_removes_a_stale_onnx_and_keeps_other_files(good, tmp_path):
    out = copy_of(good, tmp_path, "package")
    (out / "notes.txt").write_text("keep me")
    site = params_of(None)  # per-site standardization: no ONNX file
    with pytest.raises(PackageError, match="exists and is not empty"):
        write_logreg(out, params=site)
    write_logreg(out, params=site, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert fedhealth.load_model(out).standardize is StandardizeMode.SITE


def test_a_forced_export_into_a_folder_holding_another_model_file_is_refused_and_writes_nothing(
    good, tmp_path
):
    """A ``model.txt`` left from a LightGBM package would sit unverified beside the new package (and the
    loader refuses such a folder); it is not the export's to delete, so the export stops first."""
    out = copy_of(good, tmp_path, "package")
    (out / "model.txt").write_text("tree\nversion=v4\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PackageError, match=r"holds model\.txt, a model file this package would not replace"):
        write_logreg(out, weight=-2.0, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_each_file_lands_by_rename_with_the_metadata_last_so_an_interrupted_export_is_refused(
    good, tmp_path, monkeypatch
):
    written: list[str] = []
    real = package_module.write_private_file

    def record(path: Path, data: bytes) -> None:
        written.append(path.name)
        if path.name == "metadata.json":
            raise OSError(28, "No space left on device")
        real(path, data)

    out = copy_of(good, tmp_path, "package")
    monkeypatch.setattr(package_module, "write_private_file", record)
    with pytest.raises(PackageError, match="cannot write the package"):
        write_logreg(out, weight=-2.0, force=True)
    assert written[-1] == "metadata.json"
    assert set(written) == {
        "metadata.json",
        "model.onnx",
        "model.safetensors",
    }
    assert not [p.name for p in out.iterdir() if p.name not in set(written)]  # no temporary file left
    refusal(out, "was modified")  # the old metadata does not vouch for the new weights


# --- feeding it a table -------------------------------------------------------------------------------------


def test_a_complex_column_is_refused_not_cut_to_its_real_part(good):
    with pytest.raises(PackageInputError, match="column 'age' holds complex128 values, not numbers"):
        fedhealth.load_model(good).predict_proba(ROWS.assign(age=ROWS["age"] + 1j))


def test_categories_compare_as_text_and_a_boolean_is_no_category(good):
    loaded = fedhealth.load_model(good)
    expected = loaded.predict_proba(ROWS)
    for cp in (ROWS["cp"].astype(float), ROWS["cp"].astype(str), pd.Series([" 1", "2 ", "3"])):
        np.testing.assert_array_equal(loaded.predict_proba(ROWS.assign(cp=cp)), expected)
    with pytest.raises(PackageInputError, match="column 'cp' holds"):
        loaded.predict_proba(ROWS.assign(cp=[True, False, True]))


# --- fedhealth model predict --package on a CSV file --------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def predict(package: Path, csv: Path) -> Any:
    return cli("model", "predict", "--package", package, "--csv", csv, "--id", "patient_id", "--json")


def test_model_predict_selects_csv_columns_by_name_in_any_order(good, tmp_path):
    ids = ["p1", "p2", "p3"]
    plain = write_csv(
        tmp_path / "plain.csv",
        ["patient_id", "age", "chol", "cp"],
        [[i, *r] for i, r in zip(ids, ROWS.itertuples(index=False), strict=True)],
    )
    reordered = write_csv(
        tmp_path / "reordered.csv",
        ["cp", "note", "chol", "patient_id", "age"],
        [[r.cp, "x", r.chol, i, r.age] for i, r in zip(ids, ROWS.itertuples(index=False), strict=True)],
    )
    bodies = []
    for csv in (plain, reordered):
        result = predict(good, csv)
        assert result.exit_code == 0, result.output
        bodies.append(json.loads(result.stdout))
    expected = fedhealth.load_model(good).predict_proba(ROWS)
    for body in bodies:
        assert [p["id"] for p in body["predictions"]] == ids
        np.testing.assert_array_equal([p["probability"] for p in body["predictions"]], expected)


def test_a_csv_whose_rows_have_one_field_more_than_the_header_is_refused_not_shifted(good, tmp_path):
    """pandas takes the first column as the index when every row is one field longer than the header,
    and shifts each value under the next column's name: age would be read as the id, chol as age..."""
    csv = write_csv(
        tmp_path / "shifted.csv",
        ["patient_id", "age", "chol", "cp"],
        [["p1", 40, 180, 1, 0], ["p2", 70, 260, 2, 0]],
    )
    line = one_error(predict(good, csv))
    assert "line 2 has 5 fields, the header has 4" in line


def test_a_csv_header_naming_a_column_twice_is_refused(good, tmp_path):
    """pandas renames the second ``age`` to ``age.1`` and the model would read the first, silently."""
    csv = write_csv(
        tmp_path / "twice.csv", ["patient_id", "age", "chol", "cp", "age"], [["p1", 40, 180, 1, 90]]
    )
    line = one_error(predict(good, csv))
    assert "the header names column(s) ['age'] more than once" in line


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        (["patient_id", "age", "cp"], ["p1", 40, 1], "lacks column(s) ['chol']"),
        (["patient_id", "age", "chol", "cp"], ["p1", 40, "high", 1], "column 'chol' holds"),
        (["patient_id", "age", "chol", "cp"], ["p1", 40, "", 1], "column 'chol' has 1 missing value(s)"),
        (["patient_id", "age", "chol", "cp"], ["p1", 40, "inf", 1], "column 'chol' holds an infinite value"),
        (["patient_id", "age", "chol", "cp"], ["p1", 40, 180, 7], "column 'cp' holds ['7']"),
        (["patient_id", "age", "chol", "cp"], ["p1", 40, 180], "line 2 has 3 fields, the header has 4"),
    ],
    ids=["missing-column", "text", "empty", "infinite", "unknown-category", "short-row"],
)
def test_model_predict_refuses_a_csv_that_does_not_fit_in_one_line(good, tmp_path, header, row, message):
    csv = write_csv(tmp_path / "rows.csv", header, [row, ["p2", 70, 260, 2][: len(row)]])
    line = one_error(predict(good, csv))
    assert message in line
    assert "p1" not in line  # no patient id in the message
    assert "p2" not in line


def test_model_predict_refuses_a_tampered_package_in_one_line(good, tmp_path):
    path = copy_of(good, tmp_path)
    redigest(path, lambda m: m.update(recipe={"name": "xgboost", "version": "1"}))
    csv = write_csv(tmp_path / "rows.csv", ["patient_id", "age", "chol", "cp"], [["p1", 40, 180, 1]])
    line = one_error(predict(path, csv))
    assert "the metadata's recipe differs from its model section" in line
