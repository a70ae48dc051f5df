"""How a study's raw columns become the model's features: standardization and categorical encodings.

A study spec may declare its preprocessing in the recipe's params (``[recipe.params.preprocessing]``), so
that the statistics are part of what every steward approves (the spec hash covers them), every site applies
the same ones, and the exported model package carries them:

- ``standardize = "given"`` with ``mean`` and ``scale`` (one each per feature): every site standardizes
  its features as ``(x - mean) / scale``, never with its own data's statistics. The researcher obtains them
  from the federation, not from one site: a federated statistics run (secure sum of per-feature counts,
  sums and sums of squares over the sites' training rows) gives them through :func:`scaling_from_sums`.
- ``standardize = "federated"`` (no ``mean`` or ``scale`` in the spec): before round 1 the study runs a
  collective pre-step in which every training site adds the count, sum and sum of squares of each feature
  over its kept training rows into a secure sum (:mod:`fedhealth.learning._federated_scaling`); every site
  then standardizes with the federation-wide mean and scale those sums give, exactly as ``"given"`` would
  with the same figures. The released scaling travels with each later task and is recorded in the model
  package (``mean`` and ``scale`` filled in). One step instead of ``stats run`` then ``model scaling``.
- ``standardize = "none"``: the features are used as the sites' datasets give them, unscaled.
- no ``preprocessing`` at all (the default, and every study before packages): each site standardizes with
  its own training rows' mean and std, as FLamby does; such a model has no one scaling to ship.

Getting ``mean`` and ``scale`` from the federation: run federated statistics (recipe ``stats``, ``fedhealth
stats run``) over the model's features on datasets registered unstandardized, then
:func:`scaling_from_statistics` (``fedhealth model scaling REPORT``) reads the report's pooled mean and
variance, every figure of which went through secure sum.

``categorical`` says how a raw column became one-hot features (``cp = {categories = ["1", "2", "3", "4"],
features = ["cp_2", "cp_3", "cp_4"]}``: the features stand for the last categories, all of them or all but
the first, dropped). Sites one-hot their data themselves (their dataset schema); this declaration is what a
model package needs to do the same with a raw table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from fedhealth.core import InputError
from fedhealth.data import STD_EPSILON, TabularDataset, category_text

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(allow_inf_nan=False, gt=0)]
ColumnName = Annotated[str, Field(min_length=1, max_length=200)]


class StandardizeMode(StrEnum):
    """How a model's features were standardized (``site`` is never written in a spec: it is the default)."""

    GIVEN = "given"  # (x - mean) / scale with the spec's statistics, the same at every site
    FEDERATED = "federated"  # (x - mean) / scale with statistics a secure-sum pre-step computes
    NONE = "none"  # unscaled
    SITE = "site"  # each site with its own training rows' statistics (no one scaling exists)


