"""A dataset's schema: which columns are the patient id, the label and the features, and how each feature
column is read (numbers, categories, dates), what a missing value becomes and what range it must lie in.

A schema is declared in a TOML (or JSON) file named by a dataset URI's ``schema=`` parameter, or inferred
from the source (every column besides the id and the label must then be numeric and complete). Either way
the site pins it when the dataset is added (``fedhealth site dataset add``), so a source whose columns
change later is refused before any task computes on it. Example::

    id = "patient_id"               # used for consent, never a feature
    label = "outcome"               # 0 or 1
    missing_values = ["", "NA"]     # text sources: the cells that count as missing (default [""])

    [columns.age]
    type = "numeric"
    min = 0
    max = 120
    missing = "median"              # refuse (default) | mean | median | constant (with fill = ...)
    indicator = true                # add age_missing (1 where the value was missing)

    [columns.smoker]
    type = "categorical"
    categories = ["never", "former", "current"]   # one-hot in this order
    unseen = "other"                # refuse (default) | other: a value not listed maps to smoker=other
    missing = "none"                # refuse (default) | constant (fill = a category) | none: no column set
    drop_first = true               # leave out the first category's column (it is the intercept's)

    [columns.birth_date]
    type = "date"
    unit = "years"                  # years (completed, like an age) | days
    reference = "2024-01-01"        # or reference_column = "admission_date"
    name = "age_at_reference"       # the feature's name (default: the column's)

Columns a declared schema does not list never become features (they are reported as ignored). The category
lists and the fills are per-site declarations today; when the federated statistics of issue 11 agree on
encodings (categories seen at every site with a minimum count) and global fills, they are written into this
same declaration (``categories``, ``fill``), so a site's schema file is the one place either comes from.
"""

from __future__ import annotations

import json
import math
import tomllib
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedhealth.core import ConfigError


class MissingPolicy(StrEnum):
    """What a missing value in a feature column becomes."""

    REFUSE = "refuse"  # the dataset is refused, naming the first row with a missing value
    MEAN = "mean"  # the mean of the column's training rows that have a value
    MEDIAN = "median"  # the median of those rows
    CONSTANT = "constant"  # the declared ``fill``
    NONE = "none"  # categorical columns only: no category's column is set (add indicator = true to tell)


class UnseenPolicy(StrEnum):
    """What a category value that the declaration does not list becomes."""

    REFUSE = "refuse"
    OTHER = "other"  # counted in an extra ``<name>=other`` column


class DateUnit(StrEnum):
    DAYS = "days"
    YEARS = "years"  # completed years, as an age is counted


_Frozen = ConfigDict(frozen=True, extra="forbid")


class _Feature(BaseModel):
    model_config = _Frozen

    name: str | None = None  # the feature's name, if not the column's
    missing: MissingPolicy = MissingPolicy.REFUSE
    fill: float | str | None = None
    indicator: bool = False  # add ``<name>_missing``: 1.0 where the value was missing


