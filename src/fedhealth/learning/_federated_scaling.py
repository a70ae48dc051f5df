"""``standardize = "federated"``: the scaling pre-step a rounds study runs before its round 1.

Every training site of the study takes part in one collective session (the same machinery, masks and relay
as the collective recipes, docs/architecture.md) and runs :func:`run_scaling_site`:

1. one exact secure sum (:func:`~fedhealth.learning._stats.exact_secure_sum`: three limbs, integer counts
   exact, sums to within ``n 2^-41``) of ``[count, sum, sum of squares]`` per feature over the site's kept
   training rows, on their raw scale (after the consent filter and the cohort rule; a connector's own
   standardization is undone first);
2. every site checks that the totals are those of some rows (:func:`check_totals`: one whole row count, at
   least its own, no negative variance; each participant's figures are masked, so only their total can
   be checked) and turns them into the same ``mean`` and ``scale`` (:func:`scaling_release`: the sample std,
   ddof 1, plus ``STD_EPSILON``, as :func:`~fedhealth.learning.scaling_from_sums` computes them for
   ``"given"``); the leader broadcasts that release and every other site checks it byte for byte, as the
   ``stats`` recipe does with its report.

The orchestrator relays masked vectors and learns the sums, as every participant does; no site's own
count, sum or sum of squares is ever in clear outside it. The release (the federation's mean and scale,
and its total row count) is the pre-step's public result: the orchestrator records it as round 0's result
and sends it with every later task, and the model package carries it.

A constant feature (a variance of 0 over the federation: no scale to divide by) is released as a refusal
that names the feature, so the study fails at once with that one line and no training round runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydantic import JsonValue

from fedhealth.core import InputError
from fedhealth.data import STD_EPSILON, TabularDataset
from fedhealth.learning._collectives import Collectives
from fedhealth.learning._preprocessing import raw_features
from fedhealth.learning._stats import ReportMismatchError, exact_secure_sum

SCALING_KIND = "federated-scaling"


class ScalingRefusedError(InputError):
    """The federation's rows cannot give a scaling (a constant feature, too few rows)."""


class ScalingSumsError(InputError):
    """The session's totals are not those of any rows: a participant sent figures no data gives."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FederatedScaling:
    """What the pre-step released: per feature the federation-wide mean and scale, and the row count."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    rows: int


