"""From a source's table to a :class:`TabularDataset`: one path that every tabular connector shares.

A connector (a CSV or Parquet file, a SQL table or query, an OMOP cohort, a FHIR mapping) only produces a
:class:`SourceTable`: a pandas frame of raw columns and how to name its rows in messages. Everything else
happens here, the same way for every source, so that the same patients give the same dataset bit for bit
whichever source they come from:

1. the schema is resolved (declared, given by the source's own definition, or inferred: every column
   besides the id and the label numeric and complete) and checked against the frame's columns;
2. each column is parsed: the id (text, unique), the label (0 or 1; with ``time=COLUMN`` the event
   indicator, and that column the survival time, a positive number), numbers, categories (declared list,
   unseen values refused or counted as ``other``), dates (days or completed years to a reference), declared
   ranges checked; missing values are refused unless the column declares a policy;
3. rows are ordered by patient id (as integers when every id is one, else as text), so a source's storage
   order never matters;
4. the rows are split (stratified, seeded), missing values filled (mean or median of the training part, or
   a constant), categories one-hot encoded in the declared order, and features standardized with the
   training part's statistics.

Every error is a :class:`SchemaError` naming the source, and the line or row where it can; it stays at the
site (the agent sends only a failure code).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import numpy as np
import pandas as pd

from fedhealth.core import InputError
from fedhealth.data._dataset import FillRule, Imputation, TabularDataset, fit_scaling, split_indices
from fedhealth.data._errors import NonNumericColumnError, SchemaError
from fedhealth.data._schema import (
    CategoricalColumn,
    ColumnSpec,
    DatasetSchema,
    DateColumn,
    DateUnit,
    MissingPolicy,
    NumericColumn,
    UnseenPolicy,
    category_text,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TableOptions:
    """The roles a URI gives (``label=``, ``id=``), a declared schema, and how to split and scale."""

    label: str | None = None
    id_column: str | None = None
    time: str | None = None  # a survival time column: the label is then the event indicator
    schema: DatasetSchema | None = None
    test_fraction: float = 0.3
    seed: int = 0
    standardize: bool = True
    classes: int = 2  # the label's classes: 0 and 1, or 0 to classes - 1 (``classes=K`` in the URI)


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceTable:
    """What a connector read: raw columns, and how messages name the source and its rows.

    ``text``: the cells are text to parse (a CSV file); otherwise they carry the source's types (numbers,
    dates, strings, None for SQL NULL). ``row_labels``: how to name each row in a message ("line 12"); by
    default "row N", counted from 1 in the order read. ``schema``: the source's own declaration (an OMOP or
    FHIR definition says what each column is), used when the URI declares none.
    """

    name: str
    where: str
    frame: pd.DataFrame
    text: bool = False
    row_labels: Sequence[str] | None = None
    schema: DatasetSchema | None = None

    def row(self, index: int) -> str:
        return self.row_labels[index] if self.row_labels is not None else f"row {index + 1}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedColumn:
    """One feature column, parsed: ``values`` are numbers (a date as days or years to its reference; a
    category as its index in the declared list, ``len(categories)`` for ``other``), NaN where missing."""

    column: str
    spec: ColumnSpec
    values: np.ndarray
    missing: np.ndarray
    unseen: int = 0

    @property
    def name(self) -> str:
        return self.spec.name or self.column


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedTable:
    """A source's rows after step 3 of the module docstring: checked, parsed, ordered by patient id."""

    name: str
    where: str
    schema: DatasetSchema
    inferred: bool
    ids: tuple[str, ...] | None
    labels: np.ndarray
    columns: tuple[ParsedColumn, ...]
    times: np.ndarray | None = None
    ignored: tuple[str, ...] = field(default=())

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])


def read_table(source: SourceTable, options: TableOptions) -> TabularDataset:
    """Steps 1 to 4 of the module docstring."""
    return build_dataset(parse_table(source, options), options)


# --- steps 1-3: schema, parsing, order ----------------------------------------------------------------------


