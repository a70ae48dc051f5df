"""``stats``: federated descriptive statistics as a collective recipe (docs/statistics.md).

Per feature: count of observed values, missing count and fraction, mean, variance (ddof 1) and a histogram on
agreed bin edges, for the whole federation and optionally per label and per site. Everything a site
contributes goes through the session's ``secure_sum``; the orchestrator sees masked vectors and the sums.

The session has two secure sums:

1. **counts**: per stratum the rows, per feature the observed and missing counts and the histogram. From
   their sum every site derives the same suppression decisions (the minimum-cell-count rule ``k``).
2. **moments**: for every (stratum, feature) whose observed count was not suppressed, the sum of ``x - c``
   and of ``(x - c)^2``, ``c`` the public centre of the feature's bin edges (it keeps the sum of squares
   small and the variance free of cancellation). Suppressed cells contribute nothing here: their values'
   sums are never computed.

The leader then broadcasts the report, which holds only what the rule releases; that broadcast is the
session's result (``finish`` reads it).

**Exactness.** ``secure_sum`` adds ``round(x * 2^40)`` in a 2^64 ring and needs ``|x| < 2^23 / n`` for n
sites. Each local figure is split into three limbs in a public base ``B`` (the power of two at most half
that bound): ``|x| = h2 B^2 + h1 B + l`` with integer ``h2, h1`` and ``0 <= l < B``, each limb carrying x's
sign. The split is exact in float64 (divisions by powers of two, floors, and subtractions whose result is a
multiple of the operand's ulp), the integer limbs sum exactly, and only the lowest limb is rounded, to
``2^-40``: the federated sum equals the sum of the sites' float64 figures to within ``n 2^-41`` plus one
float64 rounding when the limbs are recombined. Counts are integers and come out exact. A figure whose top
limb would leave the range (beyond about ``B^2 2^23 / n``: 2^59 with four sites) is refused.

**Noise** (``noise_multiplier`` or ``target_epsilon`` with ``delta``): each site adds to every figure it
sends Gaussian noise of standard deviation ``z * sensitivity * scale`` where ``scale`` is 1 for counts, the
half-width ``h`` of the feature's edges for sums of ``x - c`` and ``h^2`` for sums of squares (values are
clipped to the edges first), and ``sensitivity`` is the L2 norm of everything one patient can change in the
two sums together, in those units (:func:`sensitivity`); the noisy figures are snapped to a power-of-two
grid of their noise (:func:`fedhealth.privacy.snap`, as every release). Each site adds the full noise
itself, so its guarantee does not depend on any other site being honest; the site's ledger charges one
Gaussian release of multiplier ``z`` (declared by :meth:`StatsRecipe.dp_plan`, charged by the agent's
privacy gate).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from fedhealth.core import InputError
from fedhealth.data import TabularDataset
from fedhealth.learning._collectives import Collectives, InMemorySession
from fedhealth.learning._recipe import (
    CombinationPattern,
    DataSchema,
    RecipeCapabilities,
    ReferenceStep,
    SessionContext,
    SiteSessionOutcome,
    TemplateParam,
)
from fedhealth.privacy import (
    AccountantKind,
    CalibrationError,
    DpParameterError,
    DpPlan,
    GaussianRelease,
    RandomSource,
    calibrate_noise,
    secure_generator,
    snap,
)
from fedhealth.secagg import SecAggSecurityError, value_bound

# A public grid for features without bins of their own: standard units, for standardized features. It is
# never derived from any site's data.
DEFAULT_EDGES: tuple[float, ...] = (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0)
MAX_FEATURES = 1000
MAX_EDGES = 1001

Edge = Annotated[float, Field(allow_inf_nan=False)]


def _check_edges(edges: list[float], where: str) -> list[float]:
    if len(edges) < 2:
        raise ValueError(f"{where}: give at least 2 bin edges")
    if len(edges) > MAX_EDGES:
        raise ValueError(f"{where}: at most {MAX_EDGES} bin edges")
    if any(not b > a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"{where}: bin edges must be strictly increasing")
    return edges


class StatsParams(BaseModel):
    """``recipe.params`` of ``stats``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    features: list[str] = Field(
        min_length=1, max_length=MAX_FEATURES, description="the features to describe, by name"
    )
    bins: dict[str, list[Edge]] = Field(
        default_factory=dict,
        description="bin edges per feature (strictly increasing, finite); values below the first edge and "
        "at or above the last fall in two open-ended bins",
    )
    default_bins: list[Edge] = Field(
        default_factory=lambda: list(DEFAULT_EDGES),
        description="edges for every feature not in bins (a public grid, never derived from data)",
    )
    by_label: bool = Field(default=False, description="also per label (0 and 1)")
    by_site: bool = Field(default=False, description="also per site (and per site and label with by_label)")
    min_cell_count: int = Field(
        default=5, ge=1, le=1_000_000, description="k: a cell counting 1..k-1 records is suppressed"
    )
    noise_multiplier: float | None = Field(
        default=None, gt=0, le=10_000, allow_inf_nan=False, description="Gaussian noise multiplier z"
    )
    target_epsilon: float | None = Field(
        default=None, gt=0, le=1000, allow_inf_nan=False, description="calibrate z to this epsilon"
    )
    delta: float | None = Field(
        default=None, gt=0, lt=1, allow_inf_nan=False, description="delta of target_epsilon"
    )

    @field_validator("features")
    @classmethod
    def _unique(cls, features: list[str]) -> list[str]:
        if len(set(features)) != len(features):
            raise ValueError("features must not repeat")
        if any(not f for f in features):
            raise ValueError("a feature name must not be empty")
        return features

    @model_validator(mode="after")
    def _consistent(self) -> StatsParams:
        unknown = sorted(set(self.bins) - set(self.features))
        if unknown:
            raise ValueError(f"bins names features not in features: {', '.join(unknown)}")
        for name, edges in self.bins.items():
            _check_edges(edges, f"bins[{name!r}]")
        _check_edges(self.default_bins, "default_bins")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("give noise_multiplier or target_epsilon (with delta), not both")
        if (self.target_epsilon is None) != (self.delta is None):
            raise ValueError("target_epsilon and delta go together")
        if self.target_epsilon is not None:
            assert self.delta is not None
            try:
                _calibrated(self.target_epsilon, self.delta)
            except (CalibrationError, DpParameterError) as exc:
                raise ValueError(f"target_epsilon: {exc}") from None
        return self

    def edges(self, feature: str) -> NDArray[np.float64]:
        return np.asarray(self.bins.get(feature, self.default_bins), dtype=np.float64)

    @property
    def noisy(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None


@dataclass(frozen=True, slots=True)
class Stratum:
    """A subset of the records: every record, one label, one site, or one site and label."""

    label: int | None = None
    site: str | None = None

    def key(self) -> dict[str, JsonValue]:
        return {"label": self.label, "site": self.site}


def strata(params: StatsParams, sites: tuple[str, ...]) -> list[Stratum]:
    """The strata in their fixed order (the same at every site)."""
    out = [Stratum()]
    labels = (0, 1)
    if params.by_label:
        out += [Stratum(label=y) for y in labels]
    if params.by_site:
        for s in sites:
            out.append(Stratum(site=s))
            if params.by_label:
                out += [Stratum(label=y, site=s) for y in labels]
    return out


def noise_multiplier(params: StatsParams) -> float | None:
    """The noise multiplier z: the params' own, or calibrated from (target_epsilon, delta) for one Gaussian
    release (deterministic, so every site and the orchestrator compute the same)."""
    if params.noise_multiplier is not None:
        return params.noise_multiplier
    if params.target_epsilon is None:
        return None
    assert params.delta is not None
    return _calibrated(params.target_epsilon, params.delta)


@functools.lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, delta: float) -> float:
    # a few accountant runs; every resolution of the same params asks again
    return calibrate_noise(target_epsilon, delta, 1.0, 1, AccountantKind.PLD)