def scaling_sums(X_raw: NDArray[np.float64] | None, n_features: int) -> NDArray[np.float64]:
    """A site's local figures: ``[count (F), sum (F), sum of squares (F)]`` over its raw training rows
    (zeros for a site with no rows). InputError for a value that is not finite (nothing is sent)."""
    if X_raw is None:
        return np.zeros(3 * n_features)
    X = np.asarray(X_raw, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != n_features:
        raise InputError(f"scaling: the training rows have {X.shape[-1]} features, the study {n_features}")
    if not np.isfinite(X).all():
        raise InputError("scaling: a training value is not finite; nothing was sent")
    count = np.full(n_features, float(X.shape[0]))
    return np.concatenate([count, X.sum(axis=0), (X * X).sum(axis=0)])


def scaling_release(totals: NDArray[np.float64], feature_names: Sequence[str]) -> bytes:
    """The release every site computes from the summed figures: canonical JSON of ``mean``, ``scale`` and
    ``rows``, or of the ``refused`` reason (a constant feature, fewer than two rows)."""
    f = len(feature_names)
    count, total, total_sq = totals[:f], totals[f : 2 * f], totals[2 * f :]
    body: dict[str, JsonValue] = {"kind": SCALING_KIND}
    rows = float(count[0]) if f else 0.0
    if rows < 2:
        body["refused"] = "standardize = 'federated' needs at least two training rows over the federation"
    else:
        mean = total / count
        variance = np.maximum(total_sq - count * mean * mean, 0.0) / (count - 1)
        # relative to the feature's magnitude, a variance this small is rounding, not spread
        constant = [
            name
            for name, v, m, sq in zip(feature_names, variance, mean, total_sq / count, strict=True)
            if not v > 1e-12 * max(float(sq), float(m * m), 1e-300)
        ]
        if constant:
            body["refused"] = (
                f"standardize = 'federated': feature {constant[0]!r} is constant over the federation's "
                "training rows (std 0), so it cannot be scaled; drop it or use standardize = 'none'"
            )
        else:
            body["mean"] = [float(m) for m in mean]
            body["scale"] = [float(math.sqrt(v) + STD_EPSILON) for v in variance]
            body["rows"] = round(rows)
    return json.dumps(body, sort_keys=True, allow_nan=False).encode()


def read_scaling(released: bytes | None) -> FederatedScaling:
    """The pre-step's release read back (:class:`ScalingRefusedError` with its one-line reason when it
    refused; InputError when it is not a scaling release at all)."""
    if released is None:
        raise InputError("the scaling pre-step released nothing")
    try:
        body = json.loads(released)
    except ValueError:
        raise InputError("the scaling pre-step's release is not JSON") from None
    if not isinstance(body, dict) or body.get("kind") != SCALING_KIND:
        raise InputError("the session did not release a federated scaling")
    if "refused" in body:
        raise ScalingRefusedError(str(body["refused"]))
    mean, scale, rows = body.get("mean"), body.get("scale"), body.get("rows")
    if (
        not isinstance(mean, list)
        or not isinstance(scale, list)
        or len(mean) != len(scale)
        or not isinstance(rows, int)
        or not all(isinstance(v, int | float) and math.isfinite(v) for v in [*mean, *scale])
        or not all(v > 0 for v in scale)
    ):
        raise InputError("the scaling pre-step's release is malformed")
    return FederatedScaling(
        mean=tuple(float(v) for v in mean), scale=tuple(float(v) for v in scale), rows=rows
    )


def check_totals(totals: NDArray[np.float64], own: NDArray[np.float64], feature_names: Sequence[str]) -> None:
    """Refuse totals that no rows give (:class:`ScalingSumsError`, one line, no value): one row count for
    every feature, a whole number, at least this site's own (``own``, its :func:`scaling_sums`), and per
    feature a sum of squares at least the sum's square over the count. A participant's figures are masked,
    so no site can check them one by one; without this a lying one shifted the mean of one feature alone
    (a count for it only), or its sums made the scale infinite and every site's program crash."""
    f = len(feature_names)
    if not f:
        return
    count, total, total_sq = totals[:f], totals[f : 2 * f], totals[2 * f :]
    problem = None
    if not (count == count[0]).all():
        problem = "the row count differs between features"
    elif count[0] != math.floor(count[0]):
        problem = "the row count is not a whole number of rows"
    elif count[0] < own[0]:
        problem = "the federation counts fewer rows than this site holds"
    elif count[0] > 0:
        # Cauchy-Schwarz: n sumsq >= sum^2 for any rows; the sums are exact to n 2^-41, far inside this margin
        spread = total_sq - total * total / count[0]
        negative = [
            n for n, s, sq in zip(feature_names, spread, total_sq, strict=True) if s < -1e-9 * abs(sq)
        ]
        if negative:
            problem = f"feature {negative[0]!r} has a negative variance"
    if problem is not None:
        raise ScalingSumsError(
            f"scaling: the session's sums are not those of any rows ({problem}): a participant sent figures "
            "no data gives; refusing the session"
        )


def run_scaling_site(
    session: Collectives, dataset: TabularDataset | None, feature_names: Sequence[str]
) -> bytes:
    """One site's part in the pre-step (module docstring); returns the release, the same at every site."""
    X_raw = raw_features(dataset, dataset.X_train) if dataset is not None else None
    sums = scaling_sums(X_raw, len(feature_names))
    totals = exact_secure_sum(session, sums)
    check_totals(totals, sums, feature_names)  # before the release: a refused session releases nothing
    own = scaling_release(totals, feature_names)
    released = session.broadcast(own if session.site == session.sites[0] else None)
    if released != own:
        raise ReportMismatchError(
            "scaling: the leader's release differs from this site's reading of the same sums; "
            "refusing the session"
        )
    return released