def parse_table(source: SourceTable, options: TableOptions) -> ParsedTable:
    frame, where = source.frame, source.where
    columns = [str(c) for c in frame.columns]
    if len(set(columns)) != len(columns):
        raise SchemaError(f"{where}: the header repeats a column name")
    declared = options.schema or source.schema
    label = options.label or (declared.label if declared is not None else None)
    if label is None:
        raise SchemaError(f"{where}: no label column is named (label=COLUMN in the URI, or in a schema)")
    for role, name in (("label", label), ("id", options.id_column)):
        if name is not None and name not in columns:
            raise SchemaError(f"{where}: {role} column {name!r} is not in the header {columns}")
    if options.id_column is not None and options.id_column == label:
        raise SchemaError(f"{where}: the label column cannot also be the id column")
    if options.time is not None:
        if options.time not in columns:
            raise SchemaError(f"{where}: time column {options.time!r} is not in the header {columns}")
        if options.time in (label, options.id_column):
            raise SchemaError(f"{where}: the time column cannot also be the label or id column")
    if declared is not None:
        schema = declared.with_roles(label=options.label, id_column=options.id_column, where=where)
        absent = [c for c in schema.source_columns if c not in columns]
        if absent:
            raise SchemaError(
                f"{where}: column(s) {absent} of the dataset's schema are not among the source's columns "
                f"{columns}"
            )
        inferred = False
    else:
        features = [c for c in columns if c not in (label, options.id_column, options.time)]
        if not features:
            raise SchemaError(f"{where}: no feature columns besides the label and id columns")
        schema = DatasetSchema(
            id=options.id_column, label=label, columns={c: NumericColumn() for c in features}
        )
        inferred = True
    if frame.shape[0] == 0:
        raise SchemaError(f"{where}: no data rows" + (" after the header" if source.text else ""))
    ids = _ids(source, schema.id) if schema.id is not None else None
    if options.time is not None and options.time in schema.columns:
        raise SchemaError(f"{where}: the time column {options.time!r} is also a feature of the schema")
    labels = _labels(source, schema.label, schema.missing_values, options.classes)
    times = _times(source, options.time, schema.missing_values) if options.time is not None else None
    parsed = [_column(source, column, spec, schema) for column, spec in schema.columns.items()]
    order = _order(ids) if ids is not None else None
    if order is not None:
        assert ids is not None
        ids = [ids[i] for i in order]
        labels = labels[order]
        times = times[order] if times is not None else None
        parsed = [
            ParsedColumn(
                column=p.column,
                spec=p.spec,
                values=p.values[order],
                missing=p.missing[order],
                unseen=p.unseen,
            )
            for p in parsed
        ]
    used = set(schema.source_columns) | ({options.time} if options.time is not None else set())
    return ParsedTable(
        name=source.name,
        where=where,
        schema=schema,
        inferred=inferred,
        ids=tuple(ids) if ids is not None else None,
        labels=labels,
        columns=tuple(parsed),
        ignored=tuple(c for c in columns if c not in used),
        times=times,
    )


def _order(ids: Sequence[str]) -> np.ndarray:
    """Rows by patient id: numerically when every id is a decimal integer, else by text (stable)."""
    if all(i.isdecimal() for i in ids):
        return np.array(sorted(range(len(ids)), key=lambda k: (int(ids[k]), ids[k])), dtype=np.int64)
    return np.array(sorted(range(len(ids)), key=ids.__getitem__), dtype=np.int64)


def _missing_mask(source: SourceTable, series: pd.Series, tokens: Sequence[str]) -> np.ndarray:
    missing = series.isna().to_numpy(dtype=np.bool_, copy=True)
    if source.text:
        stripped = series.astype("string").str.strip()
        missing |= stripped.isin(list(tokens)).fillna(True).to_numpy(dtype=np.bool_)
    return missing