def sensitivity(params: StatsParams) -> float:
    """The L2 norm of what one record can change in both sums together, each figure in units of its noise
    scale: per stratum it is in, its row count (1), per feature either the missing count (1) or the observed
    count and one bin (2) and the two sums (1 each, values clipped to the edges): ``1 + 4F``. A record lies
    in one stratum of each kind the params ask for."""
    kinds = 1 + int(params.by_label) + int(params.by_site) + int(params.by_label and params.by_site)
    return math.sqrt(kinds * (1 + 4 * len(params.features)))


# --- exact sums ------------------------------------------------------------------------------------------


def limb_base(n_sites: int) -> float:
    """The public base of the three-limb split: the largest power of two at most half the range bound."""
    return float(2.0 ** (math.floor(math.log2(value_bound(n_sites))) - 1))


def split_limbs(values: NDArray[np.float64], n_sites: int) -> NDArray[np.float64]:
    """``values`` as (3, m) limbs ``[h2, h1, l]`` with ``x = h2 B^2 + h1 B + l`` exactly (module docstring);
    InputError when a value is not finite or its top limb leaves the secure sum's range."""
    if not np.isfinite(values).all():
        raise InputError("stats: a local figure is not finite; nothing was sent")
    base = limb_base(n_sites)
    # the magnitude is split and the sign applied to every limb: each subtraction below is then exact (the
    # result is a multiple of the operand's ulp and smaller than it), where a floor of a negative value
    # would add B^2 to it and lose its low bits
    sign = np.sign(values)
    magnitude = np.abs(values)
    top = np.floor(magnitude / (base * base))
    if values.size and float(top.max()) >= value_bound(n_sites):
        raise InputError(
            f"stats: a local figure is too large for an exact secure sum over {n_sites} sites "
            f"(more than about {base * base * value_bound(n_sites):.3g}); nothing was sent"
        )
    rest = magnitude - top * (base * base)
    mid = np.floor(rest / base)
    low = rest - mid * base
    return np.stack([sign * top, sign * mid, sign * low])


