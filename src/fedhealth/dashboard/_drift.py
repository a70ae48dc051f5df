"""Feature-distribution drift: the population stability index (PSI) of each feature's securely summed
histogram (a ``stats`` study's released report) against a reference report on the same bins.

``PSI = sum_i (c_i - r_i) ln(c_i / r_i)`` over the bins, ``r_i`` and ``c_i`` the reference's and the current
report's fractions of the feature's observed records in bin ``i``. Per site (the ``by_site`` strata) and for
all sites together (the pooled stratum), each feature's PSI is rated ``ok``, ``warn`` (PSI >= warn, 0.1 by
default) or ``alert`` (PSI >= alert, 0.25 by default).

Suppressed cells (the minimum-cell-count rule): a bin suppressed in either report is left out of both, and the
fractions are taken over the bins released in both (the PSI of the distribution restricted to those bins). A
suppressed cell's value is unknown, so it can be neither used nor merged into a neighbour; leaving it out of
both sides compares like with like. When fewer than two bins remain, or the feature's histogram is withheld,
no PSI is computed and the finding says why (``skipped``). Zero cells: a bin empty in both reports adds
nothing; a bin empty in one only is floored at :data:`FRACTION_FLOOR` (PSI is infinite otherwise).

Only released cells are read: this works on what the researcher was given, never on a site's own figures.

Thresholds may differ per dataset (:class:`DriftPolicy`): a dataset whose features are noisy by nature (a
small registry, seasonal admissions) can be given wider ones without loosening every other dataset's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedhealth.core import InputError

WARN_PSI = 0.1
ALERT_PSI = 0.25
FRACTION_FLOOR = 1e-4
LEVELS = ("ok", "warn", "alert")


class DriftInputError(InputError, ValueError):
    """Two reports that cannot be compared (other features' bins), or thresholds that make no sense."""


@dataclass(frozen=True, slots=True)
class DriftThresholds:
    """PSI at or above ``warn`` is a warning, at or above ``alert`` an alert."""

    warn: float = WARN_PSI
    alert: float = ALERT_PSI

    def __post_init__(self) -> None:
        if not (math.isfinite(self.warn) and math.isfinite(self.alert)) or not 0 < self.warn <= self.alert:
            raise DriftInputError(
                f"drift thresholds must satisfy 0 < warn <= alert (got warn={self.warn}, alert={self.alert})"
            )

    def level(self, psi: float) -> str:
        if psi >= self.alert:
            return "alert"
        if psi >= self.warn:
            return "warn"
        return "ok"


_OVERRIDE = re.compile(r"^\s*([^=,\s]+)\s*=\s*([^,]+?)\s*,\s*([^,]+?)\s*$")


@dataclass(frozen=True, slots=True)
class DriftPolicy:
    """The thresholds each dataset is rated with: its own in ``datasets`` (by dataset name, as studies name
    it in their spec), else ``default``."""

    default: DriftThresholds = field(default_factory=DriftThresholds)
    datasets: Mapping[str, DriftThresholds] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.default, DriftThresholds) or not all(
            isinstance(k, str) and k and isinstance(v, DriftThresholds) for k, v in self.datasets.items()
        ):
            raise DriftInputError("a drift policy maps dataset names to DriftThresholds")
        object.__setattr__(self, "datasets", dict(sorted(self.datasets.items())))

    def for_dataset(self, dataset: str) -> DriftThresholds:
        return self.datasets.get(dataset, self.default)

    @classmethod
    def parse(cls, default: DriftThresholds, overrides: Iterable[str]) -> DriftPolicy:
        """``default`` with overrides written ``DATASET=WARN,ALERT`` (e.g. ``heart-disease=0.05,0.2``); the
        whole list is checked before anything is used, and a bad one raises :class:`DriftInputError` naming
        it in one line."""
        datasets: dict[str, DriftThresholds] = {}
        for text in overrides:
            found = _OVERRIDE.match(text)
            if found is None:
                raise DriftInputError(
                    f"drift thresholds {text!r}: write DATASET=WARN,ALERT (e.g. heart-disease=0.05,0.2)"
                )
            name, warn_text, alert_text = found.groups()
            try:
                warn, alert = float(warn_text), float(alert_text)
            except ValueError:
                raise DriftInputError(
                    f"drift thresholds {text!r}: WARN and ALERT must be numbers (e.g. {name}=0.05,0.2)"
                ) from None
            if name in datasets:
                raise DriftInputError(f"drift thresholds for dataset {name!r} are given twice")
            try:
                datasets[name] = DriftThresholds(warn, alert)
            except DriftInputError as exc:
                raise DriftInputError(f"dataset {name!r}: {exc}") from None
        return cls(default=default, datasets=datasets)


