"""Fed-Heart-Disease: the UCI Heart Disease data as FLamby's benchmark prepares it (Terrail et al. 2022).

Reproduced step by step from FLamby's ``fed_heart_disease/dataset.py`` so numbers compare:

1. each hospital's ``processed.<center>.data`` file: 14 comma-separated columns, ``?`` for missing;
2. drop slope, ca and thal (columns 10-12), then every row with a remaining missing value
   → 303 / 261 / 46 / 130 rows;
3. label = 1 if num > 0 (any angiographic disease) else 0;
4. per center, sklearn ``train_test_split`` of the row indices with train_size 0.66, test_size 1 - 0.66,
   random_state 43, stratified on the label unless a class has two rows or fewer (only Switzerland, with one
   healthy patient) → 199/104, 172/89, 30/16, 85/45; each part keeps the file's row order;
5. one-hot cp (levels 1-4) and restecg (levels 0-2), dropping the first level, appended after the 8 other
   columns → 13 features. FLamby lets pandas find the levels on the four centers together; the levels are
   the UCI coding, all present in the union, so fixing them here gives the same columns for every center even
   when one level is absent in it;
6. standardize each center with its own training mean and std (ddof=1) plus 1e-9.

"pooled" concatenates the four centers' standardized train sets, and their test sets, in center order: the
data a federation of the four sees (``PooledScaling.PER_CENTER``, the default). FLamby's own pooled loader
instead scales the raw pooled data with the pooled training mean/std (``PooledScaling.GLOBAL``) while its
per-center test sets keep per-center scaling; that variant is here to reproduce FLamby's pooled number.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedhealth.core import ConfigError, DatasetMissingError
from fedhealth.core import data_dir as default_data_dir
from fedhealth.data._dataset import TabularDataset, fit_scaling, split_indices, standardize
from fedhealth.data._download import download_verified, verify_md5
from fedhealth.data._errors import SchemaError

if TYPE_CHECKING:
    import httpx

HEART_DISEASE_BASE_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/"
HEART_DISEASE_SUBDIR = "heart_disease"


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartDiseaseCenter:
    index: int
    city: str
    filename: str
    md5: str


HEART_DISEASE_CENTERS: tuple[HeartDiseaseCenter, ...] = (
    HeartDiseaseCenter(
        index=0, city="cleveland", filename="processed.cleveland.data", md5="2d91a8ff69cfd9616aa47b59d6f843db"
    ),
    HeartDiseaseCenter(
        index=1, city="hungarian", filename="processed.hungarian.data", md5="22e96bee155b5973568101c93b3705f6"
    ),
    HeartDiseaseCenter(
        index=2,
        city="switzerland",
        filename="processed.switzerland.data",
        md5="9a87f7577310b3917730d06ba9349e20",
    ),
    HeartDiseaseCenter(
        index=3, city="va", filename="processed.va.data", md5="4249d03ca7711e84f4444768c9426170"
    ),
)

_N_COLUMNS = 14
_NUMERIC = (
    (0, "age"),
    (1, "sex"),
    (3, "trestbps"),
    (4, "chol"),
    (5, "fbs"),
    (7, "thalach"),
    (8, "exang"),
    (9, "oldpeak"),
)
_CP, _RESTECG, _NUM = 2, 6, 13
_CP_LEVELS = (1.0, 2.0, 3.0, 4.0)
_RESTECG_LEVELS = (0.0, 1.0, 2.0)
_KEPT = (*[i for i, _ in _NUMERIC], _CP, _RESTECG, _NUM)

HEART_DISEASE_FEATURES: tuple[str, ...] = (
    *[name for _, name in _NUMERIC],
    *[f"cp_{int(v)}" for v in _CP_LEVELS[1:]],
    *[f"restecg_{int(v)}" for v in _RESTECG_LEVELS[1:]],
)
_TRAIN_FRACTION = 0.66


class PooledScaling(StrEnum):
    """How the "pooled" dataset is standardized."""

    PER_CENTER = "per-center"  # each center with its own training statistics, then concatenated
    GLOBAL = "global"  # FLamby's pooled loader: the raw pooled data with the pooled training statistics


_SPLIT_SEED = 43


def heart_disease_file(
    center: int,
    data_dir: Path | str | None = None,
    *,
    download: bool = True,
    base_url: str = HEART_DISEASE_BASE_URL,
    http_client: httpx.Client | None = None,
) -> Path:
    """The verified path of one center's file, downloading it (atomically, md5-checked) if it is absent.

    Raises :class:`ChecksumError` if the file present differs from the published one, and
    :class:`DatasetMissingError` if it is absent and cannot be fetched.
    """
    spec = _center(center)
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    path = folder / HEART_DISEASE_SUBDIR / spec.filename
    if path.is_file():
        verify_md5(path, spec.md5)
        return path
    how = (
        "copy the UCI file there, or set FEDHEALTH_DATA_DIR to a folder holding "
        f"{HEART_DISEASE_SUBDIR}/{spec.filename}"
    )
    if not download:
        raise DatasetMissingError(f"heart-disease file {path} is missing and downloads are off; {how}")
    try:
        download_verified(base_url + spec.filename, path, spec.md5, client=http_client)
    except DatasetMissingError as exc:
        raise DatasetMissingError(f"heart-disease file {exc}; {how}") from exc
    return path


def _center(center: int) -> HeartDiseaseCenter:
    if (
        isinstance(center, bool)
        or not isinstance(center, int)
        or not 0 <= center < len(HEART_DISEASE_CENTERS)
    ):
        raise ConfigError(f"heart-disease center must be 0, 1, 2, 3 or 'pooled', got {center!r}")
    return HEART_DISEASE_CENTERS[center]


def _parse(path: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Rows left after dropping slope/ca/thal and incomplete rows: (10 raw columns, labels, data lines)."""
    rows: list[list[float]] = []
    lines: list[int] = []
    with path.open(newline="", encoding="ascii") as f:
        line_no = -1
        for file_line, record in enumerate(csv.reader(f), start=1):
            if not record or all(not c.strip() for c in record):
                continue
            line_no += 1
            if len(record) != _N_COLUMNS:
                raise SchemaError(f"{path}: line {file_line} has {len(record)} fields, expected {_N_COLUMNS}")
            kept = [record[i].strip() for i in _KEPT]
            if "?" in kept:
                continue
            try:
                rows.append([float(v) for v in kept])
            except ValueError as exc:
                raise SchemaError(f"{path}: line {file_line} holds a value that is not a number") from exc
            lines.append(line_no)
    data = np.array(rows, dtype=np.float64).reshape(-1, len(_KEPT))
    return data[:, :-1], (data[:, -1] > 0).astype(np.int64), lines


