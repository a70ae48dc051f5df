"""What a site puts into a secure sum, and how the orchestrator reads the sum back.

Under secure aggregation every figure a site reports travels inside the masked vector, so the orchestrator
learns only sums over the contributing sites:

- training round: ``delta`` = w_k * clip(Δ_k, ±c) for the model update Δ_k (first scaled to the strategy's
  ``max_update_norm`` if set; w_k = min(n_k, W), the site's sample count capped at the strategy's
  ``weight_cap`` and at least 1, or 1 under site-level DP), ``weight`` = w_k, ``loss`` = w_k * train loss,
  and the validation figures below;
- evaluation round: ``eval_n``, ``correct`` (counts), ``accuracy``, ``auc`` and ``eval_loss`` (each site's own
  value, summed: their mean over the sites that released them is FLamby's plain mean of site metrics),
  ``eval_sites`` (1 from a site with held-out figures: one with fewer than k held-out patients withholds
  them and adds zeros, which must not count in the mean) and ``auc_n`` (how many sites could compute an AUC).

The sample-weighted mean update is then ``sum(delta) / sum(weight)``: FedAvg's weighting, with nothing
revealed per site. Values are clipped to their segment's range; the codec's quantization error per
coordinate of the sum is below ``contributors * step`` (see ``fedhealth.secagg``'s codec).

The codec of a round depends on the approved spec only (its sites for the round's kind), never on what the
orchestrator says about the round. Nothing stops a malicious site from sending raw ring values instead of
an encoded vector, so after unmasking :func:`decode_sum` checks every segment against what the contributors
can possibly produce, and the segments against each other (:class:`SecureSumRejected` otherwise): a wrapped
weight (1 instead of 900) is caught. What no check can catch: a malicious contributor controls the decoded
sums as long as they stay consistent, so it can move the round's mean update anywhere within
``±update_clip`` per coordinate (and within ``max_update_norm``). Only robust aggregation over individual
updates, which secure aggregation hides by design, or proofs of range would bound it further.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhealth.core import InputError, TensorSpec
from fedhealth.protocol import (
    DpMode,
    SecureAggregationSpec,
    SiteMetrics,
    StudySpec,
    TaskKind,
    secure_round_plan,
)
from fedhealth.runtime._tasks import MAX_LOSS, Params, bound_update_norm, param_specs
from fedhealth.secagg import Segment, SegmentKind, VectorCodec

MAX_EVAL_COUNT = 1_000_000  # most held-out records one site's evaluation counts (see _count_cap)


def _count_cap(n_sites: int) -> int:
    # n sums of integers up to the cap must not wrap the 32-bit ring
    return min(MAX_EVAL_COUNT, ((1 << 32) - 1) // max(1, n_sites))


class SecureSumRejected(InputError):
    """A decoded secure sum lies outside what its contributors can produce (a site sent values outside its
    ranges, e.g. raw ring values that wrap): the round fails with this reason and nothing of it is used."""


def site_weight(spec: StudySpec, num_samples: int) -> int:
    """A site's weight in the secure sum: its sample count capped at the strategy's ``weight_cap`` and at
    least 1 (FedAvg; the server checks each contributor weighs 1..cap), or 1 under site-level differential
    privacy, whose guarantee bounds each site's influence on an unweighted sum."""
    if spec.privacy is not None and spec.privacy.mode is not DpMode.RECORD:
        return 1
    return max(1, min(num_samples, spec.strategy.weight_cap))


def _metric_segments(cap: int) -> list[Segment]:
    return [
        Segment(name="eval_n", low=0, high=cap, kind=SegmentKind.INTEGER),
        Segment(name="eval_sites", low=0, high=1, kind=SegmentKind.INTEGER),
        Segment(name="correct", low=0, high=cap, kind=SegmentKind.INTEGER),
        Segment(name="accuracy", low=0.0, high=1.0),
        Segment(name="auc", low=0.0, high=1.0),
        Segment(name="auc_n", low=0, high=1, kind=SegmentKind.INTEGER),
        Segment(name="eval_loss", low=0.0, high=MAX_LOSS),
    ]


