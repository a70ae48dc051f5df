"""What a site puts into a secure sum, and how the orchestrator reads the sum back.

Under secure aggregation every figure a site reports travels inside the masked vector, so the orchestrator
learns only sums over the contributing sites:

- training round: ``delta`` = w_k * clip(Δ_k, ±c) for the model update Δ_k (w_k = min(n_k, W), the site's
  sample count capped at the study's ``weight_cap``, or 1 under site-level DP), ``weight`` = w_k,
  ``loss`` = w_k * train loss, and the validation figures below;
- evaluation round: ``eval_n``, ``correct`` (counts), ``accuracy``, ``auc`` and ``eval_loss`` (each site's own
  value, summed: their mean over contributors is FLamby's plain mean of site metrics), ``auc_n`` (how many
  sites could compute an AUC).

The sample-weighted mean update is then ``sum(delta) / sum(weight)``: FedAvg's weighting, with nothing
revealed per site. Values are clipped to their segment's range; the codec's quantization error per
coordinate of the sum is below ``contributors * step`` (see ``fedhealth.secagg``'s codec).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhealth.core import InputError, TensorSpec
from fedhealth.protocol import DpMode, SecureAggregationSpec, SiteMetrics, StudySpec, TaskKind
from fedhealth.runtime._tasks import Params, param_specs
from fedhealth.secagg import Segment, SegmentKind, VectorCodec

MAX_LOSS = 100.0  # losses are clipped here before summing (a BCE above 100 means the model is broken anyway)
MAX_EVAL_COUNT = 1_000_000  # most held-out records one site's evaluation counts (see _count_cap)


def _count_cap(n_sites: int) -> int:
    # n sums of integers up to the cap must not wrap the 32-bit ring
    return min(MAX_EVAL_COUNT, ((1 << 32) - 1) // max(1, n_sites))


def site_weight(spec: StudySpec, num_samples: int) -> int:
    """A site's weight in the secure sum: its sample count capped at ``weight_cap`` (FedAvg), or 1 under
    site-level differential privacy, whose guarantee bounds each site's influence on an unweighted sum."""
    sa = spec.secure_aggregation
    assert sa is not None
    if spec.privacy is not None and spec.privacy.mode is not DpMode.RECORD:
        return 1
    return min(num_samples, sa.weight_cap)


def _metric_segments(cap: int) -> list[Segment]:
    return [
        Segment(name="eval_n", low=0, high=cap, kind=SegmentKind.INTEGER),
        Segment(name="correct", low=0, high=cap, kind=SegmentKind.INTEGER),
        Segment(name="accuracy", low=0.0, high=1.0),
        Segment(name="auc", low=0.0, high=1.0),
        Segment(name="auc_n", low=0, high=1, kind=SegmentKind.INTEGER),
        Segment(name="eval_loss", low=0.0, high=MAX_LOSS),
    ]


def secure_codec(spec: StudySpec, kind: TaskKind, n_sites: int) -> VectorCodec:
    """The codec of a round: the same on every site and at the orchestrator (it depends on the spec only)."""
    sa = spec.secure_aggregation
    if sa is None:
        raise InputError("the study does not use secure aggregation")
    segments = _metric_segments(_count_cap(n_sites))
    if kind is TaskKind.TRAIN:
        length = sum(math.prod(s.shape) for s in param_specs(spec.recipe))
        top = site_weight(spec, sa.weight_cap)  # the largest weight a site can have: the ranges follow it
        bound = top * sa.update_clip
        segments = [
            Segment(name="delta", low=-bound, high=bound, length=length),
            Segment(name="weight", low=0, high=top, kind=SegmentKind.INTEGER),
            Segment(name="loss", low=0.0, high=top * MAX_LOSS),
            *segments,
        ]
    return VectorCodec(segments=tuple(segments), max_contributors=n_sites)


def secure_threshold(spec: StudySpec, n_sites: int) -> int:
    """Sites needed to unmask: the spec's threshold, else max(2n/3 rounded up, a strict majority, quorum)."""
    sa = spec.secure_aggregation
    assert sa is not None
    if sa.threshold is not None:
        return sa.threshold
    return min(n_sites, max(math.ceil(2 * n_sites / 3), n_sites // 2 + 1, spec.min_sites))


def _flatten(params: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> np.ndarray:
    return np.concatenate([np.asarray(params[s.name], dtype=np.float64).reshape(-1) for s in specs])


def _unflatten(flat: np.ndarray, specs: Sequence[TensorSpec]) -> Params:
    out: Params = {}
    pos = 0
    for s in specs:
        size = math.prod(s.shape)
        out[s.name] = flat[pos : pos + size].reshape(s.shape)
        pos += size
    return out


def _metric_values(metrics: SiteMetrics) -> dict[str, Any]:
    n = metrics.num_eval_samples
    accuracy = metrics.accuracy if metrics.accuracy is not None else 0.0
    return {
        "eval_n": n,
        "correct": round(accuracy * n),
        "accuracy": accuracy,
        "auc": metrics.auc if metrics.auc is not None else 0.0,
        "auc_n": 1 if metrics.auc is not None else 0,
        "eval_loss": min(MAX_LOSS, metrics.eval_loss) if metrics.eval_loss is not None else 0.0,
    }


def encode_contribution(
    codec: VectorCodec,
    spec: StudySpec,
    metrics: SiteMetrics,
    delta: Params | None = None,
    *,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One site's vector for the secure sum (``delta`` for training rounds)."""
    values = _metric_values(metrics)
    if delta is not None:
        sa: SecureAggregationSpec = spec.secure_aggregation  # type: ignore[assignment]
        weight = site_weight(spec, metrics.num_samples)
        flat = np.clip(_flatten(delta, param_specs(spec.recipe)), -sa.update_clip, sa.update_clip)
        values |= {
            "delta": flat * weight,
            "weight": weight,
            "loss": weight * min(MAX_LOSS, metrics.train_loss or 0.0),
        }
    return codec.encode(values, rng=rng)


@dataclass(frozen=True, slots=True, kw_only=True)
class SecureSum:
    """What the orchestrator learns from a secure round: sums only."""

    contributors: int
    mean_delta: Params | None  # sample-weighted mean update (training rounds)
    metrics: dict[str, Any]


def decode_sum(codec: VectorCodec, spec: StudySpec, total: np.ndarray, contributors: int) -> SecureSum:
    sums = codec.decode(total, contributors)
    metrics: dict[str, Any] = {"sites": contributors, "secure": True}
    eval_n = float(sums["eval_n"][0])
    if eval_n > 0:
        metrics["accuracy"] = float(sums["accuracy"][0]) / contributors
        metrics["pooled_accuracy"] = float(sums["correct"][0]) / eval_n
        metrics["eval_loss"] = float(sums["eval_loss"][0]) / contributors
        metrics["num_eval_samples"] = int(eval_n)
    if sums["auc_n"][0] > 0:
        metrics["auc"] = float(sums["auc"][0]) / float(sums["auc_n"][0])
    mean_delta = None
    if "delta" in sums:
        weight = float(sums["weight"][0])
        if weight <= 0:
            raise InputError("the secure sum carries no sample weight")
        metrics["num_samples"] = int(weight)
        metrics["train_loss"] = float(sums["loss"][0]) / weight
        specs = param_specs(spec.recipe)
        mean_delta = {k: v.astype(np.float32) for k, v in _unflatten(sums["delta"] / weight, specs).items()}
    return SecureSum(contributors=contributors, mean_delta=mean_delta, metrics=metrics)