def join_limbs(limbs: NDArray[np.float64], n_sites: int) -> NDArray[np.float64]:
    base = limb_base(n_sites)
    top, mid, low = limbs
    return np.asarray((top * base + mid) * base + low, dtype=np.float64)


def exact_secure_sum(session: Collectives, values: NDArray[np.float64]) -> NDArray[np.float64]:
    """The sum over the session of ``values`` (1-D float64) through ``checked_sum``, exact as the module
    docstring says, whatever their magnitude up to about 2^61 / n. Checked: what a site sums next (which
    cells' values) follows from this sum, so a relay that altered it could make a site reveal what the
    minimum-cell-count rule withholds; an altered sum fails the session instead."""
    n = len(session.sites)
    if values.size == 0:
        session.barrier()  # every site calls the same collectives, even with nothing to add
        return values.copy()
    return join_limbs(session.checked_sum(split_limbs(values, n)), n)


# --- what one site computes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SiteColumns:
    """A site's records as the recipe reads them: the chosen features (float64), where they are missing, the
    labels. Train and test parts together: statistics describe every record the site holds."""

    X: NDArray[np.float64]
    missing: NDArray[np.bool_]
    y: NDArray[np.int64]


def site_columns(params: StatsParams, dataset: TabularDataset) -> SiteColumns:
    """The params' features of ``dataset`` (InputError naming an unknown feature; never a value)."""
    names = list(dataset.feature_names)
    unknown = [f for f in params.features if f not in names]
    if unknown:
        raise InputError(
            f"stats: dataset {dataset.name!r} has no feature {unknown[0]!r} "
            f"({len(unknown)} of the study's features are unknown here)"
        )
    idx = [names.index(f) for f in params.features]
    X_all = np.concatenate([dataset.X_train, dataset.X_test])
    X = np.ascontiguousarray(X_all[:, idx], dtype=np.float64)
    missing = np.zeros(X.shape, dtype=np.bool_)
    imp = dataset.imputation
    if imp is not None:
        mask = np.concatenate([imp.missing_train, imp.missing_test])
        for j, feature in enumerate(imp.features):
            if feature in idx:
                missing[:, idx.index(feature)] = mask[:, j]
    if not np.isfinite(X[~missing]).all():
        raise InputError(f"stats: dataset {dataset.name!r} holds a value that is not finite")
    y = np.concatenate([dataset.y_train, dataset.y_test]).astype(np.int64)
    return SiteColumns(X=X, missing=missing, y=y)


def _rows_in(stratum: Stratum, site: str, y: NDArray[np.int64]) -> NDArray[np.bool_]:
    if stratum.site is not None and stratum.site != site:
        return np.zeros(y.shape, dtype=np.bool_)
    if stratum.label is not None:
        return np.asarray(y == stratum.label)
    return np.ones(y.shape, dtype=np.bool_)