class CategoricalEncoding(BaseModel):
    """One raw column one-hot encoded: its categories (as text: 2, 2.0 and "2" are all "2") and the
    features standing for the last ``len(features)`` of them (all categories, or all but the first)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    categories: tuple[str, ...] = Field(min_length=1, max_length=10_000)
    features: tuple[ColumnName, ...] = Field(min_length=1)

    @field_validator("categories", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(category_text(v) for v in value)
        return value

    @model_validator(mode="after")
    def _check(self) -> CategoricalEncoding:
        if len(set(self.categories)) != len(self.categories):
            raise ValueError("categories repeat a value")
        if len(self.features) not in (len(self.categories), len(self.categories) - 1):
            raise ValueError(
                f"{len(self.features)} features for {len(self.categories)} categories: name one per "
                "category, or one per category but the first (dropped)"
            )
        if len(set(self.features)) != len(self.features):
            raise ValueError("features repeat a name")
        return self

    def encoded(self) -> dict[str, str]:
        """Feature name → the category it is 1 for."""
        return dict(zip(self.features, self.categories[-len(self.features) :], strict=True))


class Preprocessing(BaseModel):
    """``recipe.params.preprocessing`` (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    standardize: StandardizeMode
    mean: tuple[FiniteFloat, ...] | None = None
    scale: tuple[PositiveFloat, ...] | None = None
    categorical: dict[ColumnName, CategoricalEncoding] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        if self.standardize is StandardizeMode.SITE:
            raise ValueError(
                "standardize: 'site' is the default without a preprocessing section; write 'given' (with "
                "mean and scale) or 'none'"
            )
        given = self.standardize is StandardizeMode.GIVEN
        scaled = given or self.standardize is StandardizeMode.FEDERATED
        if given and (self.mean is None or self.scale is None):
            raise ValueError("standardize = 'given' needs mean and scale (one per feature)")
        if not scaled and (self.mean is not None or self.scale is not None):
            raise ValueError("mean and scale go with standardize = 'given'")
        if (self.mean is None) != (self.scale is None):
            raise ValueError("mean and scale go together")
        if scaled and self.mean is not None and self.scale is not None and len(self.mean) != len(self.scale):
            raise ValueError(f"{len(self.mean)} means but {len(self.scale)} scales")
        claimed: dict[str, str] = {}
        for column, encoding in self.categorical.items():
            for feature in encoding.features:
                if feature in claimed:
                    raise ValueError(
                        f"feature {feature!r} is claimed by columns {claimed[feature]!r} and {column!r}"
                    )
                claimed[feature] = column
        return self

    def problem(self, feature_names: Sequence[str] | None, n_features: int) -> str | None:
        """Why this preprocessing does not fit the model's features, or None."""
        if feature_names is None:
            return "preprocessing needs feature_names: a package selects the input columns by name"
        if self.mean is not None and len(self.mean) != n_features:
            return f"preprocessing.mean has {len(self.mean)} values for {n_features} features"
        names = set(feature_names)
        for column, encoding in self.categorical.items():
            unknown = [f for f in encoding.features if f not in names]
            if unknown:
                return f"preprocessing.categorical.{column}: {unknown} are not among feature_names"
            if column in names:
                return f"preprocessing.categorical.{column}: the raw column has the name of a feature"
        return None

    def apply(self, dataset: TabularDataset, X: np.ndarray) -> np.ndarray:
        """The rows ``X`` of ``dataset`` (as the site's connector gave them) under this preprocessing.

        A connector standardizes with the site's own training statistics unless told not to; the dataset
        keeps them (``scaling``), so the rows are first put back on their raw scale (:func:`raw_features`).
        A dataset without a scaling is raw already."""
        raw = raw_features(dataset, X)
        if self.standardize is StandardizeMode.NONE:
            return raw
        if self.mean is None or self.scale is None:  # federated, before its pre-step released them
            raise InputError(
                "standardize = 'federated': the federation's mean and scale are not known yet (the "
                "study's scaling pre-step has not released them)"
            )
        return np.asarray((raw - np.asarray(self.mean)) / np.asarray(self.scale), dtype=np.float64)

    @property
    def federated(self) -> bool:
        return self.standardize is StandardizeMode.FEDERATED

    def with_scaling(self, mean: Sequence[float], scale: Sequence[float]) -> Preprocessing:
        """This federated preprocessing with the mean and scale its pre-step released filled in."""
        if not self.federated:
            raise InputError("only standardize = 'federated' takes a released scaling")
        return self.model_copy(update={"mean": tuple(mean), "scale": tuple(scale)})

    def describe(self) -> str:
        """A clause for a steward's description of the study."""
        if self.standardize is StandardizeMode.GIVEN:
            return "features standardized with the spec's federation-wide mean and scale"
        if self.standardize is StandardizeMode.FEDERATED:
            return (
                "features standardized with a federation-wide mean and scale computed before round 1 "
                "from a secure sum of each site's per-feature count, sum and sum of squares"
            )
        return "features used unscaled"


def raw_features(dataset: TabularDataset, X: np.ndarray) -> np.ndarray:
    """The rows ``X`` of ``dataset`` on their raw scale: a connector standardizes with the site's own
    training statistics unless told not to, and the dataset keeps them (``scaling``)."""
    raw = X if dataset.scaling is None else X * dataset.scaling.std + dataset.scaling.mean
    return np.asarray(raw, dtype=np.float64)


def preprocessing_metadata(preprocessing: Preprocessing | None) -> dict[str, JsonValue]:
    """The ``preprocessing`` section of an export's metadata (what a model package applies)."""
    # missing values: a site's connector fills them by its dataset's declared rule; the package has no such
    # rule, so it refuses them ("refuse") rather than guess
    if preprocessing is None:
        return {
            "standardize": StandardizeMode.SITE.value,
            "mean": None,
            "scale": None,
            "categorical": {},
            "missing": "refuse",
        }
    return {
        "missing": "refuse",
        "standardize": preprocessing.standardize.value,
        "mean": list(preprocessing.mean) if preprocessing.mean is not None else None,
        "scale": list(preprocessing.scale) if preprocessing.scale is not None else None,
        "categorical": {
            column: {"categories": list(e.categories), "features": list(e.features)}
            for column, e in preprocessing.categorical.items()
        },
    }


def scaling_from_sums(
    count: Sequence[float] | np.ndarray,
    total: Sequence[float] | np.ndarray,
    total_sq: Sequence[float] | np.ndarray,
) -> tuple[list[float], list[float]]:
    """``mean`` and ``scale`` for ``standardize = "given"`` from per-feature secure sums over the sites'
    training rows: the count, the sum and the sum of squares. The scale is the sample std (ddof 1) plus
    ``STD_EPSILON``, as each site's own standardization computes it, so a federation whose sites share one
    distribution trains the same model either way."""
    n = np.asarray(count, dtype=np.float64)
    s = np.asarray(total, dtype=np.float64)
    s2 = np.asarray(total_sq, dtype=np.float64)
    if n.ndim != 1 or s.shape != n.shape or s2.shape != n.shape:
        raise InputError("count, sum and sum of squares need one value per feature each")
    if not (np.isfinite(n).all() and np.isfinite(s).all() and np.isfinite(s2).all()):
        raise InputError("the sums must be finite")
    if (n < 2).any():
        raise InputError("standardization needs at least two training rows per feature")
    mean = s / n
    variance = np.maximum(s2 - n * mean * mean, 0.0) / (n - 1)
    scale = np.sqrt(variance) + STD_EPSILON
    return [float(m) for m in mean], [float(v) for v in scale]


def scaling_from_statistics(
    report: Mapping[str, Any], features: Sequence[str] | None = None
) -> tuple[list[str], list[float], list[float]]:
    """Feature names, ``mean`` and ``scale`` for ``standardize = "given"`` from a federated statistics
    report (recipe ``stats``, docs/statistics.md): its stratum over every site and label, each feature's
    mean and sample variance (``variance_ddof`` 1); scale is the std plus ``STD_EPSILON``. ``features``
    picks and orders them (default: the report's order). Refuses a suppressed or absent figure."""
    if not isinstance(report, Mapping) or not isinstance(report.get("strata"), list):
        raise InputError("not a federated statistics report: it has no strata")
    if report.get("variance_ddof") != 1:
        raise InputError("the report's variances must be sample variances (variance_ddof 1)")
    pooled = next(
        (
            s
            for s in report["strata"]
            if isinstance(s, Mapping) and s.get("stratum") == {"label": None, "site": None}
        ),
        None,
    )
    if pooled is None:
        raise InputError("the report has no stratum over every site and label")
    figures = pooled.get("features")
    if not isinstance(figures, Mapping):
        raise InputError("the report's pooled stratum has no features")
    listed = report.get("features")
    default = [str(f) for f in listed] if isinstance(listed, list) else list(figures)
    names = list(features) if features is not None else default
    mean: list[float] = []
    scale: list[float] = []
    for name in names:
        entry = figures.get(name)
        if not isinstance(entry, Mapping):
            raise InputError(f"the report has no statistics for feature {name!r}")
        values = []
        for key in ("mean", "variance"):
            cell = entry.get(key)
            value = cell.get("value") if isinstance(cell, Mapping) else None
            if isinstance(cell, Mapping) and cell.get("suppressed"):
                raise InputError(f"feature {name!r}: its {key} is suppressed (fewer records than the k rule)")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InputError(f"feature {name!r}: the report holds no {key}")
            values.append(float(value))
        if values[1] < 0:
            raise InputError(f"feature {name!r}: a negative variance")
        mean.append(values[0])
        scale.append(math.sqrt(values[1]) + STD_EPSILON)
    return names, mean, scale
