"""A downloaded model, used on new data: ``fedhealth model predict`` and :func:`load_model` in a notebook.

A study's model is a safetensors file (``fedhealth study download ID --model FILE``). For the logistic
regression recipe it holds ``weight`` (one number per feature) and ``bias``; :func:`predict_csv` applies it to
the rows of a raw CSV file whose feature columns are those the study trained on, in the same order.

Scaling: each site standardized its features with its own data's mean and standard deviation before
training, so the model expects standardized inputs. ``Scaling.OWN`` (the default) standardizes the new file
the same way, with its own mean and standard deviation; ``Scaling.NONE`` passes values through (for a file
that is standardized already).

A full model package (:func:`export_package`, ``fedhealth model export``; docs/model-packages.md) carries the
feature names, the study's preprocessing, label meaning, provenance and privacy guarantee with the weights,
and ``fedhealth.load_model`` applies it to a pandas DataFrame of raw columns.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhealth.core import (
    InputError,
    TensorError,
    canonical_json,
    decode_tensors,
    sha256_hex,
    write_private_file,
)
from fedhealth.data import standardize
from fedhealth.learning import (
    CombinationPattern,
    PackageError,
    PackageOrigin,
    RecipeError,
    logreg_evaluate,
    logreg_predict_proba,
    resolve_recipe,
    write_package,
)

if TYPE_CHECKING:
    from fedhealth.client._operator import OperatorClient
    from fedhealth.protocol import StudyInfo


class Scaling(StrEnum):
    OWN = "own"  # standardize with the file's own mean and std, as each site did with its data
    NONE = "none"  # the values are used as they are


class ModelFileError(InputError):
    """A model file cannot be read, or is not a model this release can apply."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogisticModel:
    """A logistic-regression model: P(y = 1 | x) = sigmoid(weight . x + bias)."""

    weight: np.ndarray
    bias: float
    digest: str  # sha256 of the file: what the study's provenance and model card name

    @property
    def n_features(self) -> int:
        return int(self.weight.shape[0])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """P(y = 1) for each row of ``X`` (already scaled as the model expects)."""
        return logreg_predict_proba(self._params(), X)

    def _params(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": np.array([self.bias], dtype=np.float32)}


def load_model(path: Path | str) -> LogisticModel:
    """Read a downloaded study model (safetensors)."""
    file = Path(path)
    try:
        blob = file.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{file}: no such model file") from None
    except OSError as exc:
        raise ModelFileError(f"{file}: cannot be read ({exc.strerror or exc})") from exc
    try:
        tensors, _ = decode_tensors(blob)
    except TensorError as exc:
        raise ModelFileError(f"{file}: not a fedhealth model ({exc})") from exc
    if set(tensors) != {"weight", "bias"} or tensors["bias"].shape != (1,) or tensors["weight"].ndim != 1:
        raise ModelFileError(
            f"{file}: holds tensors {sorted(tensors)}; only logistic-regression models (weight, bias) can be "
            "applied here"
        )
    return LogisticModel(
        weight=np.asarray(tensors["weight"], dtype=np.float32),
        bias=float(tensors["bias"][0]),
        digest=sha256_hex(blob),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Predictions:
    """The model's output for each row, with accuracy and AUC when the file has its label column."""

    row_ids: tuple[str, ...]
    probabilities: np.ndarray
    labels: np.ndarray | None
    accuracy: float | None
    auc: float | None

    def to_csv(self, path: Path, id_name: str = "id") -> None:
        """One row per prediction (id, probability, prediction). An id, or ``id_name``, that a spreadsheet
        would read as a formula is written as text (:func:`spreadsheet_text`): the file is opened by an
        analyst, and the ids come from whoever wrote the input file.

        The file is written 0600 (a prediction per patient id) through a new file beside ``path``, renamed
        over it: a symbolic link another account planted at ``path`` is replaced, never written through."""
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow([spreadsheet_text(id_name), "probability", "prediction"])
        for rid, p in zip(self.row_ids, self.probabilities, strict=True):
            writer.writerow([spreadsheet_text(rid), f"{p:.6f}", int(p > 0.5)])
        write_private_file(path, text.getvalue().encode("utf-8"))


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def spreadsheet_text(text: str) -> str:
    """``text`` as a CSV cell a spreadsheet shows and never evaluates: one starting with ``=``, ``+``, ``-``,
    ``@``, a tab or a carriage return, and not a plain number, gets a leading apostrophe (OWASP's advice
    against CSV injection)."""
    if text.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def predict_csv(
    model: LogisticModel,
    path: Path | str,
    *,
    label: str | None = None,
    id_column: str | None = None,
    scaling: Scaling = Scaling.OWN,
) -> Predictions:
    """Apply ``model`` to every row of a CSV file: its columns other than ``label`` and ``id_column`` are the
    features, in file order. Rows are named by ``id_column``, else by their line number."""
    file = Path(path)
    X, y, ids, features = _read(file, label, id_column)
    if X.shape[1] != model.n_features:
        raise InputError(
            f"{file}: {X.shape[1]} feature column(s) ({', '.join(features)}); the model expects "
            f"{model.n_features} (name the label with --label and the id column with --id)"
        )
    if scaling is Scaling.OWN:
        X, _ = standardize(X, X)
    probabilities = model.predict_proba(X)
    accuracy = auc = None
    if y is not None:
        result = logreg_evaluate(model._params(), X, y)
        accuracy, auc = result.accuracy, result.auc
    return Predictions(row_ids=ids, probabilities=probabilities, labels=y, accuracy=accuracy, auc=auc)


def predict_csv_with_package(
    package: Path | str, path: Path | str, *, label: str | None = None, id_column: str | None = None
) -> tuple[str, Predictions]:
    """Apply a model package (``fedhealth.load_model``) to every row of a CSV file; returns the model digest
    and the predictions. Columns are selected by name; rows are named by ``id_column``, else their line."""
    import pandas as pd

    from fedhealth.learning import load_package

    loaded = load_package(package)
    file = Path(path)
    _check_csv_shape(file)
    try:
        # index_col=False: pandas would otherwise take the first column as an index when every row has
        # one field more than the header, and shift each value under the next column's name
        frame = pd.read_csv(file, dtype={id_column: str} if id_column is not None else None, index_col=False)
    except FileNotFoundError:
        raise InputError(f"{file}: no such CSV file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{file}: cannot be read as CSV ({exc})") from exc
    for role, name in (("label", label), ("id", id_column)):
        if name is not None and name not in frame.columns:
            raise InputError(f"{file}: {role} column {name!r} is not in the header {list(frame.columns)}")
    probabilities = loaded.predict_proba(frame)
    ids = (
        tuple(str(v).strip() for v in frame[id_column].tolist())
        if id_column is not None
        else tuple(str(i + 2) for i in range(len(frame)))
    )
    y = accuracy = auc = None
    if label is not None:
        y = pd.to_numeric(frame[label], errors="coerce").to_numpy(dtype=np.float64)
        if not set(np.unique(y)) <= {0.0, 1.0}:
            raise InputError(f"{file}: label column {label!r} must hold 0 or 1")
        accuracy = float(((probabilities > 0.5) == (y == 1.0)).mean())
        if np.unique(y).size == 2:
            from sklearn.metrics import roc_auc_score  # scikit-learn loads slowly: on first use

            auc = float(roc_auc_score(y, probabilities))
    predictions = Predictions(row_ids=ids, probabilities=probabilities, labels=y, accuracy=accuracy, auc=auc)
    return loaded.model_digest, predictions


def _check_csv_shape(path: Path) -> None:
    """A package selects a CSV file's columns by name, so each name must be in the header once and every
    row must have the header's number of fields (pandas would rename a repeated column ``age.1`` and read
    the first one, or shift a row's values under the wrong names)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None:
                raise InputError(f"{path}: is empty; a CSV file with a header row is needed")
            names = [c.strip() for c in header]
            repeated = sorted(n for n, times in Counter(names).items() if times > 1)
            if repeated:
                raise InputError(f"{path}: the header names column(s) {repeated} more than once")
            for line, record in enumerate(rows, start=2):
                if record and len(record) != len(header):
                    raise InputError(
                        f"{path}: line {line} has {len(record)} fields, the header has {len(header)}"
                    )
    except FileNotFoundError:
        raise InputError(f"{path}: no such CSV file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot be read as CSV ({exc})") from exc


def _read(
    path: Path, label: str | None, id_column: str | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise InputError(f"{path}: no such CSV file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot be read as CSV ({exc})") from exc
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise InputError(f"{path}: needs a header row and at least one data row")
    header = [c.strip() for c in rows[0]]
    for role, name in (("label", label), ("id", id_column)):
        if name is not None and name not in header:
            raise InputError(f"{path}: {role} column {name!r} is not in the header {header}")
    feature_at = [i for i, c in enumerate(header) if c not in (label, id_column)]
    X = np.empty((len(rows) - 1, len(feature_at)), dtype=np.float64)
    y = np.empty(len(rows) - 1, dtype=np.float64) if label is not None else None
    ids: list[str] = []
    for r, record in enumerate(rows[1:]):
        line = r + 2
        if len(record) != len(header):
            raise InputError(f"{path}: line {line} has {len(record)} fields, the header has {len(header)}")
        for j, i in enumerate(feature_at):
            X[r, j] = _number(path, line, header[i], record[i])
        if y is not None and label is not None:
            y[r] = _number(path, line, label, record[header.index(label)])
        ids.append(record[header.index(id_column)].strip() if id_column is not None else str(line))
    if y is not None and not set(np.unique(y)) <= {0.0, 1.0}:
        raise InputError(f"{path}: label column {label!r} must hold 0 or 1")
    return X, y, tuple(ids), [header[i] for i in feature_at]


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise InputError(
            f"{path}: line {line}, column {column!r} holds {text.strip()[:40]!r}, not a number "
            "(name an id column with --id)"
        ) from None
    if not math.isfinite(value):
        raise InputError(f"{path}: line {line}, column {column!r} is not a finite number")
    return value


# --- model packages ---------------------------------------------------------------------------------------


def export_package(
    client: OperatorClient, study_id: str, out: Path, *, force: bool = False, now: datetime | None = None
) -> dict[str, Any]:
    """Write study ``study_id``'s final model as a model package into ``out`` (see
    fedhealth.learning's ``write_package``); returns the package's metadata.

    Refuses (:class:`~fedhealth.learning.PackageError`) a study that has not completed, a folder that exists
    and is not empty (unless ``force``), and a model or spec that does not match what the orchestrator
    states for the study (digest, spec hash). A collective study's model (federated boosting) is its
    session's released result: the package holds it and the library's own model file."""
    from fedhealth import __version__
    from fedhealth.client._operator import ClientError
    from fedhealth.protocol import StudyStatus

    info = client.study(study_id)
    if info.status is not StudyStatus.COMPLETED:
        raise PackageError(
            f"study {study_id} is {info.status.value}; only a completed study's final model is packaged "
            "(`fedhealth study download ID --model FILE` saves its latest model as it is)"
        )
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise PackageError(f"{out} exists and is not an empty folder; choose a new folder or give --force")
    spec = info.spec.model_dump(mode="json")
    spec_hash = sha256_hex(canonical_json(spec))
    if info.spec_hash is not None and info.spec_hash != spec_hash:
        raise PackageError(f"study {study_id}: the spec's hash differs from the one its sites approved")
    recipe = info.spec.recipe
    try:
        pattern = resolve_recipe(recipe.name, recipe.version, recipe.params).pattern
    except RecipeError as exc:
        raise PackageError(f"study {study_id}: its model cannot be exported here ({exc})") from exc
    if pattern is CombinationPattern.COLLECTIVE:
        return _export_session_result(info, out, spec, spec_hash, force=force, version=__version__, now=now)
    if info.model_digest is None:
        raise PackageError(f"study {study_id} has no released model")
    weights = client.model_bytes(study_id)
    if sha256_hex(weights) != info.model_digest:
        raise PackageError(f"study {study_id}: the model downloaded is not the study's final model (digest)")
    recipe = info.spec.recipe
    try:
        # standardize = "federated": the recipe with the scaling its pre-step (round 0) released, which
        # the package then records (mean and scale in its preprocessing)
        from fedhealth.runtime import SCALING_ROUND, effective_recipe, released_scaling

        pre_step = next((r for r in info.rounds if r.number == SCALING_ROUND), None)
        scaling = released_scaling(pre_step.metrics if pre_step is not None else None)
        recipe = effective_recipe(recipe, scaling)
        resolved = resolve_recipe(recipe.name, recipe.version, recipe.params)
        tensors, _ = decode_tensors(weights, resolved.param_specs())
        export = resolved.export(tensors)
    except (RecipeError, TensorError, InputError) as exc:
        raise PackageError(f"study {study_id}: its model cannot be exported here ({exc})") from exc
    provenance: dict[str, Any] | None
    try:
        lineage = client.request("GET", f"/api/v1/governance/models/{info.model_digest}/provenance").json()
        provenance = lineage["lineage"][0] if lineage.get("lineage") else None
    except ClientError as exc:
        if exc.status != 404:
            raise
        provenance = None  # an orchestrator without governance keeps no provenance
    origin = PackageOrigin(
        study_id=study_id,
        spec=spec,
        spec_hash=spec_hash,
        model_digest=info.model_digest,
        provenance=provenance,
        privacy=_privacy(spec, provenance),
        software_version=__version__,
        exported_at=(now or datetime.now(UTC)).isoformat(),
    )
    return write_package(out, export=export, weights=weights, origin=origin, force=force)


def _export_session_result(
    info: StudyInfo,
    out: Path,
    spec: dict[str, Any],
    spec_hash: str,
    *,
    force: bool,
    version: str,
    now: datetime | None,
) -> dict[str, Any]:
    """A completed collective study's package: its session's released result (``result.json``, whose
    sha256 is the model digest) and the recipe's native model file. The provenance is the session's: when
    it ran, its calls, and each site's attestation (approval, consent, cohort) the orchestrator holds."""
    session = info.rounds[-1] if info.rounds else None
    if session is None or not session.metrics:
        raise PackageError(f"study {info.study_id} has no released result")
    result = dict(session.metrics)
    recipe = info.spec.recipe
    try:
        export = resolve_recipe(recipe.name, recipe.version, recipe.params).export_result(result)
    except (RecipeError, KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"study {info.study_id}: its model cannot be exported here ({exc})") from exc
    released = canonical_json(result)
    provenance = {
        "kind": "collective session",
        "round": session.number,
        "started_at": session.started_at.isoformat(),
        "ended_at": session.ended_at.isoformat() if session.ended_at is not None else None,
        "session": result.get("session"),
        "sites": {
            t.site: t.attestation.model_dump(mode="json") if t.attestation is not None else None
            for t in session.tasks
        },
    }
    origin = PackageOrigin(
        study_id=info.study_id,
        spec=spec,
        spec_hash=spec_hash,
        model_digest=sha256_hex(released),
        provenance=provenance,
        privacy=_privacy(spec, None),
        software_version=version,
        exported_at=(now or datetime.now(UTC)).isoformat(),
    )
    return write_package(out, export=export, weights=released, origin=origin, force=force, collective=True)


def _privacy(spec: dict[str, Any], provenance: dict[str, Any] | None) -> dict[str, Any] | None:
    """The guarantee a package states: record level, the largest site's epsilon at the spec's delta (each
    site's ledger attested its own), and the site-level figure in site modes; None without DP."""
    privacy = spec.get("privacy")
    if privacy is None:
        return None
    dp = dict(provenance.get("dp_params") or {}) if provenance is not None else {}
    per_site = dict(provenance.get("epsilon_spent") or {}) if provenance is not None else {}
    return {
        "mode": privacy.get("mode"),
        "level": dp.get("level", "record"),
        "epsilon": max(per_site.values()) if per_site else None,
        "delta": dp.get("epsilon_delta", privacy.get("delta")),
        "per_site_epsilon": per_site,
        "site_level_epsilon": dp.get("site_level_epsilon"),
        "accountant": privacy.get("accountant"),
    }