def count_vector(
    params: StatsParams, cols: SiteColumns | None, site: str, layout: list[Stratum]
) -> NDArray[np.float64]:
    """The first sum's local figures: per stratum ``[rows, per feature [observed, missing, bins...]]``."""
    parts: list[NDArray[np.float64]] = []
    for stratum in layout:
        rows = _rows_in(stratum, site, cols.y) if cols is not None else None
        parts.append(np.array([0.0 if rows is None else float(rows.sum())]))
        for j, feature in enumerate(params.features):
            edges = params.edges(feature)
            hist = np.zeros(edges.size + 1)
            observed = missing = 0.0
            if cols is not None and rows is not None:
                seen = rows & ~cols.missing[:, j]
                observed = float(seen.sum())
                missing = float((rows & cols.missing[:, j]).sum())
                where = np.searchsorted(edges, cols.X[seen, j], side="right")
                hist = np.bincount(where, minlength=edges.size + 1).astype(np.float64)
            parts.append(np.array([observed, missing]))
            parts.append(hist)
    return np.concatenate(parts)


def _check_own_strata(
    layout: list[Stratum], site: str, local: NDArray[np.float64], summed: NDArray[np.float64]
) -> None:
    """A hospital's own strata (``by_site``) are filled by it alone: their summed cells must be its own
    counts. Another participant that added phantom records there would make a cell of fewer than k of this
    hospital's patients look releasable, and their values would then be summed; the session fails first."""
    block = local.size // len(layout)
    for s, stratum in enumerate(layout):
        part = slice(s * block, (s + 1) * block)
        if stratum.site == site and not np.array_equal(summed[part], local[part]):
            raise SecAggSecurityError(
                "stats: the summed counts of this hospital's own strata are not its counts (another "
                "participant added to them); refusing the session"
            )


def centre_and_half_width(edges: NDArray[np.float64]) -> tuple[float, float]:
    lo, hi = float(edges[0]), float(edges[-1])
    return (lo + hi) / 2.0, (hi - lo) / 2.0


# --- the released report ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CountCells:
    """The first sum read back, per stratum: rows, and per feature observed, missing and the histogram."""

    rows: list[float]
    observed: list[list[float]]
    missing: list[list[float]]
    hist: list[list[NDArray[np.float64]]]


def read_counts(params: StatsParams, totals: NDArray[np.float64], layout: list[Stratum]) -> CountCells:
    rows: list[float] = []
    observed: list[list[float]] = []
    missing: list[list[float]] = []
    hist: list[list[NDArray[np.float64]]] = []
    at = 0
    for _ in layout:
        rows.append(float(totals[at]))
        at += 1
        o_row: list[float] = []
        m_row: list[float] = []
        h_row: list[NDArray[np.float64]] = []
        for feature in params.features:
            width = params.edges(feature).size + 1
            o_row.append(float(totals[at]))
            m_row.append(float(totals[at + 1]))
            h_row.append(totals[at + 2 : at + 2 + width].copy())
            at += 2 + width
        observed.append(o_row)
        missing.append(m_row)
        hist.append(h_row)
    return CountCells(rows=rows, observed=observed, missing=missing, hist=hist)


def _released(count: float, k: int, noisy: bool) -> bool:
    """The minimum-cell-count rule: a cell is released if it counts no record or at least k (with noise,
    if its noisy count reaches k: a noisy zero is not a zero)."""
    if noisy:
        return count >= k
    return count == 0 or count >= k


def _cell(value: float | None, suppressed: bool) -> dict[str, JsonValue]:
    return {"value": None if suppressed else value, "suppressed": suppressed}


def _count(value: float, noisy: bool) -> float | int:
    # noisy counts are rounded and floored at zero: post-processing, it costs no privacy
    return max(0, round(value)) if noisy else round(value)