def _ids(source: SourceTable, column: str) -> list[str]:
    """Each row's patient id as text. Consent is matched on this text, so it must be the id the consent
    feed names: bytes (a Parquet BINARY column) are their UTF-8 text, not ``"b'p0003'"``; a list, a mapping
    or an id holding a control or invisible format character (a NUL, a newline, a zero-width space: the
    same patient as the id without it to a reader, not to a comparison) is refused. Messages name the row,
    never the value."""
    series = source.frame[column]
    texts: list[str] = []
    for i, value in enumerate(series.tolist()):
        if isinstance(value, bytes | bytearray):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise SchemaError(
                    f"{source.where}: {source.row(i)}, id column {column!r} holds bytes, not UTF-8 text"
                ) from None
        elif not (_is_missing(value) or isinstance(value, str | int | float | np.integer | np.floating)):
            raise SchemaError(
                f"{source.where}: {source.row(i)}, id column {column!r} holds a {type(value).__name__}, "
                "not a text or integer id"
            )
        text = "" if _is_missing(value) else category_text(value)
        if not text:
            raise SchemaError(f"{source.where}: {source.row(i)}, id column {column!r} is empty")
        if any(unicodedata.category(ch) in _INVISIBLE for ch in text):
            raise SchemaError(
                f"{source.where}: {source.row(i)}, id column {column!r} holds a control or invisible "
                "character (a NUL, a line break, a zero-width space); consent could not be matched to it"
            )
        texts.append(text)
    if len(set(texts)) != len(texts):
        raise SchemaError(f"{source.where}: id column {column!r} repeats an id")
    return texts


# Unicode categories of characters an id must not hold: control, format (zero-width), surrogate, private use,
# unassigned, line and paragraph separators
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _is_missing(value: Any) -> bool:
    return (
        value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and np.isnan(value))
    )


def _labels(source: SourceTable, column: str, tokens: Sequence[str], classes: int = 2) -> np.ndarray:
    values, missing = _numbers(source, column, tokens)
    if missing.any():
        i = int(np.argmax(missing))
        raise SchemaError(
            f"{source.where}: {source.row(i)}, column {column!r} is empty (every row needs a label)"
        )
    bad = ~np.isin(values, np.arange(classes, dtype=np.float64))
    if bad.any():
        i = int(np.argmax(bad))
        allowed = "0 or 1" if classes == 2 else f"integers from 0 to {classes - 1} (classes={classes})"
        raise SchemaError(
            f"{source.where}: {source.row(i)}, label column {column!r} holds {values[i]:g}; "
            f"labels must be {allowed}"
        )
    return values.astype(np.int64)


