"""Summaries of per-site evaluation results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedhealth.core import InputError
from fedhealth.learning._results import EvalResult


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricSummary:
    """Metrics over several sites. ``auc`` averages only the sites where AUC is defined (None if none is)."""

    num_sites: int
    num_samples: int
    loss: float
    accuracy: float
    auc: float | None


def mean_metrics(results: Sequence[EvalResult]) -> MetricSummary:
    """The plain mean over sites, each site counting once: FLamby's headline number (mean of per-center
    accuracies), which keeps a small hospital as visible as a large one."""
    if not results:
        raise InputError("mean_metrics needs at least one result")
    aucs = [r.auc for r in results if r.auc is not None]
    return MetricSummary(
        num_sites=len(results),
        num_samples=sum(r.num_samples for r in results),
        loss=float(np.mean([r.loss for r in results])),
        accuracy=float(np.mean([r.accuracy for r in results])),
        auc=float(np.mean(aucs)) if aucs else None,
    )


def weighted_metrics(results: Sequence[EvalResult]) -> MetricSummary:
    """The sample-weighted mean over sites, i.e. the metric on the union of the sites' sets (exact for loss
    and accuracy; AUC does not pool, so it is the sample-weighted mean of the defined site AUCs)."""
    if not results:
        raise InputError("weighted_metrics needs at least one result")
    n = np.array([r.num_samples for r in results], dtype=np.float64)
    if n.sum() <= 0:
        raise InputError("weighted_metrics: every result has zero samples")
    with_auc = [(r.num_samples, r.auc) for r in results if r.auc is not None]
    auc_weight = sum(k for k, _ in with_auc)
    return MetricSummary(
        num_sites=len(results),
        num_samples=int(n.sum()),
        loss=float(np.dot(n, [r.loss for r in results]) / n.sum()),
        accuracy=float(np.dot(n, [r.accuracy for r in results]) / n.sum()),
        auc=float(sum(k * a for k, a in with_auc) / auc_weight) if auc_weight else None,
    )