def suppressed_bins(
    hist: NDArray[np.float64],
    k: int,
    noisy: bool,
    *,
    observed_ok: bool,
    count_shown: bool,
    missing: float = 0.0,
) -> set[int] | None:
    """The histogram bins withheld: all of them if the observed count is suppressed; else each bin of 1 to
    k-1 records (primary), plus the smallest other non-empty bin when one suppressed bin could otherwise be
    recovered by subtraction: from the shown count if exactly one bin is suppressed, or, when the count is
    withheld (its ``missing`` count is small), from the rows if no bin is (secondary suppression). Also when
    the suppressed cells (bins, and the missing count if the count is withheld) are pinned by their total:
    an exact report releases zeros and suppresses only 1 to k-1, so n such cells adding up to n hold one
    record each, and adding up to n(k-1) hold k-1 each.

    None: the suppressed cells are pinned and no other non-empty bin is left to withhold beside them (every
    non-empty bin is a small one): the feature is withheld as a whole, as when its observed count is small."""
    if not observed_ok:
        return set(range(len(hist)))
    hidden = {i for i, c in enumerate(hist) if not _released(float(c), k, noisy)}
    unknown = len(hidden) + (0 if count_shown else 1)
    total = sum(float(hist[i]) for i in hidden) + (0.0 if count_shown else missing)
    pinned = not noisy and unknown > 1 and total in (unknown, unknown * (k - 1))
    if unknown == 1 or pinned:
        spare = [i for i, c in enumerate(hist) if i not in hidden and float(c) > 0]
        if spare:
            hidden.add(min(spare, key=lambda i: (float(hist[i]), i)))
        elif hidden:
            return None
    return hidden


def feature_release(counts: CountCells, s: int, j: int, k: int, noisy: bool) -> tuple[bool, bool, set[int]]:
    """What the rule releases of feature ``j`` in stratum ``s``: whether its observed count (with its mean and
    variance) and its missing count are released, and the histogram bins withheld. One decision, read by the
    report and by the moments sum alike, so no value is summed for a cell the report withholds."""
    rows_ok = _released(counts.rows[s], k, noisy)
    n_miss = counts.missing[s][j]
    obs_ok = rows_ok and _released(counts.observed[s][j], k, noisy)
    miss_ok = rows_ok and _released(n_miss, k, noisy)
    # a feature's rows split into observed and missing: both are shown or neither, else the one suppressed
    # would be the other subtracted from the rows
    hidden = suppressed_bins(
        counts.hist[s][j], k, noisy, observed_ok=obs_ok, count_shown=obs_ok and miss_ok, missing=n_miss
    )
    if hidden is None:  # small cells pinned with nothing left to hide beside them: all of it withheld
        return False, False, set(range(len(counts.hist[s][j])))
    return obs_ok, miss_ok, hidden


def moment_cells(params: StatsParams, counts: CountCells, noisy: bool) -> list[tuple[int, int]]:
    """The (stratum, feature) cells whose values the second sum adds: those whose mean the report releases
    (a released, non-zero observed count of a feature not withheld as a whole), in a fixed order."""
    k = params.min_cell_count
    return [
        (s, j)
        for s in range(len(counts.rows))
        for j in range(len(params.features))
        if counts.observed[s][j] > 0 and feature_release(counts, s, j, k, noisy)[0]
    ]