class NumericColumn(_Feature):
    type: Literal["numeric"] = "numeric"
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> NumericColumn:
        _check_fill(self.missing, self.fill)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class CategoricalColumn(_Feature):
    type: Literal["categorical"] = "categorical"
    categories: tuple[str, ...]
    unseen: UnseenPolicy = UnseenPolicy.REFUSE
    drop_first: bool = False

    @field_validator("categories", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(category_text(v) for v in value)
        return value

    @model_validator(mode="after")
    def _check(self) -> CategoricalColumn:
        if not self.categories:
            raise ValueError("categories must list at least one category")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError("categories repeat a value")
        if self.unseen is UnseenPolicy.OTHER and "other" in self.categories:
            raise ValueError("'other' is a declared category, so unseen = 'other' would be ambiguous")
        if self.missing in (MissingPolicy.MEAN, MissingPolicy.MEDIAN):
            raise ValueError("a categorical column's missing policy is refuse, constant (a category) or none")
        if self.missing is MissingPolicy.CONSTANT:
            if self.fill is None or category_text(self.fill) not in self.categories:
                raise ValueError("missing = 'constant' needs fill = one of the declared categories")
        elif self.fill is not None:
            raise ValueError("fill goes with missing = 'constant'")
        return self

    def encoded_names(self, name: str) -> tuple[str, ...]:
        kept = self.categories[1:] if self.drop_first else self.categories
        extra = ("other",) if self.unseen is UnseenPolicy.OTHER else ()
        return tuple(f"{name}={c}" for c in (*kept, *extra))


class DateColumn(_Feature):
    type: Literal["date"] = "date"
    unit: DateUnit = DateUnit.DAYS
    reference: date | None = None
    reference_column: str | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> DateColumn:
        if (self.reference is None) == (self.reference_column is None):
            raise ValueError("a date column needs exactly one of reference (a date) or reference_column")
        _check_fill(self.missing, self.fill)
        return self


_TYPES = ("numeric", "categorical", "date")
ColumnSpec = Annotated[NumericColumn | CategoricalColumn | DateColumn, Field(discriminator="type")]


class DatasetSchema(BaseModel):
    """The roles and feature columns of a tabular dataset (see the module docstring)."""

    model_config = _Frozen

    id: str | None = None
    label: str
    columns: dict[str, ColumnSpec]
    missing_values: tuple[str, ...] = ("",)

    @field_validator("columns", mode="before")
    @classmethod
    def _numeric_by_default(cls, value: Any) -> Any:
        """A column declared without a ``type`` is numeric (``[columns.age]`` alone says "a number")."""
        if not isinstance(value, dict):
            return value
        out: dict[Any, Any] = {}
        for name, spec in value.items():
            if isinstance(spec, dict) and "type" not in spec:
                spec = {**spec, "type": "numeric"}
            elif isinstance(spec, dict) and spec["type"] not in _TYPES:
                raise ValueError(f"column {name!r}: type {spec['type']!r} is not one of {list(_TYPES)}")
            out[name] = spec
        return out

    @model_validator(mode="after")
    def _check(self) -> DatasetSchema:
        if not self.columns:
            raise ValueError("a schema needs at least one feature column")
        for role, column in (("label", self.label), ("id", self.id)):
            if column is not None and column in self.columns:
                raise ValueError(f"the {role} column {column!r} cannot also be a feature column")
        if self.id is not None and self.id == self.label:
            raise ValueError("the label column cannot also be the id column")
        names = self.feature_names
        if len(set(names)) != len(names):
            raise ValueError(f"two columns give the same feature name: {sorted(_repeated(names))}")
        return self

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The features in order: each column's (a categorical one's one-hot columns), then its indicator."""
        names: list[str] = []
        for column, spec in self.columns.items():
            name = spec.name or column
            if isinstance(spec, CategoricalColumn):
                names.extend(spec.encoded_names(name))
            else:
                names.append(name)
            if spec.indicator:
                names.append(f"{name}_missing")
        return tuple(names)

    @property
    def source_columns(self) -> tuple[str, ...]:
        """Every column the schema reads from the source, id and label first."""
        extra = [
            s.reference_column
            for s in self.columns.values()
            if isinstance(s, DateColumn) and s.reference_column is not None
        ]
        ordered = [c for c in (self.id, self.label) if c is not None] + list(self.columns) + extra
        return tuple(dict.fromkeys(ordered))

    def with_roles(self, *, label: str | None, id_column: str | None, where: str) -> DatasetSchema:
        """This schema with a URI's ``label=``/``id=`` applied; they must agree with the file's."""
        updates: dict[str, Any] = {}
        for role, given, declared in (("label", label, self.label), ("id", id_column, self.id)):
            if given is None or given == declared:
                continue
            if declared is not None:
                raise ConfigError(
                    f"{where}: the URI's {role}={given!r} contradicts the schema's {role} = {declared!r}"
                )
            updates[role] = given
        if not updates:
            return self
        try:
            return DatasetSchema.model_validate({**self.model_dump(), **updates})
        except ValidationError as exc:
            raise ConfigError(f"{where}: {_first_error(exc)}") from exc

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def category_text(value: Any) -> str:
    """A category as text, the same whatever the source stored: 2, 2.0 and "2" are all "2"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value).strip()


def _check_fill(missing: MissingPolicy, fill: float | str | None) -> None:
    if missing is MissingPolicy.NONE:
        raise ValueError("missing = 'none' is for categorical columns (a number needs a fill)")
    if missing is MissingPolicy.CONSTANT:
        if not isinstance(fill, int | float) or isinstance(fill, bool) or not math.isfinite(fill):
            raise ValueError("missing = 'constant' needs a finite number as fill")
    elif fill is not None:
        raise ValueError("fill goes with missing = 'constant'")


def _repeated(names: tuple[str, ...]) -> set[str]:
    return {n for n in names if names.count(n) > 1}


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    at = ".".join(str(p) for p in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{at}: {message}" if at else message


def parse_schema(document: Any, *, where: str) -> DatasetSchema:
    """A schema from parsed TOML/JSON; :class:`ConfigError` naming the first bad key."""
    try:
        return DatasetSchema.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(f"{where}: not a valid dataset schema: {_first_error(exc)}") from exc


def load_schema(path: Path) -> DatasetSchema:
    """Read a schema file: TOML (``.toml``) or JSON (``.json``, as a site pins it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"schema file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"schema file {path} cannot be read ({exc})") from exc
    try:
        document = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"schema file {path} is not valid {path.suffix.lstrip('.').upper()}: {exc}"
        ) from exc
    return parse_schema(document, where=f"schema file {path}")