def psi(reference: Sequence[float], current: Sequence[float], *, floor: float = FRACTION_FLOOR) -> float:
    """PSI of two count (or fraction) vectors on the same bins; each is normalised to fractions. Bins empty in
    both add nothing; a fraction of zero on one side only is floored at ``floor``."""
    if len(reference) != len(current):
        raise DriftInputError(f"the histograms have {len(reference)} and {len(current)} bins")
    if any(not math.isfinite(v) or v < 0 for v in (*reference, *current)):
        raise DriftInputError("histogram counts must be finite and non-negative")
    total_r, total_c = float(sum(reference)), float(sum(current))
    if total_r <= 0 or total_c <= 0:
        raise DriftInputError("a histogram without any record has no distribution")
    out = 0.0
    for r, c in zip(reference, current, strict=True):
        if r == 0 and c == 0:
            continue
        fr, fc = max(r / total_r, floor), max(c / total_c, floor)
        out += (fc - fr) * math.log(fc / fr)
    return out


def released_psi(
    reference: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]
) -> tuple[float | None, int, str]:
    """(PSI or None, bins left out, why None) of two histograms of report cells (``{"value", "suppressed"}``):
    bins suppressed in either are left out of both (module docstring)."""
    if len(reference) != len(current):
        raise DriftInputError(f"the histograms have {len(reference)} and {len(current)} bins")
    kept_r: list[float] = []
    kept_c: list[float] = []
    for r, c in zip(reference, current, strict=True):
        if r.get("suppressed") or c.get("suppressed") or r.get("value") is None or c.get("value") is None:
            continue
        kept_r.append(float(r["value"]))
        kept_c.append(float(c["value"]))
    left_out = len(reference) - len(kept_r)
    if len(kept_r) < 2:
        return None, left_out, "fewer than two bins released in both reports"
    if sum(kept_r) <= 0 or sum(kept_c) <= 0:
        return None, left_out, "no record in the bins released in both reports"
    return psi(kept_r, kept_c), left_out, ""


def _strata(report: Mapping[str, Any]) -> dict[str | None, Mapping[str, Any]]:
    """The label-free strata of a report by site (None: all sites together)."""
    out: dict[str | None, Mapping[str, Any]] = {}
    for stratum in report.get("strata") or []:
        key = stratum.get("stratum") or {}
        if key.get("label") is None:
            out[key.get("site")] = stratum
    return out


def is_stats_report(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("kind") == "federated-statistics" and "strata" in value


def comparable(reference: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The features both reports describe on the same bin edges (what can be compared)."""
    ref_bins, cur_bins = reference.get("bins") or {}, current.get("bins") or {}
    return [
        f
        for f in current.get("features") or []
        if f in (reference.get("features") or []) and ref_bins.get(f) == cur_bins.get(f)
    ]


def compare_reports(
    reference: Mapping[str, Any],
    current: Mapping[str, Any],
    thresholds: DriftThresholds | None = None,
) -> dict[str, Any]:
    """Each feature's PSI per site (and for all sites, ``site`` null) of ``current`` against ``reference``:
    ``{"level", "features", "findings": [{"site", "feature", "psi", "level", "bins_left_out", "skipped"}]}``,
    ``level`` the worst finding's. Raises :class:`DriftInputError` if the reports share no feature on the
    same bins."""
    rated = thresholds or DriftThresholds()
    if not (is_stats_report(reference) and is_stats_report(current)):
        raise DriftInputError("both must be federated statistics reports")
    features = comparable(reference, current)
    if not features:
        raise DriftInputError("the reports describe no feature on the same bins")
    ref, cur = _strata(reference), _strata(current)
    findings: list[dict[str, Any]] = []
    worst = 0
    for site in sorted((s for s in cur if s in ref), key=lambda s: (s is not None, s or "")):
        for feature in features:
            r_hist = ((ref[site].get("features") or {}).get(feature) or {}).get("histogram") or []
            c_hist = ((cur[site].get("features") or {}).get(feature) or {}).get("histogram") or []
            value, left_out, why = released_psi(r_hist, c_hist)
            level = rated.level(value) if value is not None else "ok"
            worst = max(worst, LEVELS.index(level))
            findings.append(
                {
                    "site": site,
                    "feature": feature,
                    "psi": None if value is None else round(value, 6),
                    "level": level,
                    "bins_left_out": left_out,
                    "skipped": why,
                }
            )
    return {
        "level": LEVELS[worst],
        "features": features,
        "thresholds": {"warn": rated.warn, "alert": rated.alert},
        "findings": findings,
    }