def build_report(
    params: StatsParams,
    sites: tuple[str, ...],
    counts: CountCells,
    moments: dict[tuple[int, int], tuple[float, float]],
    z: float | None,
) -> dict[str, JsonValue]:
    """The released statistics: only cells the rule allows, each ``{value, suppressed}``."""
    k = params.min_cell_count
    noisy = z is not None
    out_strata: list[JsonValue] = []
    for s, stratum in enumerate(strata(params, sites)):
        rows = counts.rows[s]
        rows_ok = _released(rows, k, noisy)
        features: dict[str, JsonValue] = {}
        for j, feature in enumerate(params.features):
            edges = params.edges(feature)
            centre, _ = centre_and_half_width(edges)
            n_obs = counts.observed[s][j]
            n_miss = counts.missing[s][j]
            obs_ok, miss_ok, hidden = feature_release(counts, s, j, k, noisy)
            mean: float | None = None
            var: float | None = None
            if obs_ok and (s, j) in moments and n_obs > 0:
                s1, s2 = moments[(s, j)]
                mean = centre + s1 / n_obs
                if n_obs > 1:
                    var = (s2 - s1 * s1 / n_obs) / (n_obs - 1)
                if noisy:  # clamped to what clipped values can give: post-processing
                    mean = min(max(mean, float(edges[0])), float(edges[-1]))
                    var = None if var is None else max(var, 0.0)
            shown = obs_ok and miss_ok
            total = n_obs + n_miss
            fraction = n_miss / total if shown and total > 0 else None
            bins = [_cell(_count(float(c), noisy), i in hidden) for i, c in enumerate(counts.hist[s][j])]
            features[feature] = {
                "count": _cell(_count(n_obs, noisy), not shown),
                "missing": _cell(_count(n_miss, noisy), not shown),
                "missing_fraction": _cell(fraction, fraction is None),
                "mean": _cell(mean, mean is None),
                "variance": _cell(var, var is None),
                "histogram": bins,  # type: ignore[dict-item]
            }
        out_strata.append(
            {
                "stratum": stratum.key(),
                "rows": _cell(_count(rows, noisy), not rows_ok),
                "features": features,
            }
        )
    return {
        "kind": "federated-statistics",
        "sites": list(sites),
        "features": list(params.features),
        "bins": {f: params.edges(f).tolist() for f in params.features},
        "min_cell_count": k,
        "noise": None
        if z is None
        else {"mechanism": "gaussian", "noise_multiplier": z, "added_by": "each site"},
        "variance_ddof": 1,
        "strata": out_strata,
    }


class ReportMismatchError(InputError):
    """The report the session's leader broadcast is not the one the sums give."""


# --- the recipe ------------------------------------------------------------------------------------------


