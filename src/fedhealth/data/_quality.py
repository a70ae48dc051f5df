"""A local data-quality report: missingness, ranges and outliers of each column, seen at the site only.

``fedhealth site dataset check NAME`` prints it; nothing here is ever sent to the orchestrator or written to
an audit entry (it holds values: minima, maxima, category counts). Outliers are Tukey's "far out" values,
beyond three interquartile ranges from the quartiles; a column whose quartiles coincide (a binary column)
reports none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhealth.data._dataset import TabularDataset
from fedhealth.data._schema import CategoricalColumn, DateColumn
from fedhealth.data._table import ParsedTable

_FAR_OUT = 3.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ColumnQuality:
    """One source column: how many values are missing, the range and spread of the others (numbers, and
    dates as the declared days or years), far-out values, and for a category column the count of each."""

    column: str
    kind: str
    rows: int
    missing: int
    minimum: float | None = None
    maximum: float | None = None
    mean: float | None = None
    std: float | None = None
    outliers: int = 0
    categories: tuple[tuple[str, int], ...] = ()
    unseen: int = 0

    @property
    def missing_fraction(self) -> float:
        return self.missing / self.rows if self.rows else 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "column": self.column,
            "kind": self.kind,
            "rows": self.rows,
            "missing": self.missing,
            "missing_fraction": round(self.missing_fraction, 6),
        }
        if self.categories:
            out["categories"] = dict(self.categories)
            out["unseen"] = self.unseen
        else:
            out.update(
                min=self.minimum, max=self.maximum, mean=self.mean, std=self.std, outliers=self.outliers
            )
        return out

    def line(self) -> str:
        missing = f"missing {self.missing} ({100 * self.missing_fraction:.1f}%)"
        if self.categories:
            counts = ", ".join(f"{c}: {n}" for c, n in self.categories)
            unseen = f", other: {self.unseen}" if self.unseen else ""
            return f"{self.column} ({self.kind}): {missing}; {counts}{unseen}"
        if self.minimum is None:
            return f"{self.column} ({self.kind}): {missing}; no values"
        return (
            f"{self.column} ({self.kind}): {missing}; range [{self.minimum:g}, {self.maximum:g}], "
            f"mean {self.mean:.4g}, std {self.std:.4g}, far-out values {self.outliers}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class QualityReport:
    """The report of one dataset: rows, labels, and one entry per feature column."""

    rows: int
    positives: int  # rows of label 1
    columns: tuple[ColumnQuality, ...]
    ignored_columns: tuple[str, ...] = ()
    # a connector's own findings, one line each (e.g. identifying DICOM attributes)
    warnings: tuple[str, ...] = ()
    levels: tuple[int, ...] = ()  # rows of each label 0..K-1, when the label has more than two classes

    def label_counts(self) -> list[int]:
        """Rows per label, label 0 first."""
        return list(self.levels) if self.levels else [self.rows - self.positives, self.positives]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rows": self.rows,
            "label_counts": {str(k): n for k, n in enumerate(self.label_counts())},
            "columns": [c.to_json() for c in self.columns],
            "ignored_columns": list(self.ignored_columns),
        }
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out

    def lines(self) -> list[str]:
        if self.levels:
            per_label = ", ".join(f"label {k} in {n}" for k, n in enumerate(self.levels))
            out = [f"{self.rows} rows; {per_label}"]
        else:
            out = [f"{self.rows} rows; label 1 in {self.positives}, label 0 in {self.rows - self.positives}"]
        out.extend(f"  {c.line()}" for c in self.columns)
        if self.ignored_columns:
            out.append(f"  not used as features: {', '.join(self.ignored_columns)}")
        out.extend(f"  warning: {w}" for w in self.warnings)
        return out


def _numeric(column: str, kind: str, values: np.ndarray, missing: np.ndarray) -> ColumnQuality:
    present = values[~missing]
    if present.size == 0:
        return ColumnQuality(column=column, kind=kind, rows=values.size, missing=int(missing.sum()))
    q1, q3 = np.percentile(present, [25, 75])
    iqr = q3 - q1
    outliers = (
        int(((present < q1 - _FAR_OUT * iqr) | (present > q3 + _FAR_OUT * iqr)).sum()) if iqr > 0 else 0
    )
    return ColumnQuality(
        column=column,
        kind=kind,
        rows=values.size,
        missing=int(missing.sum()),
        minimum=float(present.min()),
        maximum=float(present.max()),
        mean=float(present.mean()),
        std=float(present.std(ddof=1)) if present.size > 1 else 0.0,
        outliers=outliers,
    )


def table_quality(table: ParsedTable) -> QualityReport:
    """The report of a parsed source table (before missing values are filled)."""
    columns: list[ColumnQuality] = []
    for col in table.columns:
        spec = col.spec
        if isinstance(spec, CategoricalColumn):
            codes = col.values[~col.missing].astype(np.int64)
            counts = np.bincount(codes, minlength=len(spec.categories) + 1)
            columns.append(
                ColumnQuality(
                    column=col.column,
                    kind="categorical",
                    rows=table.rows,
                    missing=int(col.missing.sum()),
                    categories=tuple(
                        (c, int(n))
                        for c, n in zip(spec.categories, counts[: len(spec.categories)], strict=True)
                    ),
                    unseen=int(counts[len(spec.categories)]),
                )
            )
        else:
            kind = f"date, {spec.unit.value}" if isinstance(spec, DateColumn) else "numeric"
            columns.append(_numeric(col.column, kind, col.values, col.missing))
    counts = np.bincount(np.asarray(table.labels, dtype=np.int64), minlength=2)
    return QualityReport(
        rows=table.rows,
        positives=int(counts[1]),
        columns=tuple(columns),
        ignored_columns=table.ignored,
        levels=tuple(int(n) for n in counts) if counts.size > 2 else (),
    )


def dataset_quality(dataset: TabularDataset) -> QualityReport:
    """The report of a dataset known only by its arrays (a builtin one): its features as given."""
    X = np.concatenate([dataset.X_train, dataset.X_test])
    y = np.concatenate([dataset.y_train, dataset.y_test])
    none = np.zeros(X.shape[0], dtype=np.bool_)
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=dataset.classes)
    return QualityReport(
        rows=int(X.shape[0]),
        positives=int(counts[1]),
        levels=tuple(int(n) for n in counts) if dataset.classes > 2 else (),
        columns=tuple(
            _numeric(name, "numeric", X[:, j], none) for j, name in enumerate(dataset.feature_names)
        ),
    )
