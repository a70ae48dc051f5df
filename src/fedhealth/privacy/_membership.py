"""Membership inference: how well an attacker tells a released model's training records from other records
of the same distribution. The privacy benchmark measures it beside the accounted epsilon (DP bounds it: an
(epsilon, delta)-DP release caps any attack's TPR at ``e^epsilon * FPR + delta``).

Pure functions over per-example numbers; training the target and shadow models is the benchmark's job
(``fedhealth.sim``). Every score is "higher means member", so one ROC machinery serves every attack:

- :func:`loss_attack_scores`: the loss-threshold attack of Yeom et al. (CSF 2018): a record is called a
  member when the model's loss on it is below a threshold; the score is minus the loss.
- :func:`lira_scores`: the likelihood-ratio attack of Carlini et al. ("Membership inference attacks from
  first principles", S&P 2022). The statistic is the logit-scaled confidence in the true label,
  ``phi = log(p / (1 - p))`` (:func:`logit_confidence`), which is close to Gaussian over training runs. Each
  shadow model trained on a random half of a data pool is, for each record, an "in" or an "out" model; the
  online attack fits a Gaussian to the in and to the out confidences of each record and scores the target
  model's confidence by the log likelihood ratio; the offline attack uses only the out Gaussian (a one-sided
  test, scored here by the z-score, which orders records as its p-value does). With a handful of shadow
  models (the paper's advice below 64) the variance is global: the within-record residual variance pooled
  over all records, one for "in" and one for "out"; the means are per record.

Figures: :func:`roc_auc` (ties count one half) and :func:`tpr_at_fpr` (the largest true-positive rate of a
threshold whose false-positive rate is at most the target; the paper's headline is TPR at 0.1 % or 1 % FPR,
which says whether *some* records are exposed with confidence, where AUC averages over all of them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhealth.core import InputError

# A confidence of exactly 0 or 1 (float64 saturates beyond |logit| ~ 36.7) maps to this logit, not infinity.
LOGIT_CLIP = 40.0
DEFAULT_FPR = 0.01


class MembershipAttack(StrEnum):
    """The attacks the benchmark runs."""

    LOSS = "loss"  # Yeom et al. 2018
    LIRA_ONLINE = "lira-online"  # Carlini et al. 2022, in and out shadow models
    LIRA_OFFLINE = "lira-offline"  # Carlini et al. 2022, out shadow models only


def _vector(name: str, values: object) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise InputError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"{name} must be finite")
    return array


def _membership(is_member: object, n: int) -> NDArray[np.bool_]:
    mask = np.asarray(is_member)
    if mask.dtype != np.bool_ or mask.shape != (n,):
        raise InputError(f"membership must be a boolean vector of length {n}")
    if mask.all() or not mask.any():
        raise InputError("membership figures need at least one member and one non-member")
    return mask


def _ranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks, tied values sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(1, values.size + 1, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return np.asarray(sums[inverse] / counts[inverse], dtype=np.float64)


def roc_auc(scores: object, is_member: object) -> float:
    """The probability that a random member scores above a random non-member (ties count one half): the
    Mann-Whitney statistic, equal to the area under the ROC curve."""
    s = _vector("scores", scores)
    member = _membership(is_member, s.size)
    m = int(member.sum())
    n = s.size - m
    rank_sum = float(_ranks(s)[member].sum())
    return (rank_sum - m * (m + 1) / 2.0) / (m * n)


def tpr_at_fpr(scores: object, is_member: object, fpr: float = DEFAULT_FPR) -> float:
    """The largest share of members called members by a threshold ("score >= t") that calls at most ``fpr``
    of the non-members members; 0 when even the highest threshold exceeds it."""
    if not (math.isfinite(fpr) and 0 <= fpr <= 1):
        raise InputError(f"fpr must lie in [0, 1], got {fpr!r}")
    s = _vector("scores", scores)
    member = _membership(is_member, s.size)
    thresholds = np.unique(s)[::-1]  # descending: each is "score >= t"
    # counts of members / non-members at or above each threshold
    members_above = np.searchsorted(np.sort(s[member]), thresholds, side="left")
    non_members_above = np.searchsorted(np.sort(s[~member]), thresholds, side="left")
    tp = member.sum() - members_above
    fp = (~member).sum() - non_members_above
    allowed = fp <= fpr * (~member).sum() + 1e-12
    if not allowed.any():
        return 0.0
    return float(tp[allowed].max() / member.sum())


def logit_confidence(prob_true: object) -> NDArray[np.float64]:
    """``log(p / (1 - p))`` of the model's probability of each record's true label, clipped to
    +-``LOGIT_CLIP``."""
    p = _vector("probabilities", prob_true)
    if ((p < 0) | (p > 1)).any():
        raise InputError("probabilities must lie in [0, 1]")
    with np.errstate(divide="ignore"):
        phi = np.log(p) - np.log1p(-p)
    return np.asarray(np.clip(phi, -LOGIT_CLIP, LOGIT_CLIP), dtype=np.float64)


def cross_entropy_of_confidence(phi: object) -> NDArray[np.float64]:
    """The cross-entropy loss ``-log p`` of a record whose logit-scaled confidence is ``phi``."""
    values = _vector("confidences", phi)
    return np.asarray(np.logaddexp(0.0, -values), dtype=np.float64)


def loss_attack_scores(losses: object) -> NDArray[np.float64]:
    """Yeom et al.'s attack: lower loss, more likely a member (the score is minus the loss)."""
    return -_vector("losses", losses)


