"""An attacker's audit of model packages (docs/model-packages.md, "What loading checks"): a package handed to
a hospital by someone who edited it and recomputed every digest the package itself carries, or built it to
hurt the process that loads it. ``fedhealth.load_model`` must refuse each with one
:class:`~fedhealth.learning.PackageError` line.

Tests marked ``xfail(strict=True, reason="DEFECT: ...")`` show a guarantee that does not hold today; they
flip to failures (XPASS) once it is fixed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import fedhealth
from fedhealth.core import canonical_json, encode_tensors, sha256_hex
from fedhealth.learning import (
    LIGHTGBM_RECIPE,
    LOGREG_RECIPE,
    XGBOOST_RECIPE,
    LightGbmParams,
    LogRegParams,
    PackageError,
    XGBoostParams,
    logreg_init,
    train_pooled,
    train_pooled_xgboost,
    write_package,
)
from support import heart_data_dir, package_origin

FEATURES = ["age", "chol", "bp"]
PARAMS = LogRegParams.model_validate(
    {
        "n_features": 3,
        "feature_names": FEATURES,
        "preprocessing": {"standardize": "given", "mean": [50.0, 200.0, 120.0], "scale": [10.0, 40.0, 15.0]},
        "label_meaning": "the outcome",
    }
)
SPEC = {"name": "s", "recipe": {"name": "logreg", "version": "1", "params": PARAMS.model_dump(mode="json")}}
ROWS = pd.DataFrame({"age": [40.0, 70.0], "chol": [180.0, 260.0], "bp": [110.0, 150.0]})


def logreg_model(weight: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, weight) for k, v in logreg_init(3, 0).items()}


def write_logreg(out: Path, weight: float = 0.5) -> Path:
    export = LOGREG_RECIPE.export(PARAMS, logreg_model(weight))
    weights = encode_tensors(export.tensors)
    write_package(out, export=export, weights=weights, origin=package_origin(SPEC, weights))
    return out


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_logreg(tmp_path_factory.mktemp("pkg") / "good")


def copy_of(path: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(path, tmp_path / name))


def metadata_of(path: Path) -> dict[str, Any]:
    return json.loads((path / "metadata.json").read_text())


def redigest(path: Path, edit: Callable[[dict[str, Any]], None] = lambda m: None) -> None:
    """Apply ``edit`` to the metadata, then recompute every digest the package carries: each listed file's,
    the model digest (of whichever file holds the model) and the package digest, as an attacker would."""
    metadata = metadata_of(path)
    edit(metadata)
    files = metadata["files"]
    for name in files:
        if ((path / name).is_file() and name.startswith("model")) or name == "result.json":
            files[name] = sha256_hex((path / name).read_bytes())
    holder = "result.json" if "result.json" in files else "model.safetensors"
    if (path / holder).is_file():
        metadata["model_digest"] = sha256_hex((path / holder).read_bytes())
    claimed = {k: v for k, v in metadata.items() if k != "package_digest"}
    metadata["package_digest"] = sha256_hex(canonical_json(claimed))
    (path / "metadata.json").write_text(json.dumps(metadata))


def one_line_refusal(path: Path, match: str | None = None) -> str:
    with pytest.raises(PackageError, match=match) as caught:
        fedhealth.load_model(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_untouched_package_loads_and_predicts(good):
    """The control of the tests below."""
    probabilities = fedhealth.load_model(good).predict_proba(ROWS)
    assert probabilities.shape == (2,)


# --- the model the package names, and what else it ships ----------------------------------------------------


def test_an_onnx_file_of_another_model_is_refused_even_with_the_digests_recomputed(good, tmp_path):
    other = write_logreg(tmp_path / "other", weight=-3.0)
    path = copy_of(good, tmp_path)
    shutil.copyfile(other / "model.onnx", path / "model.onnx")
    redigest(path)
    assert metadata_of(path)["model_digest"] == metadata_of(good)["model_digest"]  # the provenance matches
    one_line_refusal(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["feature_names"].reverse() or m["model"]["feature_names"].reverse(),
        lambda m: m["label"].update(meaning="no disease") or m["model"]["label"].update(meaning="no disease"),
        lambda m: (
            m["preprocessing"].update(standardize="none")
            or m["model"]["preprocessing"].update(standardize="none")
        ),
        lambda m: m["model"].update(n_features=4),
        lambda m: m["model"].update(output="something else"),
        lambda m: m.update(feature_names=["a", "b", "c"]),
    ],
    ids=["feature-order", "label-meaning", "standardization", "shape", "formula", "top-level-only"],
)
def test_metadata_that_lies_about_features_label_shape_or_scaling_is_refused(good, tmp_path, edit):
    path = copy_of(good, tmp_path)
    redigest(path, edit)
    one_line_refusal(path, "differs")


def test_weights_of_another_shape_are_refused_with_the_digests_recomputed(good, tmp_path):
    path = copy_of(good, tmp_path)
    (path / "model.safetensors").write_bytes(encode_tensors(logreg_init(4, 0)))
    redigest(path)
    one_line_refusal(path, "does not fit the study's recipe")


# --- hostile files ------------------------------------------------------------------------------------------


class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(Path(os.environ["FEDHEALTH_ATTACK_MARKER"])),))


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_unpickled(good, tmp_path, monkeypatch):
    marker = tmp_path / "pickle-ran"
    monkeypatch.setenv("FEDHEALTH_ATTACK_MARKER", str(marker))
    path = copy_of(good, tmp_path)
    (path / "model.safetensors").write_bytes(pickle.dumps(_Boom()))
    redigest(path)
    one_line_refusal(path)
    assert not marker.exists()


def _safetensors(header: bytes, body: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + body


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x00" * 7,
        _safetensors(b"{}", length=2**62),
        _safetensors(b"{not json}"),
        _safetensors(b'{"weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}', b"\0" * 8),
        _safetensors(
            b'{"weight": {"dtype": "F32", "shape": [1000000000000], "data_offsets": [0, 4000000000000]},'
            b' "bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            b"\0" * 8,
        ),
        _safetensors(
            b'{"bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            b' "weight": {"dtype": "F32", "shape": [3], "data_offsets": [4, 16]}}',
            struct.pack("<4f", 0.0, float("nan"), 1.0, 1.0),
        ),
    ],
    ids=["empty", "short", "huge-header-length", "header-not-json", "truncated-data", "huge-shape", "nan"],
)
def test_a_malformed_safetensors_file_is_one_line(good, tmp_path, blob):
    path = copy_of(good, tmp_path)
    (path / "model.safetensors").write_bytes(blob)
    redigest(path)
    one_line_refusal(path)


@pytest.mark.parametrize(
    "name",
    [
        "../model.safetensors",
        "/etc/passwd",
        "sub/model.onnx",
        "model.onnx/../../outside",
        "metadata.json",
        "model.pkl",
        "model.txt",
    ],
)
def test_a_listed_file_outside_the_package_layout_is_refused_before_it_is_read(good, tmp_path, name):
    outside = tmp_path / "outside"
    outside.write_bytes(b"not for the loader")
    path = copy_of(good, tmp_path)
    redigest(path, lambda m: m["files"].update({name: sha256_hex(b"not for the loader")}))
    one_line_refusal(path, "unexpected file|neither")


@pytest.mark.parametrize(
    "metadata",
    [
        b"[]",
        b"null",
        b"{",
        b'{"format": "fedhealth.model-package.v0"}',
        b'{"format": "fedhealth.model-package.v1"}',
    ],
)
def test_a_metadata_file_that_is_not_a_package_is_one_line(tmp_path, metadata):
    (tmp_path / "metadata.json").write_bytes(metadata)
    one_line_refusal(tmp_path)


class FifoWriter:
    """Streams ``total`` bytes into a named pipe at ``path`` for whoever opens it, counting what was taken."""

    def __init__(self, path: Path, first: bytes, total: int) -> None:
        os.mkfifo(path)
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path, first, total), daemon=True)
        self._thread.start()

    def _run(self, path: Path, first: bytes, total: int) -> None:
        fd = None
        while fd is None and not self._stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody has opened it for reading
                time.sleep(0.01)
        if fd is None:
            return
        os.set_blocking(fd, True)
        chunk = b" " * (1 << 20)
        try:
            self.written += os.write(fd, first)
            while self.written < total and not self._stop.is_set():
                self.written += os.write(fd, chunk)
        except BrokenPipeError:
            pass
        finally:
            os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.mark.parametrize("name", ["metadata.json", "model.safetensors"])
def test_a_package_file_that_is_a_pipe_is_refused_without_being_read(good, tmp_path, name):
    path = copy_of(good, tmp_path)
    (path / name).unlink()
    first = b'{"format": "fedhealth.model-package.v1", "pad": "' if name == "metadata.json" else b"\0"
    writer = FifoWriter(path / name, first, total=80 << 20)
    try:
        with pytest.raises(PackageError):
            fedhealth.load_model(path)
    finally:
        writer.stop()
    assert writer.written < 2 << 20, f"the loader read {writer.written >> 20} MiB from a pipe"


# --- boosting packages: the library parses the native model of a hostile package ----------------------------

LOADER = """
import sys
import fedhealth
from fedhealth.learning import PackageError
try:
    fedhealth.load_model(sys.argv[1])