def _times(source: SourceTable, column: str, tokens: Sequence[str]) -> np.ndarray:
    """The survival time column: a finite positive number in every row (the time of the event or of
    censoring, in the study's unit)."""
    values, missing = _numbers(source, column, tokens)
    bad = missing | ~(values > 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise SchemaError(
            f"{source.where}: {source.row(i)}, time column {column!r} holds "
            f"{'nothing' if missing[i] else format(values[i], 'g')}; survival times must be positive numbers"
        )
    return values


def _numbers(source: SourceTable, column: str, tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A column as float64 (NaN where missing) and its missing mask; a value that is not a finite number
    is a :class:`NonNumericColumnError` (or a :class:`SchemaError` for NaN and infinities)."""
    series = source.frame[column]
    clean = _clean_text_numbers(series, tokens) if source.text else None
    if clean is not None:
        values, missing = clean, np.zeros(clean.shape[0], dtype=np.bool_)
    else:
        values, missing = _parsed_numbers(source, column, series, tokens)
    bad = ~missing & ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raw = series.iloc[i]
        text = str(raw).strip()
        try:
            float(text)
        except (TypeError, ValueError):
            raise NonNumericColumnError(
                f"{source.where}: {source.row(i)}, column {column!r} holds {text[:40]!r}, not a number",
                column=column,
            ) from None
        raise SchemaError(
            f"{source.where}: {source.row(i)}, column {column!r} holds {text[:40]!r}, not a finite number"
        )
    return values, missing


def _parsed_numbers(
    source: SourceTable, column: str, series: pd.Series, tokens: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    missing = _missing_mask(source, series, tokens)
    if series.dtype.kind in "biuf":
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    elif series.dtype.kind == "M" or _holds_dates(series):
        raise SchemaError(
            f'{source.where}: column {column!r} holds dates: declare it in a schema with type = "date", '
            "a unit and a reference"
        )
    else:
        cleaned = series.astype("object").where(~missing, None)
        if source.text:  # a text source holds only strings (None where missing): strip them all at once
            cleaned = cleaned.str.strip()
        values = pd.to_numeric(cleaned, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return values, missing


def _clean_text_numbers(series: pd.Series, tokens: Sequence[str]) -> np.ndarray | None:
    """A text column whose every cell is a plain ASCII number, parsed in one C loop (``float`` on each
    cell); None for anything else (a missing cell, text, a token that reads as a number, ``-0``, ...),
    which then takes :func:`_parsed_numbers`, the general path.

    Reading a site's table is on the path of each study's first task, and that general path (pandas'
    string methods and ``to_numeric`` on objects) costs ~0.3 s for 12,500 rows x 31 columns; this one
    ~20 ms. It gives the same numbers bit for bit where it answers: ``float`` and ``to_numeric`` (both
    correctly rounded) agree on ASCII decimal text; they differ on underscores ("1_0"), non-ASCII digits
    (``float`` reads them, ``to_numeric`` does not) and on "-0" (``to_numeric`` reads an all-integer
    column as integers, so "-0" is +0), all left to the general path. A cell that is not a finite number
    ("inf", "nan") is returned as such and refused by the caller, as the general path does.
    """
    if series.dtype != object or any(_reads_as_number(t) for t in tokens):
        return None
    cells = series.to_numpy(dtype=object)
    try:
        text = "".join(cells)  # a TypeError if a cell is not a string (None, a number)
    except TypeError:
        return None
    if not text.isascii() or "_" in text:
        return None
    try:
        values = cells.astype(np.float64)  # float(cell) for each: surrounding whitespace is allowed
    except (TypeError, ValueError):
        return None
    if (np.signbit(values) & (values == 0.0)).any():
        return None
    return values


def _reads_as_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _holds_dates(series: pd.Series) -> bool:
    first = series.dropna()
    return bool(first.size) and isinstance(first.iloc[0], date)


def _column(source: SourceTable, column: str, spec: ColumnSpec, schema: DatasetSchema) -> ParsedColumn:
    tokens = schema.missing_values
    unseen = 0
    if isinstance(spec, NumericColumn):
        values, missing = _numbers(source, column, tokens)
    elif isinstance(spec, DateColumn):
        values, missing = _date_feature(source, column, spec, tokens)
    else:
        values, missing, unseen = _categories(source, column, spec, tokens)
    if isinstance(spec, NumericColumn | DateColumn):
        _check_range(source, column, spec, values, missing)
    if spec.missing is MissingPolicy.REFUSE and missing.any():
        i = int(np.argmax(missing))
        raise SchemaError(
            f"{source.where}: {source.row(i)}, column {column!r} is empty (a missing value: declare "
            'missing = "mean", "median" or "constant" for this column in a schema to accept it)'
        )
    return ParsedColumn(column=column, spec=spec, values=values, missing=missing, unseen=unseen)


def _check_range(
    source: SourceTable,
    column: str,
    spec: NumericColumn | DateColumn,
    values: np.ndarray,
    missing: np.ndarray,
) -> None:
    for bound, above in ((spec.min, False), (spec.max, True)):
        if bound is None:
            continue
        with np.errstate(invalid="ignore"):
            out = ~missing & ((values > bound) if above else (values < bound))
        if out.any():
            i = int(np.argmax(out))
            side = "above the declared max" if above else "below the declared min"
            raise SchemaError(
                f"{source.where}: {source.row(i)}, column {column!r} holds {values[i]:g}, {side} {bound:g}"
            )


def _dates(source: SourceTable, column: str, tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A column as datetime64[D] (NaT where missing)."""
    series = source.frame[column]
    missing = _missing_mask(source, series, tokens)
    cleaned = series.astype("object").where(~missing, None)
    if source.text:
        cleaned = cleaned.map(lambda v: v.strip() if isinstance(v, str) else v)
    parsed = pd.to_datetime(cleaned, errors="coerce", format="ISO8601", utc=True)
    bad = ~missing & parsed.isna().to_numpy(dtype=np.bool_)
    if bad.any():
        i = int(np.argmax(bad))
        raise SchemaError(
            f"{source.where}: {source.row(i)}, column {column!r} holds {str(series.iloc[i])[:40]!r}, "
            "not a date (YYYY-MM-DD)"
        )
    days = parsed.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").astype("datetime64[D]")
    return days, missing


def _date_feature(
    source: SourceTable, column: str, spec: DateColumn, tokens: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Days, or completed years, from the column's date to the reference (positive when the date is
    earlier: an age, a time since)."""
    days, missing = _dates(source, column, tokens)
    if spec.reference_column is not None:
        reference, ref_missing = _dates(source, spec.reference_column, tokens)
        missing = missing | ref_missing
    else:
        assert spec.reference is not None
        reference = np.full(days.shape, np.datetime64(spec.reference, "D"))
    values = np.full(days.shape, np.nan)
    present = ~missing
    if spec.unit is DateUnit.DAYS:
        values[present] = (reference[present] - days[present]).astype(np.int64).astype(np.float64)
    else:
        values[present] = _completed_years(days[present], reference[present])
    return values, missing


def _completed_years(born: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Whole years from ``born`` to ``at``, as an age is counted (a birthday not yet reached this year
    does not count)."""
    by, bm, bd = _ymd(born)
    ay, am, ad = _ymd(at)
    before_birthday = (am < bm) | ((am == bm) & (ad < bd))
    return (ay - by - before_birthday.astype(np.int64)).astype(np.float64)


def _ymd(days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    years = days.astype("datetime64[Y]")
    months = days.astype("datetime64[M]")
    y = years.astype(np.int64) + 1970
    m = (months - years.astype("datetime64[M]")).astype(np.int64) + 1
    d = (days - months.astype("datetime64[D]")).astype(np.int64) + 1
    return y, m, d


def _categories(
    source: SourceTable, column: str, spec: CategoricalColumn, tokens: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, int]:
    series = source.frame[column]
    missing = _missing_mask(source, series, tokens)
    index = {c: k for k, c in enumerate(spec.categories)}
    other = len(spec.categories)
    values = np.full(series.shape[0], np.nan)
    unseen = 0
    for i, raw in enumerate(series.tolist()):
        if missing[i]:
            continue
        text = _category_of(raw, source.text)
        code = index.get(text)
        if code is None:
            if spec.unseen is UnseenPolicy.REFUSE:
                raise SchemaError(
                    f"{source.where}: {source.row(i)}, column {column!r} holds {text[:40]!r}, not one of its "
                    f'declared categories {list(spec.categories)} (declare it, or unseen = "other")'
                )
            code, unseen = other, unseen + 1
        values[i] = code
    return values, missing, unseen


def _category_of(value: Any, text: bool) -> str:
    """A cell's category: text that reads as an integral number is that integer ("2.0" is "2")."""
    if text and isinstance(value, str):
        stripped = value.strip()
        try:
            number = float(stripped)
        except ValueError:
            return stripped
        return category_text(number)
    return category_text(value)


# --- step 4: split, fill, encode, scale ---------------------------------------------------------------------


def build_dataset(parsed: ParsedTable, options: TableOptions) -> TabularDataset:
    where = parsed.where
    y = parsed.labels
    try:
        train, test = split_indices(y, test_size=options.test_fraction, random_state=options.seed)
    except InputError as exc:
        raise SchemaError(f"{where}: {exc}") from exc
    blocks: list[np.ndarray] = []
    filled: list[int] = []
    rules: list[FillRule] = []
    masks: list[np.ndarray] = []
    for col in parsed.columns:
        values = col.values.copy()
        spec = col.spec
        if col.missing.any() and spec.missing is not MissingPolicy.NONE:
            if spec.missing is MissingPolicy.CONSTANT:
                assert spec.fill is not None
                fill = (
                    float(spec.categories.index(category_text(spec.fill)))
                    if isinstance(spec, CategoricalColumn)
                    else float(spec.fill)
                )
            else:
                observed = values[train][~col.missing[train]]
                if observed.size == 0:
                    raise SchemaError(
                        f"{where}: column {col.column!r} has no value in the training rows to fill "
                        f"its missing values with the {spec.missing.value}"
                    )
                fill = float(np.mean(observed) if spec.missing is MissingPolicy.MEAN else np.median(observed))
            values[col.missing] = fill
        start = sum(b.shape[1] for b in blocks)
        if isinstance(spec, CategoricalColumn):
            blocks.append(_one_hot(values, spec))
        else:
            blocks.append(values[:, None])
            if spec.missing in (MissingPolicy.MEAN, MissingPolicy.MEDIAN):
                filled.append(start)
                rules.append(FillRule(spec.missing.value))
                masks.append(col.missing)
        if spec.indicator:
            blocks.append(col.missing.astype(np.float64)[:, None])
    X = np.concatenate(blocks, axis=1)
    X_train, X_test = X[train], X[test]
    scaling = None
    if options.standardize:
        try:
            # finite values near the float limits (1e200, 1e308) overflow the mean or the variance: one
            # SchemaError naming the feature, not a RuntimeWarning and a sentence that names none
            with np.errstate(over="ignore", invalid="ignore"):
                scaling = fit_scaling(X_train)
        except InputError as exc:
            raise SchemaError(f"{where}: {_unscalable(X_train, parsed.schema.feature_names) or exc}") from exc
        X_train, X_test = scaling.apply(X_train), scaling.apply(X_test)
    imputation = None
    if filled:
        missing = np.column_stack(masks)
        imputation = Imputation(
            features=tuple(filled),
            rules=tuple(rules),
            missing_train=missing[train],
            missing_test=missing[test],
        )
    ids = parsed.ids
    return TabularDataset(
        name=parsed.name,
        X_train=X_train,
        y_train=y[train],
        X_test=X_test,
        y_test=y[test],
        feature_names=parsed.schema.feature_names,
        patient_ids_train=tuple(ids[i] for i in train) if ids is not None else None,
        patient_ids_test=tuple(ids[i] for i in test) if ids is not None else None,
        scaling=scaling,
        imputation=imputation,
        time_train=parsed.times[train] if parsed.times is not None else None,
        time_test=parsed.times[test] if parsed.times is not None else None,
        classes=options.classes,
    )


def _unscalable(X_train: np.ndarray, names: Sequence[str]) -> str | None:
    """Which feature's training values are too large to standardize, as a sentence (None: no such one)."""
    if X_train.shape[0] < 2:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(X_train.mean(axis=0)) & np.isfinite(X_train.std(axis=0, ddof=1))
    if finite.all():
        return None
    j = int(np.argmin(finite))
    name = names[j] if j < len(names) else f"feature {j + 1}"
    return (
        f"feature {name!r} holds values too large to standardize (their mean or spread overflows a "
        "64-bit float); rescale the column or declare its min and max in a schema"
    )


def _one_hot(codes: np.ndarray, spec: CategoricalColumn) -> np.ndarray:
    width = len(spec.categories) + (1 if spec.unseen is UnseenPolicy.OTHER else 0)
    onehot = (codes[:, None] == np.arange(width)[None, :]).astype(np.float64)
    return onehot[:, 1:] if spec.drop_first else onehot
