"""Model packages: a study's trained model as a folder a hospital can deploy without fedhealth's services.

Layout (docs/model-packages.md)::

    DIR/metadata.json       what the model is and how to feed it (below), with the digests of the files
    DIR/model.safetensors   the released model, byte for byte the orchestrator's (its sha256 is the model
                            digest that the study's provenance and audit log name)
    DIR/model.onnx          the same model with its standardization, for recipes that can (optional)

A collective recipe's model (federated LightGBM or XGBoost) is not a tensor file the orchestrator stored:
its package holds instead::

    DIR/result.json         the study's result as the orchestrator holds it (canonical JSON; its sha256 is
                            the package's model digest)
    DIR/model.txt | .json   the model in its library's own format (``ModelExport.native_file``)

``metadata.json`` holds the recipe's export metadata under ``model`` (feature names in input order,
preprocessing, label meaning), where the model came from (study, spec hash, the whole study spec, model
digest, provenance, privacy guarantee), and ``files`` (name → sha256). :func:`load_package` checks all of it
before anything is predicted: each file's digest (every file a regular one, read with a bound; no model
file in the folder that ``files`` does not list; the JSON finite and shallow), the weights'
digest against the model digest, the spec's hash, that the recipe, given the spec's params and the weights,
exports exactly the ``model`` section recorded (so an edited mean, scale or feature order is refused, not
applied; a federated scaling's figures, which the spec does not hold, only by their form and the ONNX file),
and that ``model.onnx`` is the file the recipe builds from those weights. ``package_digest``
covers the rest of the metadata (``privacy`` and ``provenance`` included: whoever edits a package can
recompute it). These checks catch corruption and edits; authenticity is the model digest and spec hash
matching what the orchestrator's provenance (``fedhealth provenance show DIGEST``) and each site's approval
record say.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.core import (
    ConfigError,
    InputError,
    TensorError,
    canonical_json,
    decode_tensors,
    refuse_foreign_folder,
    sha256_hex,
    write_private_file,
)
from fedhealth.data import category_text
from fedhealth.learning._boosting import first_line
from fedhealth.learning._errors import RecipeError
from fedhealth.learning._preprocessing import StandardizeMode
from fedhealth.learning._recipe import ModelExport
from fedhealth.learning._registry import resolve_recipe

PACKAGE_FORMAT = "fedhealth.model-package.v1"
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "model.safetensors"
RESULT_FILE = "result.json"  # a collective study's released result, in place of the weights
ONNX_FILE = "model.onnx"
_PACKAGE_FILES = (METADATA_FILE, WEIGHTS_FILE, ONNX_FILE)
_STALE_FILES = (ONNX_FILE, WEIGHTS_FILE, RESULT_FILE)  # removed by a forced export that writes none
_NATIVE_FILE = re.compile(r"^model\.[a-z0-9]{1,8}\Z")  # a library's own model file: model.txt, model.json
# the names under which a model runtime would read a model from the folder (LightGBM's model.txt, XGBoost's
# model.json or .ubj, ONNX, torch, pickles): such a file the metadata does not list is refused. Notes beside a
# package (model.md, model.csv) are the hospital's own and stay allowed.
_MODEL_FILE_NAMES = frozenset(
    ("model", ext)
    for ext in ("safetensors", "onnx", "txt", "json", "ubj", "bin", "pt", "pth", "pkl", "joblib")
)
_MAX_METADATA_BYTES = 64 * 1024 * 1024
_MAX_FILE_BYTES = 4 << 30  # any other package file (docs/model-packages.md, "What loading checks")
# A package's JSON is a few levels deep (provenance: about 6); a bound keeps a hostile file from
# exhausting the interpreter's recursion in the parser or in canonical_json.
_MAX_JSON_DEPTH = 64


class PackageError(InputError):
    """A model package cannot be written or read, or fails its integrity checks."""


class PackageInputError(InputError):
    """A table given to a package's model does not fit what the model was trained on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PackageOrigin:
    """Where a packaged model came from, as the orchestrator states it.

    ``spec`` is the study spec as JSON (its canonical-JSON sha256 is ``spec_hash``), ``model_digest`` the
    sha256 of the weights file, ``provenance`` the model version's provenance record (None when the
    orchestrator keeps none), ``privacy`` the guarantee (``level``, ``epsilon``, ``delta``; None without
    differential privacy)."""

    study_id: str
    spec: Mapping[str, Any]
    spec_hash: str
    model_digest: str
    provenance: Mapping[str, Any] | None
    privacy: Mapping[str, Any] | None
    software_version: str
    exported_at: str