class StatsRecipe:
    """Federated statistics through secure sums, version 1 (module docstring)."""

    name: Literal["stats"] = "stats"
    version: Literal["1"] = "1"
    params_model = StatsParams
    pattern = CombinationPattern.COLLECTIVE
    capabilities = RecipeCapabilities(reads_data=True, secure_sum=True, session_dp=True)

    def data_schema(self, params: StatsParams) -> DataSchema:
        # features are looked up by name: their order and the width do not matter; the label only counts
        # with by_label (labels 0 and 1), so a study without it takes a dataset of any label classes
        return DataSchema(classes=2 if params.by_label else None)

    def describe(self, params: StatsParams) -> str:
        extra = []
        if params.by_label:
            extra.append("per label")
        if params.by_site:
            extra.append("per site")
        per = f" (also {' and '.join(extra)})" if extra else ""
        noise = (
            f"; each site adds Gaussian noise (multiplier {noise_multiplier(params):.4g}"
            + (
                f", epsilon {params.target_epsilon:g} at delta {params.delta:g}"
                if params.target_epsilon is not None
                else ""
            )
            + "), charged to its privacy budget"
            if params.noisy
            else "; no noise is added (the released figures are exact)"
        )
        return (
            f"descriptive statistics of {len(params.features)} features{per}: counts, missing fraction, "
            "mean, variance and histograms on fixed bins, summed securely; cells under "
            f"{params.min_cell_count} records are suppressed{noise}"
        )

    def template(self, n_features: int | None) -> list[TemplateParam]:
        return [
            TemplateParam(key="features", value=["age"], comment="the features to describe, by name"),
            TemplateParam(
                key="min_cell_count", value=5, comment="cells under this many records are suppressed"
            ),
            TemplateParam(key="by_label", value=False, comment="also per label"),
        ]

    def reference_step(self) -> ReferenceStep:
        def run() -> None:
            session = InMemorySession(["a", "b", "c"])
            session.run(lambda s: exact_secure_sum(s, np.ones(10_000)))

        return ReferenceStep(run=run, note="one in-process exact secure sum of 1e4 values over 3 sites")

    def dp_plan(self, params: StatsParams) -> DpPlan:
        """What a site releases about its records (its ledger pays it): one Gaussian release of multiplier z
        over both sums (their sensitivity is one norm, :func:`sensitivity`), or nothing without noise."""
        z = noise_multiplier(params)
        return DpPlan() if z is None else DpPlan.of(GaussianRelease(noise_multiplier=z))

    def run_site(
        self,
        params: StatsParams,
        dataset: TabularDataset | None,
        session: Collectives,
        ctx: SessionContext,
    ) -> SiteSessionOutcome:
        sites = session.sites
        layout = strata(params, sites)
        z = noise_multiplier(params)
        if z is not None and ctx.noise is None:
            raise InputError("stats: noise was asked for but the session gave no noise generator")
        cols = site_columns(params, dataset) if dataset is not None else None
        std = 0.0 if z is None else z * sensitivity(params)

        local = count_vector(params, cols, session.site, layout)
        if z is not None:  # noisy figures are snapped like every release (privacy._mechanisms: Mironov)
            assert ctx.noise is not None
            local = snap(local + ctx.noise.normal(0.0, std, size=local.size), std)
        summed = exact_secure_sum(session, local)
        if z is None:
            _check_own_strata(layout, session.site, local, summed)
        counts = read_counts(params, summed, layout)

        # the second sum: only cells whose mean the report releases, in a layout every site derives alike
        wanted = moment_cells(params, counts, z is not None)
        sums = np.zeros(2 * len(wanted))
        scales = np.ones(2 * len(wanted))
        for i, (s, j) in enumerate(wanted):
            edges = params.edges(params.features[j])
            centre, half = centre_and_half_width(edges)
            scales[2 * i], scales[2 * i + 1] = half, half * half
            if cols is None:
                continue
            rows = _rows_in(layout[s], session.site, cols.y) & ~cols.missing[:, j]
            values = cols.X[rows, j]
            if z is not None:  # the sums' sensitivity assumes values within the public edges
                values = np.clip(values, edges[0], edges[-1])
            centred = values - centre
            sums[2 * i] = float(np.sum(centred))
            sums[2 * i + 1] = float(np.sum(centred * centred))
        if z is not None and sums.size:
            assert ctx.noise is not None
            noisy = sums + ctx.noise.normal(0.0, 1.0, size=sums.size) * (std * scales)
            sums = np.array([snap(np.array([v]), std * u)[0] for v, u in zip(noisy, scales, strict=True)])
        totals = exact_secure_sum(session, sums)
        moments = {cell: (float(totals[2 * i]), float(totals[2 * i + 1])) for i, cell in enumerate(wanted)}

        # every site reads the same sums into the same report; the leader broadcasts it and the others check
        # it byte for byte, so a leader cannot release a cell the rule withholds without failing the session
        own = json.dumps(build_report(params, sites, counts, moments, z), allow_nan=False).encode()
        released = session.broadcast(own if session.site == sites[0] else None)
        if released != own:
            raise ReportMismatchError(
                "stats: the leader's report differs from this site's reading of the same sums; "
                "refusing the session"
            )
        return SiteSessionOutcome(
            record={"rows_here": 0 if cols is None else int(cols.y.size), "noise_multiplier": z}
        )

    def finish(self, params: StatsParams, released: bytes) -> dict[str, JsonValue]:
        report = json.loads(released)
        if not isinstance(report, dict) or report.get("kind") != "federated-statistics":
            raise ValueError("the session did not release a statistics report")
        return report


STATS_RECIPE = StatsRecipe()


def run_stats_in_memory(
    params: StatsParams | Mapping[str, Any],
    datasets: Mapping[str, TabularDataset | None],
    *,
    noise: Callable[[str], RandomSource] | None = None,
    call_timeout_s: float = 30.0,
) -> dict[str, JsonValue]:
    """A whole stats session among ``datasets``' sites in this process (threads, the real masks and relay),
    and the report the orchestrator would read from it. ``noise(site)`` gives each site's noise generator
    (default: a fresh secure one per site, :func:`fedhealth.privacy.secure_generator`). For tests and a
    researcher's dry run on synthetic data; the services run the same program through
    :func:`fedhealth.runtime.run_collective_in_memory` or the agents."""
    checked = params if isinstance(params, StatsParams) else StatsParams.model_validate(dict(params))
    session = InMemorySession(sorted(datasets), call_timeout_s=call_timeout_s)

    def program(member: Collectives) -> SiteSessionOutcome:
        generator = noise(member.site) if noise is not None else secure_generator()
        ctx = SessionContext(site=member.site, seed=0, rng=np.random.default_rng(0), noise=generator)
        return STATS_RECIPE.run_site(checked, datasets[member.site], member, ctx)

    session.run(program)
    if session.relay.released is None:
        raise InputError("stats: the session released nothing")
    return STATS_RECIPE.finish(checked, session.relay.released)