def _encode(path: Path, raw: np.ndarray) -> np.ndarray:
    """8 numeric columns, then cp and restecg one-hot without their first level: 13 features."""
    n_numeric = len(_NUMERIC)
    cp = raw[:, n_numeric]
    restecg = raw[:, n_numeric + 1]
    for name, values, levels in (("cp", cp, _CP_LEVELS), ("restecg", restecg, _RESTECG_LEVELS)):
        if not np.isin(values, levels).all():
            bad = sorted(set(values.tolist()) - set(levels))
            raise SchemaError(f"{path}: {name} takes values {bad} outside the UCI coding {list(levels)}")
    onehot = [cp == v for v in _CP_LEVELS[1:]] + [restecg == v for v in _RESTECG_LEVELS[1:]]
    return np.column_stack([raw[:, :n_numeric], *[c.astype(np.float64) for c in onehot]])


@dataclass(frozen=True, slots=True, kw_only=True)
class _RawCenter:
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    ids_train: tuple[str, ...]
    ids_test: tuple[str, ...]


def _raw_center(
    center: int, folder: Path | str | None, download: bool, http_client: httpx.Client | None
) -> _RawCenter:
    """Steps 1-5 of the protocol for one center: encoded and split, not yet standardized."""
    spec = _center(center)
    path = heart_disease_file(center, folder, download=download, http_client=http_client)
    raw, y, lines = _parse(path)
    X = _encode(path, raw)
    train, test = split_indices(
        y, test_size=1.0 - _TRAIN_FRACTION, train_size=_TRAIN_FRACTION, random_state=_SPLIT_SEED
    )
    return _RawCenter(
        X_train=X[train],
        y_train=y[train],
        X_test=X[test],
        y_test=y[test],
        ids_train=tuple(f"hd{spec.index}-{lines[i]:06d}" for i in train),
        ids_test=tuple(f"hd{spec.index}-{lines[i]:06d}" for i in test),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartDiseaseRecord:
    """One patient row of a center as the protocol keeps it (steps 1-3), before encoding: the raw UCI
    values, the label, and the id ``hd<center>-<line>`` the loader gives it. For building the same
    patients in other forms (CSV, SQL, OMOP CDM, FHIR) in tests and benchmarks."""

    patient_id: str
    age: float
    sex: float
    trestbps: float
    chol: float
    fbs: float
    thalach: float
    exang: float
    oldpeak: float
    cp: int
    restecg: int
    disease: int


def heart_disease_records(
    center: int, data_dir: Path | str | None = None, *, download: bool = True
) -> tuple[HeartDiseaseRecord, ...]:
    """Every kept row of one center in file order (ids as :func:`load_heart_disease` gives them)."""
    spec = _center(center)
    path = heart_disease_file(center, data_dir, download=download)
    raw, y, lines = _parse(path)
    names = [name for _, name in _NUMERIC]
    return tuple(
        HeartDiseaseRecord(
            patient_id=f"hd{spec.index}-{line:06d}",
            **{name: float(row[k]) for k, name in enumerate(names)},
            cp=int(row[len(names)]),
            restecg=int(row[len(names) + 1]),
            disease=int(label),
        )
        for row, label, line in zip(raw, y, lines, strict=True)
    )


def _scaled(name: str, parts: Sequence[_RawCenter], per_part: bool) -> TabularDataset:
    """Standardize (each part on its own, or all on the union of the training parts) and concatenate."""
    scaling = None  # per-center parts of a pooled set have no one scaling to refit on a subset
    if per_part:
        scaled = [standardize(p.X_train, p.X_test) for p in parts]
        X_train = np.concatenate([s[0] for s in scaled])
        X_test = np.concatenate([s[1] for s in scaled])
        if len(parts) == 1:
            scaling = fit_scaling(parts[0].X_train)
    else:
        scaling = fit_scaling(np.concatenate([p.X_train for p in parts]))
        X_train = scaling.apply(np.concatenate([p.X_train for p in parts]))
        X_test = scaling.apply(np.concatenate([p.X_test for p in parts]))
    return TabularDataset(
        name=name,
        X_train=X_train,
        y_train=np.concatenate([p.y_train for p in parts]),
        X_test=X_test,
        y_test=np.concatenate([p.y_test for p in parts]),
        feature_names=HEART_DISEASE_FEATURES,
        patient_ids_train=tuple(i for p in parts for i in p.ids_train),
        patient_ids_test=tuple(i for p in parts for i in p.ids_test),
        scaling=scaling,
    )


def load_heart_disease(
    center: int | Literal["pooled"],
    data_dir: Path | str | None = None,
    *,
    pooled_scaling: PooledScaling = PooledScaling.PER_CENTER,
    download: bool = True,
    http_client: httpx.Client | None = None,
) -> TabularDataset:
    """One center of Fed-Heart-Disease (0 Cleveland, 1 Hungary, 2 Switzerland, 3 VA Long Beach), or "pooled".

    Files are read from ``<data_dir>/heart_disease/`` (default: ``fedhealth.core.data_dir()``, i.e.
    ``$FEDHEALTH_DATA_DIR``), checked against FLamby's md5 values, and downloaded from the UCI repository when
    absent (unless ``download=False``). Training rows carry ids ``hd<center>-<line>``: the row's 0-based data
    line in the source file. ``pooled_scaling`` matters only for "pooled" (see :class:`PooledScaling`).
    """
    if not isinstance(pooled_scaling, PooledScaling):
        raise ConfigError(f"pooled_scaling must be a PooledScaling, got {pooled_scaling!r}")
    if isinstance(center, str):
        if center != "pooled":
            raise ConfigError(f"heart-disease center must be 0, 1, 2, 3 or 'pooled', got {center!r}")
        parts = [_raw_center(c.index, data_dir, download, http_client) for c in HEART_DISEASE_CENTERS]
        return _scaled("heart-disease-pooled", parts, per_part=pooled_scaling is PooledScaling.PER_CENTER)
    return _scaled(f"heart-disease-{center}", [_raw_center(center, data_dir, download, http_client)], True)
