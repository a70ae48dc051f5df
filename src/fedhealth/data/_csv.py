"""Tabular CSV files: a header row, numeric features, one binary label column, optionally an id column."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedhealth.core import DatasetError, DatasetMissingError, InputError
from fedhealth.data._dataset import TabularDataset, fit_scaling, split_indices
from fedhealth.data._errors import NonNumericColumnError, SchemaError


@dataclass(frozen=True, slots=True, kw_only=True)
class CsvOptions:
    """How to read a CSV file: the label column, an optional patient-id column, the held-out fraction and its
    seed, and whether to standardize features with the training part's mean and std."""

    label: str
    id_column: str | None = None
    test_fraction: float = 0.3
    seed: int = 0
    standardize: bool = True


def _number(path: Path, line: int, column: str, text: str) -> float:
    value = text.strip()
    if not value:
        raise SchemaError(
            f"{path}: line {line}, column {column!r} is empty (missing values are not supported)"
        )
    try:
        number = float(value)
    except ValueError:
        raise NonNumericColumnError(
            f"{path}: line {line}, column {column!r} holds {value[:40]!r}, not a number", column=column
        ) from None
    if not math.isfinite(number):
        raise SchemaError(f"{path}: line {line}, column {column!r} holds {value[:40]!r}, not a finite number")
    return number


def read_csv_dataset(path: Path, options: CsvOptions) -> TabularDataset:
    """Read, validate, split (stratified like FLamby's split) and optionally standardize a CSV file."""
    if not path.is_file():
        raise DatasetMissingError(f"CSV file {path} does not exist")
    try:
        return _read(path, options)
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except csv.Error as exc:
        raise SchemaError(f"{path}: not a readable CSV file ({exc})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def _read(path: Path, options: CsvOptions) -> TabularDataset:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise SchemaError(f"{path}: the file is empty (a header row is required)")
        columns = [c.strip() for c in header]
        if len(set(columns)) != len(columns):
            raise SchemaError(f"{path}: the header repeats a column name")
        for role, name in (("label", options.label), ("id", options.id_column)):
            if name is not None and name not in columns:
                raise SchemaError(f"{path}: {role} column {name!r} is not in the header {columns}")
        if options.id_column == options.label:
            raise SchemaError(f"{path}: the label column cannot also be the id column")
        label_at = columns.index(options.label)
        id_at = columns.index(options.id_column) if options.id_column is not None else None
        feature_at = [i for i in range(len(columns)) if i not in (label_at, id_at)]
        if not feature_at:
            raise SchemaError(f"{path}: no feature columns besides the label and id columns")
        features: list[list[float]] = []
        labels: list[int] = []
        ids: list[str] = []
        for record in reader:
            line = reader.line_num
            if not record or all(not c.strip() for c in record):
                continue
            if len(record) != len(columns):
                raise SchemaError(
                    f"{path}: line {line} has {len(record)} fields, the header has {len(columns)}"
                )
            label = _number(path, line, options.label, record[label_at])
            if label not in (0.0, 1.0):
                raise SchemaError(
                    f"{path}: line {line}, label column {options.label!r} holds {label:g}; "
                    "labels must be 0 or 1"
                )
            labels.append(int(label))
            features.append([_number(path, line, columns[i], record[i]) for i in feature_at])
            if id_at is not None:
                pid = record[id_at].strip()
                if not pid:
                    raise SchemaError(f"{path}: line {line}, id column {options.id_column!r} is empty")
                ids.append(pid)
    if not labels:
        raise SchemaError(f"{path}: no data rows after the header")
    if id_at is not None and len(set(ids)) != len(ids):
        raise SchemaError(f"{path}: id column {options.id_column!r} repeats an id")
    X = np.array(features, dtype=np.float64)
    y = np.array(labels, dtype=np.int64)
    scaling = None
    try:
        train, test = split_indices(y, test_size=options.test_fraction, random_state=options.seed)
        X_train, X_test = X[train], X[test]
        if options.standardize:
            scaling = fit_scaling(X_train)
            X_train, X_test = scaling.apply(X_train), scaling.apply(X_test)
    except InputError as exc:
        raise SchemaError(f"{path}: {exc}") from exc
    return TabularDataset(
        name=path.stem,
        X_train=X_train,
        y_train=y[train],
        X_test=X_test,
        y_test=y[test],
        feature_names=tuple(columns[i] for i in feature_at),
        patient_ids_train=tuple(ids[i] for i in train) if id_at is not None else None,
        patient_ids_test=tuple(ids[i] for i in test) if id_at is not None else None,
        scaling=scaling,
    )