def _json(value: Any) -> Any:
    """``value`` as plain JSON data (tuples become lists), for comparing what was recorded."""
    return json.loads(canonical_json(value))


def package_metadata(export: ModelExport, origin: PackageOrigin, files: Mapping[str, str]) -> dict[str, Any]:
    """The whole ``metadata.json`` (with its ``package_digest``)."""
    model = _json(dict(export.metadata))
    metadata: dict[str, Any] = {
        "format": PACKAGE_FORMAT,
        "recipe": {"name": model.get("recipe"), "version": model.get("version")},
        "feature_names": model.get("feature_names"),
        "preprocessing": model.get("preprocessing"),
        "label": model.get("label"),
        "model": model,
        "study_id": origin.study_id,
        "spec_hash": origin.spec_hash,
        "study_spec": _json(dict(origin.spec)),
        "model_digest": origin.model_digest,
        "provenance": _json(dict(origin.provenance)) if origin.provenance is not None else None,
        "privacy": _json(dict(origin.privacy)) if origin.privacy is not None else None,
        "fedhealth_version": origin.software_version,
        "exported_at": origin.exported_at,
        "files": dict(sorted(files.items())),
    }
    metadata["package_digest"] = sha256_hex(canonical_json(metadata))
    return metadata


def write_package(
    out: Path,
    *,
    export: ModelExport,
    weights: bytes,
    origin: PackageOrigin,
    force: bool = False,
    collective: bool = False,
) -> dict[str, Any]:
    """Write a package into ``out``; returns its metadata.

    ``out`` must not exist or be an empty folder; with ``force`` an existing folder's package files are
    replaced (other files in it are left alone, a stale ONNX file is removed). Everything is checked and
    built in memory first; each file then lands by an atomic rename, the metadata last. ``collective``:
    ``weights`` is a collective study's result (canonical JSON), written as ``result.json`` beside the
    export's native model file."""
    if sha256_hex(weights) != origin.model_digest:
        raise PackageError("the weights given are not the model the origin names (digest differs)")
    recipe = f"recipe {export.metadata.get('recipe')!r}"
    if export.predict_proba is None and export.predict is None:
        raise PackageError(f"{recipe} gives no way to apply its model outside fedhealth; nothing to package")
    if export.metadata.get("feature_names") is None:
        raise PackageError(
            f"the study named no features, and a package selects a table's columns by name: declare "
            f"feature_names in the {recipe}'s params"
        )
    _refuse_a_folder_of_another_account(out)
    if out.exists() and not out.is_dir():
        raise PackageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PackageError(f"{out} exists and is not empty; choose a new folder or give --force to replace")
    blobs: dict[str, bytes] = {RESULT_FILE if collective else WEIGHTS_FILE: weights}
    if collective:
        if export.native_file is None or not _NATIVE_FILE.match(export.native_file[0]):
            raise PackageError(f"{recipe} gives no model file of its library to package")
        blobs[export.native_file[0]] = export.native_file[1]
    if export.onnx is not None:
        blobs[ONNX_FILE] = export.onnx()
    metadata = package_metadata(export, origin, {name: sha256_hex(b) for name, b in blobs.items()})
    blobs[METADATA_FILE] = json.dumps(metadata, indent=2, sort_keys=True).encode("utf-8") + b"\n"
    if out.is_dir():
        # a loader refuses a package whose folder holds a model file its metadata does not list
        # (load_package); one this package does not write is the user's to move, not ours to delete
        stray = sorted(n for n in _layout_names(out) if n not in blobs and n not in _STALE_FILES)
        if stray:
            raise PackageError(
                f"{out} holds {stray[0]}, a model file this package would not replace; move it or choose "
                "a new folder"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in _STALE_FILES:
            if stale not in blobs:
                (out / stale).unlink(missing_ok=True)
        for name in sorted(blobs, key=lambda n: n == METADATA_FILE):  # the metadata last
            write_private_file(out / name, blobs[name])
    except OSError as exc:
        raise PackageError(f"cannot write the package into {out}: {exc.strerror or exc}") from exc
    return metadata


def _refuse_a_folder_of_another_account(out: Path) -> None:
    """A package folder that is a symbolic link (its files would land, and ``force`` would replace files,
    wherever it points), or that another local account owns (it could swap the files once written)."""
    try:
        refuse_foreign_folder(out, what="the package folder")
    except ConfigError as exc:
        raise PackageError(str(exc)) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class InputColumn:
    """A column the model reads from a table: numeric, or categorical with its categories."""

    name: str
    categories: tuple[str, ...] | None = None


class ModelPackage:
    """A verified model package (:func:`load_package`): ``predict_proba`` on a pandas DataFrame of raw
    columns, selected by name, encoded and standardized as the study declared."""

    def __init__(self, *, path: Path, metadata: Mapping[str, Any], export: ModelExport) -> None:
        self.path = path
        self.metadata = metadata
        self._export = export
        model = metadata["model"]
        self.feature_names: tuple[str, ...] = tuple(model["feature_names"])
        pre = model["preprocessing"]
        self.standardize = StandardizeMode(pre["standardize"])
        self._mean = np.asarray(pre["mean"], dtype=np.float64) if pre["mean"] is not None else None
        self._scale = np.asarray(pre["scale"], dtype=np.float64) if pre["scale"] is not None else None
        # feature → (raw column, category it is 1 for); numeric features read the column of their name
        self._one_hot: dict[str, tuple[str, str]] = {}
        columns: dict[str, InputColumn] = {}
        categorical = pre.get("categorical") or {}
        for column, encoding in categorical.items():
            categories = tuple(encoding["categories"])
            features = encoding["features"]
            for feature, category in zip(features, categories[-len(features) :], strict=True):
                self._one_hot[feature] = (column, category)
        for feature in self.feature_names:
            if feature in self._one_hot:
                column = self._one_hot[feature][0]
                columns.setdefault(
                    column, InputColumn(name=column, categories=tuple(categorical[column]["categories"]))
                )
            else:
                columns.setdefault(feature, InputColumn(name=feature))
        self.input_columns: tuple[InputColumn, ...] = tuple(columns.values())

    @property
    def model_digest(self) -> str:
        return str(self.metadata["model_digest"])

    @property
    def spec_hash(self) -> str:
        return str(self.metadata["spec_hash"])

    @property
    def privacy(self) -> Mapping[str, Any] | None:
        value = self.metadata.get("privacy")
        return value if isinstance(value, Mapping) else None

    def features(self, frame: Any) -> np.ndarray:
        """The model's feature matrix (rows of ``frame``, columns in ``feature_names`` order), encoded but
        not yet standardized; :class:`PackageInputError` naming the first problem otherwise. Columns the
        model does not read are ignored; no missing value is accepted (the model has no rule to fill one)."""
        import pandas as pd

        if not isinstance(frame, pd.DataFrame):
            raise PackageInputError(f"predict_proba takes a pandas DataFrame, not {type(frame).__name__}")
        missing = [c.name for c in self.input_columns if c.name not in frame.columns]
        if missing:
            raise PackageInputError(
                f"the table lacks column(s) {missing}; the model reads {[c.name for c in self.input_columns]}"
            )
        if frame.columns.duplicated().any():
            repeated = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
            raise PackageInputError(f"the table has repeated column names {repeated}")
        values: dict[str, np.ndarray] = {}
        for column in self.input_columns:
            series = frame[column.name]
            absent = series.isna().to_numpy()
            if absent.any():
                rows = [str(i) for i in series.index[absent][:5]]
                raise PackageInputError(
                    f"column {column.name!r} has {int(absent.sum())} missing value(s) (rows {', '.join(rows)}"
                    f"{', ...' if absent.sum() > 5 else ''}); the model accepts none: fill or drop them first"
                )
            if column.categories is None:
                values[column.name] = _numeric(column.name, series)
            else:
                values[column.name] = _categories(column, series)
        out = np.empty((len(frame), len(self.feature_names)), dtype=np.float64)
        for j, feature in enumerate(self.feature_names):
            if feature in self._one_hot:
                source, category = self._one_hot[feature]
                out[:, j] = values[source] == category
            else:
                out[:, j] = values[feature]
        return out

    def standardized(self, X: np.ndarray) -> np.ndarray:
        """``X`` (from :meth:`features`) standardized as the model was trained."""
        if self.standardize in (StandardizeMode.GIVEN, StandardizeMode.FEDERATED):
            if self._mean is None or self._scale is None:
                raise PackageInputError("this package's federated scaling is missing (mean and scale)")
            return (X - self._mean) / self._scale
        if self.standardize is StandardizeMode.NONE:
            return X
        raise PackageInputError(
            "this model was trained on features each site standardized with its own statistics, so no one "
            "scaling comes with it; pass features standardized as a site would (assume_standardized=True), "
            "or train with preprocessing standardize = 'given'"
        )

    def predict_proba(self, frame: Any, *, assume_standardized: bool = False) -> np.ndarray:
        """P(label = 1) for each row of the DataFrame ``frame`` (float64, in row order)."""
        X = self.features(frame)
        if not assume_standardized:
            X = self.standardized(X)
        predict = self._export.predict_proba
        if predict is None:
            raise PackageInputError(
                "this model is not a binary classifier (multiclass or regression): use predict(frame)"
            )
        return np.asarray(predict(X), dtype=np.float64)

    def predict(self, frame: Any, *, assume_standardized: bool = False) -> np.ndarray:
        """The model's output for each row of ``frame``: P(label = 1) for a binary classifier, class
        probabilities (rows x classes) for a multiclass one, the predicted value for a regression."""
        X = self.features(frame)
        if not assume_standardized:
            X = self.standardized(X)
        predict = self._export.predict or self._export.predict_proba
        assert predict is not None  # load_package refuses an export without either
        return np.asarray(predict(X), dtype=np.float64)


def _numeric(name: str, series: Any) -> np.ndarray:
    import pandas as pd

    if (
        pd.api.types.is_bool_dtype(series)
        or pd.api.types.is_complex_dtype(series)  # float64 would drop the imaginary part
        or not pd.api.types.is_numeric_dtype(series)
    ):
        raise PackageInputError(
            f"column {name!r} holds {series.dtype} values, not numbers (convert it, e.g. "
            "pandas.to_numeric, before predicting)"
        )
    values = np.asarray(series.to_numpy(dtype=np.float64), dtype=np.float64)
    if not np.isfinite(values).all():
        raise PackageInputError(f"column {name!r} holds an infinite value")
    return values


def _categories(column: InputColumn, series: Any) -> np.ndarray:
    assert column.categories is not None
    texts = np.array([category_text(v) for v in series.tolist()], dtype=object)
    known = set(column.categories)
    unseen = sorted({t for t in texts.tolist() if t not in known})
    if unseen:
        raise PackageInputError(
            f"column {column.name!r} holds {unseen[:5]}, not among its categories {list(column.categories)}"
        )
    return texts


def load_package(path: Path | str) -> ModelPackage:
    """Read and verify a model package (:class:`PackageError` if anything does not check out)."""
    folder = Path(path)
    if not folder.is_dir():
        raise PackageError(f"{folder}: no such package folder")
    metadata = _read_metadata(folder)
    files = metadata.get("files")
    if not isinstance(files, dict) or (WEIGHTS_FILE in files) == (RESULT_FILE in files):
        raise PackageError(f"{folder}: metadata lists neither {WEIGHTS_FILE} nor {RESULT_FILE}, or both")
    weights_file = WEIGHTS_FILE if WEIGHTS_FILE in files else RESULT_FILE
    unlisted = sorted(n for n in _layout_names(folder) if n not in files)
    if unlisted:
        # model.onnx or a library's model file beside the package, unverified, would be read by
        # onnxruntime or the library as the package's model
        raise PackageError(f"{folder}: holds {unlisted[0]}, which its metadata does not list")
    blobs: dict[str, bytes] = {}
    for name, digest in files.items():
        native = weights_file == RESULT_FILE and bool(_NATIVE_FILE.match(name)) and name != ONNX_FILE
        if (name not in _PACKAGE_FILES and name != RESULT_FILE and not native) or name == METADATA_FILE:
            raise PackageError(f"{folder}: metadata lists an unexpected file {name!r}")
        blob = _read_file(folder, name, _MAX_FILE_BYTES)
        if sha256_hex(blob) != digest:
            raise PackageError(f"{folder}: {name} was modified (its sha256 differs from the metadata's)")
        blobs[name] = blob
    claimed = {k: v for k, v in metadata.items() if k != "package_digest"}
    if sha256_hex(canonical_json(claimed)) != metadata.get("package_digest"):
        raise PackageError(f"{folder}: {METADATA_FILE} was modified (its package_digest does not match)")
    if sha256_hex(blobs[weights_file]) != metadata.get("model_digest"):
        raise PackageError(f"{folder}: {weights_file} is not the model the metadata names")
    spec = metadata.get("study_spec")
    if not isinstance(spec, dict) or sha256_hex(canonical_json(spec)) != metadata.get("spec_hash"):
        raise PackageError(f"{folder}: the study spec does not match its spec hash")
    if weights_file == RESULT_FILE:
        export = _reexport_result(folder, spec, blobs[RESULT_FILE])
        native = export.native_file
        if native is None or blobs.get(native[0]) != native[1]:
            raise PackageError(f"{folder}: the model file is not the one the study's result holds")
        others = sorted(n for n in blobs if n not in (RESULT_FILE, ONNX_FILE, native[0]))
        if others:
            raise PackageError(f"{folder}: lists {others[0]}, a model file the study's result does not hold")
    else:
        export = _reexport(folder, spec, blobs[WEIGHTS_FILE], metadata.get("preprocessing"))
    if _json(dict(export.metadata)) != metadata.get("model"):
        raise PackageError(
            f"{folder}: the metadata's model section differs from what the study spec and weights give "
            "(feature names, preprocessing or label were edited)"
        )
    for key in ("feature_names", "preprocessing", "label"):
        if metadata.get(key) != metadata["model"].get(key):
            raise PackageError(f"{folder}: the metadata's {key} differs from its model section")
    recipe = {"name": metadata["model"].get("recipe"), "version": metadata["model"].get("version")}
    if metadata.get("recipe") != recipe:
        raise PackageError(f"{folder}: the metadata's recipe differs from its model section")
    if export.predict_proba is None and export.predict is None:
        raise PackageError(f"{folder}: recipe {spec['recipe'].get('name')!r} gives no way to predict")
    if metadata["model"].get("feature_names") is None:
        raise PackageError(f"{folder}: the study named no features, so no table can be fed to this model")
    if ONNX_FILE in blobs:
        _check_onnx(folder, export, blobs[ONNX_FILE])
    return ModelPackage(path=folder, metadata=metadata, export=export)


def _check_onnx(folder: Path, export: ModelExport, onnx: bytes) -> None:
    """``model.onnx`` must be the file the recipe builds from the verified model: its digest in
    ``files`` is only as good as the metadata, which whoever edits a package recomputes. The recipes build
    it deterministically (the boosting ones run it against the model as they build it)."""
    if export.onnx is None:
        raise PackageError(
            f"{folder}: the package has a {ONNX_FILE} but its recipe builds none for this model"
        )
    try:
        rebuilt = export.onnx()
    except Exception as exc:  # onnx, onnxmltools or onnxruntime missing or failing: the file is unverified
        raise PackageError(
            f"{folder}: {ONNX_FILE} cannot be checked against the model ({first_line(exc)}); install "
            "fedhealth[onnx] to load this package"
        ) from exc
    if rebuilt != onnx:
        raise PackageError(
            f"{folder}: {ONNX_FILE} is not the model the package holds (a different ONNX graph)"
        )


def _read_file(folder: Path, name: str, limit: int) -> bytes:
    """A package file's bytes, if it is a regular file (not a link, a pipe or a device, which could be
    read without end) of at most ``limit`` bytes."""
    file = folder / name
    try:
        if stat.S_ISLNK(file.lstat().st_mode):
            raise PackageError(f"{folder}: {name} is a symbolic link, not a file of the package")
        # O_NOFOLLOW: a link swapped in after lstat is not followed; O_NONBLOCK: a pipe does not block open
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PackageError(f"{folder}: {name} is missing") from None
    except OSError as exc:
        raise PackageError(f"{folder}: {name} cannot be read ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PackageError(f"{folder}: {name} is not a regular file (a pipe, device or folder)")
        if info.st_size > limit:
            raise PackageError(f"{folder}: {name} is too large (over {limit >> 20} MiB)")
        try:
            blob = handle.read(limit + 1)
        except OSError as exc:
            raise PackageError(f"{folder}: {name} cannot be read ({exc.strerror or exc})") from exc
    if len(blob) > limit:
        raise PackageError(f"{folder}: {name} is too large (over {limit >> 20} MiB)")
    return blob


def _read_metadata(folder: Path) -> dict[str, Any]:
    if not (folder / METADATA_FILE).exists() and not (folder / METADATA_FILE).is_symlink():
        raise PackageError(f"{folder}: no {METADATA_FILE}; not a fedhealth model package")
    metadata = _strict_json(folder, METADATA_FILE, _read_file(folder, METADATA_FILE, _MAX_METADATA_BYTES))
    if not isinstance(metadata, dict) or metadata.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{folder}: not a {PACKAGE_FORMAT} package")
    return metadata


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def _strict_json(folder: Path, name: str, blob: bytes) -> Any:
    """``blob`` as JSON that canonical JSON can hash: finite numbers only (no NaN, Infinity or 1e999),
    nested at most ``_MAX_JSON_DEPTH`` levels."""
    try:
        value = json.loads(blob, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise PackageError(f"{folder}: {name} is nested too deeply") from None
    except ValueError as exc:
        raise PackageError(f"{folder}: {name} cannot be read as JSON ({first_line(exc)})") from exc
    level = [value]
    for _ in range(_MAX_JSON_DEPTH):
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        if not level:
            return value
    raise PackageError(f"{folder}: {name} is nested more than {_MAX_JSON_DEPTH} levels deep")


def _layout_names(folder: Path) -> list[str]:
    """The names in ``folder`` that are a package's model files (weights, result, ONNX, a library's
    model file), whatever the metadata lists."""
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError as exc:
        raise PackageError(f"{folder}: cannot be listed ({exc.strerror or exc})") from exc
    return [n for n in names if n in _STALE_FILES or n.partition(".")[::2] in _MODEL_FILE_NAMES]


def _reexport_result(folder: Path, spec: Mapping[str, Any], released: bytes) -> ModelExport:
    """The export of a collective study's result, as the study's recipe makes it from ``result.json``."""
    recipe = spec.get("recipe")
    if not isinstance(recipe, dict):
        raise PackageError(f"{folder}: the study spec names no recipe")
    result = _strict_json(folder, RESULT_FILE, released)
    if not isinstance(result, dict):
        raise PackageError(f"{folder}: {RESULT_FILE} holds no study result")
    if not isinstance(recipe.get("params") or {}, dict):
        raise PackageError(f"{folder}: the study spec's recipe params are not a table")
    try:
        resolved = resolve_recipe(
            str(recipe.get("name")), str(recipe.get("version", "1")), recipe.get("params") or {}
        )
        return resolved.export_result(result)
    except RecipeError as exc:
        raise PackageError(f"{folder}: the study's recipe cannot be used here ({exc})") from exc
    except (KeyError, TypeError, ValueError, *_library_errors()) as exc:
        raise PackageError(
            f"{folder}: {RESULT_FILE} does not fit the study's recipe ({first_line(exc)})"
        ) from exc


def _library_errors() -> tuple[type[Exception], ...]:
    """The boosting libraries' own errors (a model they cannot read), from those this process imported:
    evaluated when an error is being handled, so after the library that raised it was imported."""
    found: list[type[Exception]] = []
    for module, name in (("lightgbm.basic", "LightGBMError"), ("xgboost.core", "XGBoostError")):
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, Exception):
            found.append(error)
    return tuple(found)


def _reexport(
    folder: Path, spec: Mapping[str, Any], weights: bytes, recorded: Mapping[str, Any] | None = None
) -> ModelExport:
    recipe = spec.get("recipe")
    if not isinstance(recipe, dict):
        raise PackageError(f"{folder}: the study spec names no recipe")
    if not isinstance(recipe.get("params") or {}, dict):
        raise PackageError(f"{folder}: the study spec's recipe params are not a table")
    params = dict(recipe.get("params") or {})
    pre = params.get("preprocessing")
    if isinstance(pre, dict) and pre.get("standardize") == StandardizeMode.FEDERATED.value:
        # the spec says "federated"; the released mean and scale are the package's record of its pre-step
        # (the spec hash does not cover them: compare with round 0's result at the orchestrator)
        pre_recorded = recorded if isinstance(recorded, Mapping) else {}
        params["preprocessing"] = {
            **pre,
            "mean": pre_recorded.get("mean"),
            "scale": pre_recorded.get("scale"),
        }
    try:
        resolved = resolve_recipe(str(recipe.get("name")), str(recipe.get("version", "1")), params)
        tensors, _ = decode_tensors(weights, resolved.param_specs())
        return resolved.export(tensors)
    except RecipeError as exc:
        raise PackageError(f"{folder}: the study's recipe cannot be used here ({exc})") from exc
    except TensorError as exc:
        raise PackageError(f"{folder}: {WEIGHTS_FILE} does not fit the study's recipe ({exc})") from exc