def _shadows(
    target: NDArray[np.float64], shadow_confidences: object, shadow_in: object
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    conf = np.asarray(shadow_confidences, dtype=np.float64)
    inside = np.asarray(shadow_in)
    if conf.ndim != 2 or conf.shape[1] != target.size:
        raise InputError(f"shadow confidences must have shape (models, {target.size}), got {conf.shape}")
    if conf.shape[0] < 2:
        raise InputError("LiRA needs at least two shadow models")
    if inside.dtype != np.bool_ or inside.shape != conf.shape:
        raise InputError(f"shadow membership must be a boolean array of shape {conf.shape}")
    if not np.isfinite(conf).all():
        raise InputError("shadow confidences must be finite")
    return conf, inside


def _means(conf: NDArray[np.float64], mask: NDArray[np.bool_]) -> tuple[NDArray[np.float64], float]:
    """Per-record mean over the models where ``mask`` holds (NaN where none), and the pooled within-record
    residual variance."""
    counts = mask.sum(axis=0)
    sums = np.where(mask, conf, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    residuals = np.where(mask, conf - np.nan_to_num(means), 0.0)
    dof = int((counts - 1).clip(min=0).sum())
    variance = float((residuals**2).sum() / dof) if dof > 0 else float("nan")
    return means, variance


def lira_scores(
    target_confidences: object,
    shadow_confidences: object,
    shadow_in: object,
    *,
    attack: MembershipAttack = MembershipAttack.LIRA_ONLINE,
) -> NDArray[np.float64]:
    """LiRA's score of each record against the target model (higher: more likely a member).

    ``target_confidences``: the target model's :func:`logit_confidence` of each record, shape ``(n,)``;
    ``shadow_confidences``: each shadow model's, shape ``(k, n)``; ``shadow_in[j, i]``: whether shadow model
    ``j`` trained on record ``i``. A record that no shadow model held in (or out), rare with random halves,
    takes the mean of the others' in-out gap from its out (or in) mean; one with neither takes the pool mean.
    """
    if attack is MembershipAttack.LOSS:
        raise InputError("the loss attack needs no shadow models: use loss_attack_scores")
    target = _vector("target confidences", target_confidences)
    conf, inside = _shadows(target, shadow_confidences, shadow_in)
    mu_in, var_in = _means(conf, inside)
    mu_out, var_out = _means(conf, ~inside)
    if not (math.isfinite(var_out) and var_out > 0):
        raise InputError("LiRA needs records held out of at least two shadow models, with some spread")
    both = np.isfinite(mu_in) & np.isfinite(mu_out)
    gap = float((mu_in - mu_out)[both].mean()) if both.any() else 0.0
    pool = float(conf.mean())
    mu_out = np.where(np.isfinite(mu_out), mu_out, np.where(np.isfinite(mu_in), mu_in - gap, pool))
    if attack is MembershipAttack.LIRA_OFFLINE:
        return np.asarray((target - mu_out) / math.sqrt(var_out), dtype=np.float64)
    if not (math.isfinite(var_in) and var_in > 0):
        raise InputError("online LiRA needs records held in at least two shadow models, with some spread")
    mu_in = np.where(np.isfinite(mu_in), mu_in, mu_out + gap)
    log_in = -((target - mu_in) ** 2) / (2 * var_in) - 0.5 * math.log(var_in)
    log_out = -((target - mu_out) ** 2) / (2 * var_out) - 0.5 * math.log(var_out)
    return np.asarray(log_in - log_out, dtype=np.float64)


@dataclass(frozen=True, slots=True, kw_only=True)
class AttackFigures:
    """One attack's success over ``members`` and ``non_members`` scored records."""

    auc: float
    tpr_at_fpr: float
    fpr: float
    members: int
    non_members: int


def attack_figures(scores: object, is_member: object, *, fpr: float = DEFAULT_FPR) -> AttackFigures:
    s = _vector("scores", scores)
    member = _membership(is_member, s.size)
    return AttackFigures(
        auc=roc_auc(s, member),
        tpr_at_fpr=tpr_at_fpr(s, member, fpr),
        fpr=fpr,
        members=int(member.sum()),
        non_members=int((~member).sum()),
    )


# --- the benchmark's result, as the model card reads it ---------------------------------------------------


def _optional_number(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"membership result: {key} must be a finite number or null, got {value!r}")
    return float(value)


def _optional_count(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"membership result: {key} must be a positive whole number or null, got {value!r}")
    return value


def _number(obj: Mapping[str, Any], key: str, low: float, high: float) -> float:
    value = _optional_number(obj, key)
    if value is None or not low <= value <= high:
        raise InputError(f"membership result: {key} must be a number in [{low:g}, {high:g}], got {value!r}")
    return value


def _text(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value or len(value) > 200:
        raise InputError(f"membership result: {key} must be a non-empty string of at most 200 characters")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class MembershipMeasurement:
    """One attack on the models one recipe released at one privacy setting: ``epsilon`` is the accounted
    record-level epsilon at ``delta`` (None: no DP, epsilon infinite)."""

    dataset: str
    setting: str
    target_epsilon: float | None
    epsilon: float | None
    delta: float | None
    attack: MembershipAttack
    figures: AttackFigures
    test_auc: float | None = None  # the models' own task AUC on held-out rows: what the privacy costs
    models: int | None = None  # federations trained for this setting (each the target once)
    rounds: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "setting": self.setting,
            "target_epsilon": self.target_epsilon,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "attack": self.attack.value,
            "auc": self.figures.auc,
            "tpr_at_fpr": self.figures.tpr_at_fpr,
            "fpr": self.figures.fpr,
            "members": self.figures.members,
            "non_members": self.figures.non_members,
            "test_auc": self.test_auc,
            "models": self.models,
            "rounds": self.rounds,
        }

    @classmethod
    def from_json(cls, obj: object) -> MembershipMeasurement:
        if not isinstance(obj, Mapping):
            raise InputError("membership result: each measurement must be an object")
        try:
            attack = MembershipAttack(str(obj.get("attack")))
        except ValueError:
            known = ", ".join(a.value for a in MembershipAttack)
            raise InputError(f"membership result: attack must be one of {known}") from None
        counts = [obj.get("members"), obj.get("non_members")]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts):
            raise InputError("membership result: members and non_members must be positive whole numbers")
        return cls(
            dataset=_text(obj, "dataset"),
            setting=_text(obj, "setting"),
            target_epsilon=_optional_number(obj, "target_epsilon"),
            epsilon=_optional_number(obj, "epsilon"),
            delta=_optional_number(obj, "delta"),
            attack=attack,
            figures=AttackFigures(
                auc=_number(obj, "auc", 0.0, 1.0),
                tpr_at_fpr=_number(obj, "tpr_at_fpr", 0.0, 1.0),
                fpr=_number(obj, "fpr", 0.0, 1.0),
                members=int(counts[0]),  # type: ignore[arg-type]
                non_members=int(counts[1]),  # type: ignore[arg-type]
            ),
            test_auc=_optional_number(obj, "test_auc"),
            models=_optional_count(obj, "models"),
            rounds=_optional_count(obj, "rounds"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class MembershipReport:
    """What ``fedhealth benchmark membership`` measured, and how (``setup``: models, rounds, command...)."""

    measurements: tuple[MembershipMeasurement, ...]
    measured_at: str
    setup: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "fedhealth-membership-benchmark",
            "measured_at": self.measured_at,
            "setup": dict(self.setup),
            "measurements": [m.to_json() for m in self.measurements],
        }

    @classmethod
    def from_json(cls, obj: object) -> MembershipReport:
        if not isinstance(obj, Mapping) or obj.get("kind") != "fedhealth-membership-benchmark":
            raise InputError("not a membership benchmark result (fedhealth benchmark membership writes one)")
        rows = obj.get("measurements")
        setup = obj.get("setup", {})
        if not isinstance(rows, Sequence) or isinstance(rows, str) or not rows:
            raise InputError("membership result: measurements must be a non-empty list")
        if not isinstance(setup, Mapping):
            raise InputError("membership result: setup must be an object")
        return cls(
            measurements=tuple(MembershipMeasurement.from_json(r) for r in rows),
            measured_at=_text(obj, "measured_at"),
            setup=dict(setup),
        )