except PackageError as exc:
    print("PackageError:", exc)
    sys.exit(0)
except BaseException as exc:
    print("not a PackageError:", type(exc).__module__, type(exc).__name__, str(exc)[:300])
    sys.exit(2)
print("loaded")
sys.exit(3)
"""


@pytest.fixture(scope="module")
def boosting_packages(tmp_path_factory) -> dict[str, Path]:
    from fedhealth.data import load_heart_disease

    centers = [load_heart_disease(c, heart_data_dir(), download=False) for c in range(2)]
    names = list(centers[0].feature_names)
    out: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("boosting")
    for recipe in ("lightgbm", "xgboost"):
        full: dict[str, Any] = {"n_features": 13, "feature_names": names, "num_rounds": 3}
        if recipe == "lightgbm":
            full |= {"objective": "binary", "num_leaves": 4}
            params: Any = LightGbmParams(**full)
            model = train_pooled(params, centers)
            result = {"model": model.model_text, "binning": model.binning.to_json()}
            export = LIGHTGBM_RECIPE.export(params, result)
        else:
            full |= {"objective": "binary:logistic", "max_depth": 2}
            params = XGBoostParams(**full)
            model = train_pooled_xgboost(params, centers)
            result = {"model": model.model_json, "binning": model.binning.to_json()}
            export = XGBOOST_RECIPE.export(params, result)
        spec = {"name": "s", "recipe": {"name": recipe, "version": "1", "params": full}}
        weights = canonical_json(result)
        write_package(
            folder / recipe,
            export=export,
            weights=weights,
            origin=package_origin(spec, weights),
            collective=True,
        )
        out[recipe] = folder / recipe
    return out


def load_in_child(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LOADER, str(path)], capture_output=True, text=True, timeout=240, check=False
    )


def forge_native(source: Path, tmp_path: Path, edit: Callable[[str], str]) -> Path:
    """The package with its model text edited in result.json and in the native file alike, every digest
    recomputed: a self-consistent package whose model the library must parse."""
    path = copy_of(source, tmp_path, "forged")
    result = json.loads((path / "result.json").read_text())
    result["model"] = edit(result["model"])
    (path / "result.json").write_bytes(canonical_json(result))
    native = "model.txt" if (path / "model.txt").exists() else "model.json"
    (path / native).write_bytes(result["model"].encode())
    (path / "model.onnx").unlink(missing_ok=True)
    redigest(path, lambda m: m["files"].pop("model.onnx", None))
    return path


def test_the_untouched_boosting_packages_load_in_a_child_process(boosting_packages, tmp_path):
    """The control: the child loader says 'loaded' for a good package, and one recomputed untouched."""
    for source in boosting_packages.values():
        done = load_in_child(forge_native(source, tmp_path / source.name, lambda text: text))
        assert done.returncode == 3, done.stdout + done.stderr


@pytest.mark.parametrize(
    "edit",
    [lambda text: "tree\nversion=v4\n", lambda text: text[: len(text) // 2]],
    ids=["garbled", "truncated"],
)
def test_a_forged_lightgbm_model_text_is_refused_in_one_line(boosting_packages, tmp_path, edit):
    done = load_in_child(forge_native(boosting_packages["lightgbm"], tmp_path, edit))
    assert done.returncode == 0, f"rc {done.returncode}: {done.stdout[-300:]} {done.stderr[-300:]}"
    assert done.stdout.startswith("PackageError:")


@pytest.mark.parametrize(
    "edit",
    [lambda text: "{}", lambda text: text[: len(text) // 2], lambda text: "not json"],
    ids=["empty-object", "truncated", "not-json"],
)
def test_a_forged_xgboost_model_is_refused_in_one_line(boosting_packages, tmp_path, edit):
    done = load_in_child(forge_native(boosting_packages["xgboost"], tmp_path, edit))
    assert done.returncode == 0, f"rc {done.returncode}: {done.stdout[-300:]} {done.stderr[-300:]}"
    assert done.stdout.startswith("PackageError:")


def test_a_native_model_file_that_differs_from_the_released_model_is_refused(boosting_packages, tmp_path):
    path = copy_of(boosting_packages["lightgbm"], tmp_path)
    text = (path / "model.txt").read_text()
    (path / "model.txt").write_text(text.replace("shrinkage=", "shrinkage=1", 1))
    redigest(path)
    one_line_refusal(path, "model file is not the one the study's result holds")
