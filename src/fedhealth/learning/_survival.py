"""Survival pieces of the ``xgboost`` recipe's ``survival:cox`` objective: XGBoost's labels from a dataset's
survival times, the C-index exactly at a site, and the federation's C-index from a securely summed
concordance histogram (docs/boosting.md, "survival:cox").

XGBoost's Cox objective computes each row's gradient from the risk set of the rows it holds: in distributed
training every worker sorts and sums over its own rows only, so the federated model is a Cox model
*stratified by site* (each hospital its own baseline hazard), not one fitted on the pooled risk sets.
:func:`cox_gradient` is that gradient (XGBoost 3.2.0's ``CoxRegression::GetGradient``, Breslow ties), used
for the single-machine reference with one stratum per site.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from fedhealth.data import SchemaError, TabularDataset


def cox_labels(dataset: TabularDataset, part: str) -> NDArray[np.float64]:
    """XGBoost's ``survival:cox`` label of each row: the survival time, negative when censored (the event
    indicator is the dataset's label). A dataset without survival times is refused in one line."""
    if not dataset.survival:
        raise SchemaError(
            f"dataset {dataset.name!r} has no survival time: survival:cox needs a time column "
            "(time=COLUMN in the dataset URI, with the label the event indicator)"
        )
    time = getattr(dataset, f"time_{part}")
    event = getattr(dataset, f"y_{part}")
    return np.where(event == 1, time, -time).astype(np.float64)


def cox_gradient(margin: NDArray[np.float32], label: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    """XGBoost's Cox gradient and hessian over one stratum's rows (float64, before XGBoost rounds them to
    float32), with the same operations in the same order (``math.exp`` is the C library's ``exp``)."""
    order = np.argsort(np.abs(label), kind="stable")
    preds = [float(p) for p in np.asarray(margin, dtype=np.float32)]
    exp_p_sum = 0.0
    for i in order:
        exp_p_sum += math.exp(preds[i])
    grad = np.zeros(len(label))
    hess = np.zeros(len(label))
    r_k = s_k = last_exp_p = last_abs_y = accumulated = 0.0
    for i in order:
        exp_p = math.exp(preds[i])
        y = float(label[i])
        abs_y = abs(y)
        accumulated += last_exp_p
        if last_abs_y < abs_y:
            exp_p_sum -= accumulated
            accumulated = 0.0
        if y > 0:
            r_k += 1.0 / exp_p_sum
            s_k += 1.0 / (exp_p_sum * exp_p_sum)
        grad[i] = exp_p * r_k - (1.0 if y > 0 else 0.0)
        hess[i] = exp_p * r_k - exp_p * exp_p * s_k
        last_abs_y, last_exp_p = abs_y, exp_p
    return grad, hess


def stratified_cox_objective(strata: Sequence[int]):  # type: ignore[no-untyped-def]
    """An XGBoost custom objective: :func:`cox_gradient` within each stratum of consecutive rows (the sites'
    rows pooled in order), what federated ``survival:cox`` computes."""
    bounds = np.cumsum([0, *strata])

    def objective(margin: NDArray[np.float32], dtrain: object) -> tuple[NDArray, NDArray]:
        label = dtrain.get_label().astype(np.float64)  # type: ignore[attr-defined]
        grad, hess = np.zeros(len(label)), np.zeros(len(label))
        for a, b in itertools.pairwise(bounds):
            grad[a:b], hess[a:b] = cox_gradient(margin[a:b], label[a:b])
        return grad, hess

    return objective


def harrell_c(time: NDArray[np.float64], event: NDArray[np.int64], risk: NDArray[np.float64]) -> float | None:
    """Harrell's C-index, exactly: over the pairs (i, j) with an event at i and ``time[i] < time[j]``, the
    share where ``risk[i] > risk[j]``, ties in risk counting one half. None without a comparable pair."""
    time, risk = np.asarray(time, dtype=np.float64), np.asarray(risk, dtype=np.float64)
    concordant = comparable = 0.0
    for i in np.flatnonzero(np.asarray(event) == 1):
        later = time > time[i]
        comparable += float(later.sum())
        concordant += float((risk[later] < risk[i]).sum()) + 0.5 * float((risk[later] == risk[i]).sum())
    return concordant / comparable if comparable else None


def _cells(values: NDArray[np.float64], low: float, high: float, cells: int) -> NDArray[np.int64]:
    scaled = np.floor((np.asarray(values, dtype=np.float64) - low) / (high - low) * cells)
    return np.clip(scaled, 0, cells - 1).astype(np.int64)


def concordance_histogram(
    time: NDArray[np.float64],
    event: NDArray[np.int64],
    risk: NDArray[np.float64],
    *,
    time_range: tuple[float, float],
    score_range: tuple[float, float],
    cells: int,
) -> NDArray[np.float64]:
    """A site's additive pieces of the federation's C-index: row counts on a public (time cell, score cell)
    grid, of its events and of all its rows (``2 * cells * cells`` values, to be summed securely)."""
    t = _cells(time, *time_range, cells)
    s = _cells(risk, *score_range, cells)
    events = np.zeros((cells, cells))
    rows = np.zeros((cells, cells))
    np.add.at(rows, (t, s), 1.0)
    ev = np.asarray(event) == 1
    np.add.at(events, (t[ev], s[ev]), 1.0)
    return np.concatenate([events.reshape(-1), rows.reshape(-1)])


def cindex_from_histogram(summed: NDArray[np.float64], cells: int) -> float | None:
    """The C-index of the pooled rows from the summed histogram: an event in time cell ``a`` and score cell
    ``b`` against every row in a later time cell, concordant when its score cell is lower, one half in the
    same score cell. Approximate: pairs within one time cell are not counted (their order is unknown) and
    scores within one score cell count as ties."""
    events = summed[: cells * cells].reshape(cells, cells)
    rows = summed[cells * cells :].reshape(cells, cells)
    later = np.cumsum(rows[::-1], axis=0)[::-1]  # rows in time cells >= a
    later = np.vstack([later[1:], np.zeros((1, cells))])  # ... > a
    lower = np.cumsum(later, axis=1) - later  # per (a, b): later rows in score cells < b
    concordant = float(np.sum(events * (lower + 0.5 * later)))
    comparable = float(np.sum(events.sum(axis=1) * later.sum(axis=1)))
    return concordant / comparable if comparable else None