def secure_codec(spec: StudySpec, kind: TaskKind) -> VectorCodec:
    """The codec of a round: the same on every site and at the orchestrator. It depends on the approved spec
    only (its sites for ``kind`` bound the contributors), not on the round the orchestrator set up."""
    sa = spec.secure_aggregation
    if sa is None:
        raise InputError("the study does not use secure aggregation")
    n_sites = secure_round_plan(spec, kind).n
    segments = _metric_segments(_count_cap(n_sites))
    if kind is TaskKind.TRAIN:
        length = sum(math.prod(s.shape) for s in param_specs(spec.recipe))
        top = site_weight(spec, spec.strategy.weight_cap)  # the largest weight a site can have
        bound = top * sa.update_clip
        segments = [
            Segment(name="delta", low=-bound, high=bound, length=length),
            Segment(name="weight", low=0, high=top, kind=SegmentKind.INTEGER),
            Segment(name="loss", low=0.0, high=top * MAX_LOSS),
            *segments,
        ]
    return VectorCodec(segments=tuple(segments), max_contributors=n_sites)


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
    if n == 0:  # no held-out record counted (none, or fewer than k: withheld): no held-out figure either
        return {
            "eval_n": 0,
            "eval_sites": 0,
            "correct": 0,
            "accuracy": 0.0,
            "auc": 0.0,
            "auc_n": 0,
            "eval_loss": 0.0,
        }
    accuracy = metrics.accuracy if metrics.accuracy is not None else 0.0
    return {
        "eval_n": n,
        "eval_sites": 1,
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
        flat = _flatten(delta, param_specs(spec.recipe))
        if spec.strategy.max_update_norm is not None:  # as the orchestrator bounds a plain-mode update
            flat = bound_update_norm(flat, spec.strategy.max_update_norm)
        flat = np.clip(flat, -sa.update_clip, sa.update_clip)
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
    """The round's figures from the unmasked sum; :class:`SecureSumRejected` if the sum is impossible."""
    try:
        sums = codec.decode(total, contributors)
    except InputError as exc:
        raise SecureSumRejected(str(exc)) from exc
    check_sum(codec, spec, sums, contributors)
    metrics: dict[str, Any] = {"sites": contributors, "secure": True}
    eval_n = float(sums["eval_n"][0])
    eval_sites = float(sums["eval_sites"][0])  # the sites that released held-out figures
    if eval_n > 0:
        metrics["accuracy"] = float(sums["accuracy"][0]) / eval_sites
        metrics["pooled_accuracy"] = float(sums["correct"][0]) / eval_n
        metrics["eval_loss"] = float(sums["eval_loss"][0]) / eval_sites
        metrics["eval_sites"] = int(eval_sites)
        metrics["num_eval_samples"] = int(eval_n)
    if sums["auc_n"][0] > 0:
        metrics["auc"] = float(sums["auc"][0]) / float(sums["auc_n"][0])
    mean_delta = None
    if "delta" in sums:
        weight = float(sums["weight"][0])
        metrics["num_samples"] = int(weight)
        metrics["train_loss"] = float(sums["loss"][0]) / weight
        specs = param_specs(spec.recipe)
        mean_delta = {k: v.astype(np.float32) for k, v in _unflatten(sums["delta"] / weight, specs).items()}
    return SecureSum(contributors=contributors, mean_delta=mean_delta, metrics=metrics)


def check_sum(codec: VectorCodec, spec: StudySpec, sums: Mapping[str, np.ndarray], contributors: int) -> None:
    """Refuse decoded sums that ``contributors`` honest encodings cannot produce.

    The codec already bounds each segment by ``contributors`` times its range. On top of that, per segment
    and across segments, up to the codec's quantization error bound: every contributor weighs 1..cap (so
    contributors <= sum weight <= contributors * cap); |sum delta| <= update_clip * sum weight per coordinate
    (each site's delta is its weight times a clipped update) and, with ``max_update_norm``, in L2 too;
    loss <= MAX_LOSS * weight; correct <= eval_n; auc <= auc_n <= contributors; eval_sites <= eval_n and
    eval_sites > 0 whenever eval_n > 0 (a site releasing figures held out at least one patient);
    accuracy <= eval_sites; eval_loss <= MAX_LOSS * eval_sites.
    """
    m = contributors

    def scalar(name: str) -> float:
        return float(sums[name][0])

    def slack(name: str) -> float:
        return codec.error_bound(name, m)

    problems: list[str] = []
    if scalar("correct") > scalar("eval_n"):
        problems.append(f"{scalar('correct'):.0f} correct predictions out of {scalar('eval_n'):.0f}")
    if scalar("auc_n") > m:
        problems.append(f"{scalar('auc_n'):.0f} sites with an AUC among {m} contributors")
    if scalar("auc") > scalar("auc_n") + slack("auc"):
        problems.append(f"AUCs summing to {scalar('auc'):.4g} over {scalar('auc_n'):.0f} sites")
    eval_sites = scalar("eval_sites")
    if eval_sites > m:
        problems.append(f"{eval_sites:.0f} sites with held-out figures among {m} contributors")
    if eval_sites > scalar("eval_n") or (scalar("eval_n") > 0 and eval_sites == 0):
        problems.append(
            f"{scalar('eval_n'):.0f} held-out records from {eval_sites:.0f} sites with held-out figures"
        )
    if scalar("accuracy") > min(m, eval_sites) + slack("accuracy"):
        problems.append(f"accuracies summing to {scalar('accuracy'):.4g} over {eval_sites:.0f} sites")
    if scalar("eval_loss") > MAX_LOSS * min(m, eval_sites) + slack("eval_loss"):
        problems.append(f"held-out losses summing to {scalar('eval_loss'):.4g} over {eval_sites:.0f} sites")
    if "delta" in sums:
        sa = spec.secure_aggregation
        assert sa is not None
        weight = scalar("weight")
        low, high = m * site_weight(spec, 1), m * site_weight(spec, spec.strategy.weight_cap)
        if not low <= weight <= high:
            problems.append(f"a total weight of {weight:.0f} from {m} sites (possible: {low} to {high})")
        else:
            delta = np.asarray(sums["delta"], dtype=np.float64)
            worst = float(np.max(np.abs(delta))) if delta.size else 0.0
            if worst > sa.update_clip * weight + slack("delta"):
                problems.append(
                    f"a summed update coordinate of {worst:.4g} where the {weight:.0f} units of weight allow "
                    f"at most {sa.update_clip * weight:.4g}"
                )
            norm_bound = spec.strategy.max_update_norm
            if norm_bound is not None:
                norm = float(np.linalg.norm(delta))
                allowed = norm_bound * weight + slack("delta") * math.sqrt(delta.size)
                if norm > allowed:
                    problems.append(f"a summed update of L2 norm {norm:.4g} above {allowed:.4g}")
            if scalar("loss") > MAX_LOSS * weight + slack("loss"):
                problems.append(f"a summed loss of {scalar('loss'):.4g} for a weight of {weight:.0f}")
    if problems:
        raise SecureSumRejected(
            f"the decoded secure sum is impossible for {m} contributing sites ({'; '.join(problems)}): "
            "a site sent values outside its ranges"
        )
