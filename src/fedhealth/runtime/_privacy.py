"""Differential privacy in a round: what a task releases, its noise multiplier, and where the noise is added.

One study spec (``StudySpec.privacy``) determines everything, so that the orchestrator (which validates and
reports) and each site (which trains and pays from its ledger) compute the same figures without talking:

- **record** (DP-SGD inside each site, protects each patient): a training round at site ``k`` releases
  ``DpSgdRelease(sigma_k, q_k, steps_per_round)``; the whole study ``steps_per_round x rounds`` steps.
  ``q_k`` is the site's Poisson rate (``site_sample_rates[k]``, else ``sample_rate``).
- **site-central / site-distributed** (clip each site's update to ``max_grad_norm``, Gaussian noise on the
  sum of the updates): a training round is a Gaussian release at ``sigma`` for the site-level guarantee, and
  at ``sigma / 2`` for a site's patients (one patient moves the clipped update by up to twice the clip norm);
  the site's ledger pays the latter (:meth:`fedhealth.privacy.SiteUpdateDp.record_level_release`).

``target_epsilon`` is always what each site's ledger is charged for the whole study (record level, at the
spec's delta, with the spec's accountant): the noise multiplier is the smallest that keeps it there
(:func:`fedhealth.privacy.calibrate_noise`), computed from the spec alone, deterministically, and cached. An
evaluation task releases nothing from the training records and is not charged (see docs/privacy.md).

The noise of a site's task is drawn from :func:`fedhealth.privacy.secure_generator` unless the site agent
runs with ``FEDHEALTH_REPRODUCIBLE_NOISE=1``: then from ``task_rng(seed, round, site)``, so the services
reproduce an in-process run bit for bit. Anyone who knows the study seed can recompute such noise, so it
protects nothing against them: for benchmarks and tests only, and every attestation says which was used.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedhealth.core import InputError
from fedhealth.learning import DpLevel
from fedhealth.privacy import (
    AccountantKind,
    CalibrationError,
    DpParameterError,
    DpPlan,
    DpRelease,
    DpSgdRelease,
    NoiseMode,
    RandomSource,
    SiteUpdateDp,
    calibrate_noise,
    clip_headroom_stds,
    epsilon,
    secure_generator,
)
from fedhealth.protocol import DpMode, StudySpec, TaskKind, secure_round_plan
from fedhealth.runtime._recipes import study_recipe

Params = dict[str, np.ndarray]

REPRODUCIBLE_NOISE_ENV = "FEDHEALTH_REPRODUCIBLE_NOISE"
# The codec of secure aggregation clips every coordinate at ``update_clip``. In site-distributed mode a
# clipped coordinate of a noisy update is a failure of the Gaussian mechanism; its probability over the
# whole study (every coordinate d of every site's update n in every round R) must stay below this share of
# delta, and the headroom ``update_clip - clip norm`` is sized for it (clip_headroom_stds over d * n * R
# values). The guarantee is then (epsilon, delta) with this tail inside delta's 1 %: see docs/privacy.md.
CLIP_TAIL_SHARE_OF_DELTA = 0.01


def reproducible_noise_enabled() -> bool:
    """Whether this process draws DP noise from the study seed (``FEDHEALTH_REPRODUCIBLE_NOISE=1``)."""
    return os.environ.get(REPRODUCIBLE_NOISE_ENV, "").strip() == "1"


def noise_generator(rng_if_reproducible: np.random.Generator, reproducible: bool | None) -> RandomSource:
    """The generator for DP noise: the task's own (reproducible) one, or a fresh secure one."""
    if reproducible is None:
        reproducible = reproducible_noise_enabled()
    return rng_if_reproducible if reproducible else secure_generator()


def _accountant(spec: StudySpec) -> AccountantKind:
    assert spec.privacy is not None
    return AccountantKind(spec.privacy.accountant.value)


def is_site_mode(spec: StudySpec) -> bool:
    return spec.privacy is not None and spec.privacy.mode is not DpMode.RECORD


def sample_rate(spec: StudySpec, site: str) -> float:
    """The Poisson sampling rate of DP-SGD at ``site`` (record mode)."""
    privacy = spec.privacy
    if privacy is None or privacy.mode is not DpMode.RECORD:
        raise InputError("only record-level DP (DP-SGD) has a sampling rate")
    rates = privacy.site_sample_rates or {}
    if site in rates:
        return rates[site]
    if privacy.sample_rate is None:
        raise InputError(f"the study gives no DP-SGD sampling rate for site {site!r}")
    return privacy.sample_rate


@functools.lru_cache(maxsize=1024)
def _calibrated(target: float, delta: float, rate: float, steps: int, accountant: AccountantKind) -> float:
    # Each call costs a few accountant runs (0.1-0.5 s each); the same spec is asked about every round.
    return calibrate_noise(target, delta, rate, steps, accountant)


def noise_multiplier(spec: StudySpec, site: str | None = None) -> float:
    """The study's noise multiplier (at ``site``, in record mode): the spec's, or calibrated from its target.

    Site modes: the multiplier of the noise on the sum, relative to the clip norm (the site-level one).
    Raises :class:`~fedhealth.privacy.CalibrationError` when no multiplier reaches the target.
    """
    privacy = spec.privacy
    if privacy is None:
        raise InputError("the study has no differential privacy")
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    assert privacy.target_epsilon is not None  # PrivacySpec's validator
    if privacy.mode is DpMode.RECORD:
        if site is None:
            raise InputError("record-level noise is calibrated per site: name the site")
        assert privacy.steps_per_round is not None
        steps = privacy.steps_per_round * spec.rounds
        return _calibrated(
            privacy.target_epsilon, privacy.delta, sample_rate(spec, site), steps, _accountant(spec)
        )
    # The site's ledger pays sigma / 2 per round (record level); calibrate that, then double it.
    return 2.0 * _calibrated(privacy.target_epsilon, privacy.delta, 1.0, spec.rounds, _accountant(spec))


def fewest_contributors(spec: StudySpec) -> int:
    """The fewest training sites whose sum may be released: the quorum, and under secure aggregation also
    its unmasking threshold (an orchestrator can unmask a sum over any ``threshold`` surviving sites, even
    below the quorum it is meant to wait for). Site-distributed noise shares are calibrated on this."""
    fewest = spec.min_sites
    if spec.secure_aggregation is not None:
        # the spec refuses a threshold below the quorum, so this is the quorum; kept as a second lock
        fewest = min(fewest, secure_round_plan(spec, TaskKind.TRAIN).threshold)
    return fewest


def site_update_dp(spec: StudySpec) -> SiteUpdateDp:
    """Site modes: the clip norm, noise multiplier and the fewest contributors of the study's site-level
    mechanism (each distributed share is calibrated so that that many shares carry the whole noise)."""
    privacy = spec.privacy
    if privacy is None or privacy.mode is DpMode.RECORD:
        raise InputError("only site-level DP clips and noises whole updates")
    mode = NoiseMode.CENTRAL if privacy.mode is DpMode.SITE_CENTRAL else NoiseMode.DISTRIBUTED
    return SiteUpdateDp(
        clip_norm=privacy.max_grad_norm,
        noise_multiplier=noise_multiplier(spec),
        mode=mode,
        num_sites=len(spec.train_sites),
        min_quorum=fewest_contributors(spec),
    )


def model_size(spec: StudySpec) -> int:
    """How many numbers one update holds (the model's parameters)."""
    return sum(s.numel for s in study_recipe(spec.recipe).param_specs())


def distributed_clip_room(spec: StudySpec) -> tuple[float, float]:
    """Site-distributed mode: the smallest ``update_clip`` that keeps the chance of the codec clipping any
    noisy coordinate, over the whole study, within ``CLIP_TAIL_SHARE_OF_DELTA`` of delta; and the number of
    standard deviations of a noise share that room holds. A coordinate of a clipped update is at most the
    clip norm C, so it is clipped only if its noise exceeds ``update_clip - C``."""
    privacy = spec.privacy
    assert privacy is not None
    dp = site_update_dp(spec)
    values = model_size(spec) * len(spec.train_sites) * spec.rounds
    stds = clip_headroom_stds(values, CLIP_TAIL_SHARE_OF_DELTA * privacy.delta)
    return dp.clip_norm + stds * dp.site_noise_std, stds


def round_release(spec: StudySpec, site: str) -> DpRelease:
    """What one training round at ``site`` releases about the site's patients."""
    privacy = spec.privacy
    if privacy is None:
        raise InputError("the study has no differential privacy")
    if privacy.mode is DpMode.RECORD:
        assert privacy.steps_per_round is not None
        return DpSgdRelease(
            noise_multiplier=noise_multiplier(spec, site),
            sample_rate=sample_rate(spec, site),
            steps=privacy.steps_per_round,
        )
    return site_update_dp(spec).record_level_release(1)


def task_plan(spec: StudySpec, kind: TaskKind, site: str) -> DpPlan:
    """The releases a task declares to the site's ledger: one round's for training, none for evaluation;
    for a collective session, what its recipe declares (``session_dp``), else nothing."""
    if kind is TaskKind.COLLECTIVE:
        plan = session_plan(spec)
        return DpPlan() if plan is None else plan
    if spec.privacy is None or kind is not TaskKind.TRAIN:
        return DpPlan()
    return DpPlan.of(round_release(spec, site))


def session_plan(spec: StudySpec) -> DpPlan | None:
    """A collective study: what one session releases about a site's records under its recipe's own noise
    (an empty plan: no noise, epsilon infinite), or None when the recipe declares no session DP."""
    try:
        return study_recipe(spec.recipe).session_dp_plan()
    except (CalibrationError, DpParameterError) as exc:
        raise InputError(f"recipe.params: {exc}") from exc


def study_plan(spec: StudySpec, site: str) -> DpPlan:
    """Every release of the whole study at ``site`` (all rounds)."""
    return DpPlan(releases=tuple(round_release(spec, site) for _ in range(spec.rounds)))


def planned_epsilon(spec: StudySpec, site: str) -> float:
    """The record-level epsilon the whole study costs ``site``, at the spec's delta and accountant."""
    assert spec.privacy is not None
    return epsilon(study_plan(spec, site), delta=spec.privacy.delta, accountant=_accountant(spec))


def site_level_epsilon(spec: StudySpec, rounds: int | None = None) -> float | None:
    """Site modes: the guarantee for a whole site's participation (adding or removing its updates) over the
    study's rounds, or its first ``rounds``, at the spec's delta."""
    if not is_site_mode(spec):
        return None
    assert spec.privacy is not None
    release = site_update_dp(spec).site_level_release(spec.rounds if rounds is None else rounds)
    return epsilon(release, delta=spec.privacy.delta, accountant=_accountant(spec))


def check_privacy(spec: StudySpec) -> None:
    """Refuse a privacy spec the services cannot honour, with the reason (:class:`InputError`).

    Run by the orchestrator before a study is stored and by every site before it reserves budget; it
    calibrates the noise for every training site, so an unreachable target is refused here.
    """
    privacy = spec.privacy
    if privacy is None:
        return
    if privacy.noise_multiplier is not None and privacy.target_epsilon is not None:
        raise InputError("privacy: give noise_multiplier or target_epsilon, not both")
    if privacy.noise_multiplier == 0 and privacy.mode is not DpMode.RECORD:
        raise InputError("privacy: site-level DP needs a positive noise_multiplier")
    # The recipe says which DP it implements (and whether these params allow it): a RecipeError of an
    # unknown recipe or bad params propagates as it is, it is not a privacy problem.
    problem = study_recipe(spec.recipe).dp_problem(
        DpLevel.RECORD if privacy.mode is DpMode.RECORD else DpLevel.SITE
    )
    if problem is not None:
        raise InputError(f"privacy: {problem}")
    if privacy.mode is DpMode.RECORD:
        unknown = sorted(set(privacy.site_sample_rates or {}) - set(spec.train_sites))
        if unknown:
            raise InputError(
                f"privacy: site_sample_rates names sites that do not train: {', '.join(unknown)}"
            )
        missing = [s for s in spec.train_sites if s not in (privacy.site_sample_rates or {})]
        if missing and privacy.sample_rate is None:
            raise InputError(f"privacy: no sampling rate for {', '.join(missing)} (set sample_rate)")
    else:
        if privacy.site_sample_rates:
            raise InputError("privacy: site_sample_rates apply to record-level DP only")
        if privacy.mode is DpMode.SITE_DISTRIBUTED and spec.secure_aggregation is None:
            raise InputError(
                "privacy: site-distributed noise protects only the sum; without secure aggregation the "
                "orchestrator would see each site's update with a fraction of the noise"
            )

    try:
        for site in spec.train_sites if privacy.mode is DpMode.RECORD else spec.train_sites[:1]:
            round_release(spec, site)
        if privacy.mode is DpMode.SITE_DISTRIBUTED:
            assert spec.secure_aggregation is not None
            room, stds = distributed_clip_room(spec)
            clip = spec.secure_aggregation.update_clip
            if clip < room:
                values = model_size(spec) * len(spec.train_sites) * spec.rounds
                raise InputError(
                    f"privacy: secure_aggregation.update_clip {clip:g} could clip the noisy updates; it must "
                    f"be at least {room:.4g}: the clip norm plus {stds:.3g} standard deviations of a site's "
                    f"noise share, so that none of the {values} noisy values of the study "
                    f"({model_size(spec)} parameters x {len(spec.train_sites)} sites x {spec.rounds} rounds) "
                    "is clipped except "
                    f"with probability {CLIP_TAIL_SHARE_OF_DELTA * privacy.delta:.3g} (1 % of delta)"
                )
    except (CalibrationError, DpParameterError) as exc:
        raise InputError(f"privacy: {exc}") from exc


# --- noise where it belongs --------------------------------------------------------------------------------


def privatize_update(spec: StudySpec, delta: Mapping[str, np.ndarray], rng: RandomSource) -> Params:
    """Site modes, at the site: the update clipped to ``max_grad_norm`` plus, in distributed mode, the
    site's share of the noise (float32, as uploaded)."""
    # Noise is drawn tensor by tensor: a fixed (sorted) order makes a reproducible run independent of the
    # order in which the tensors arrived.
    ordered = {k: np.asarray(delta[k]) for k in sorted(delta)}
    private = site_update_dp(spec).privatize(ordered, rng)
    return {k: np.asarray(v, dtype=np.float32) for k, v in private.items()}


def private_mean(
    spec: StudySpec, updates: Sequence[tuple[int, Mapping[str, np.ndarray]]], rng: RandomSource
) -> Params:
    """Site modes, at the orchestrator: the unweighted mean of the updates, with the central noise
    ``N(0, sigma^2 C^2)`` added to their sum in central mode.

    Every site weighs the same, so one site moves the sum by at most the clip norm; the sample counts would
    otherwise scale a site's influence. In central mode the updates are clipped again here: it costs
    nothing and keeps the bound even if a site sent an unclipped update. In distributed mode they carry
    their noise shares, which must be summed untouched (secure aggregation sums them the same way). The
    division by the number of contributors is post-processing.
    """
    if not updates:
        raise InputError("no update to average")
    dp = site_update_dp(spec)
    total: dict[str, np.ndarray] = {}
    for _, update in updates:
        values: dict[str, np.ndarray] = {k: np.asarray(update[k], np.float64) for k in sorted(update)}
        if dp.mode is NoiseMode.CENTRAL:
            values = dp.clip(values)[0]
        for k, v in values.items():
            total[k] = total[k] + v if k in total else v.copy()
    if dp.mode is NoiseMode.CENTRAL:
        total = dp.central_noise(total, rng)
    return {k: v / len(updates) for k, v in total.items()}


def central_noise_on_mean(
    spec: StudySpec, mean_delta: Mapping[str, np.ndarray], contributors: int, rng: RandomSource
) -> Params:
    """Site-central mode under secure aggregation: the orchestrator learns only the (unweighted) mean, so
    it adds the central noise to the sum the mean came from, then divides again."""
    dp = site_update_dp(spec)
    total = {k: np.asarray(mean_delta[k], np.float64) * contributors for k in sorted(mean_delta)}
    noisy = dp.central_noise(total, rng)
    return {k: (v / contributors).astype(np.float32) for k, v in noisy.items()}


def privacy_summary(spec: StudySpec) -> dict[str, Any] | None:
    """The study's planned privacy as plain JSON: mode, noise, per-site record-level epsilon."""
    privacy = spec.privacy
    if privacy is None:
        return None
    out: dict[str, Any] = {
        "mode": privacy.mode.value,
        "delta": privacy.delta,
        "accountant": privacy.accountant.value,
        "target_epsilon": privacy.target_epsilon,
        "max_grad_norm": privacy.max_grad_norm,
    }
    if privacy.mode is DpMode.RECORD:
        out["steps_per_round"] = privacy.steps_per_round
        out["sites"] = {
            site: {
                "noise_multiplier": noise_multiplier(spec, site),
                "sample_rate": sample_rate(spec, site),
                "planned_epsilon": _finite(planned_epsilon(spec, site)),
            }
            for site in sorted(spec.train_sites)
        }
    else:
        sigma = noise_multiplier(spec)
        record = planned_epsilon(spec, spec.train_sites[0])
        out["noise_multiplier"] = sigma
        out["site_level_epsilon"] = _finite(site_level_epsilon(spec))
        out["sites"] = {
            site: {"noise_multiplier": sigma, "planned_epsilon": _finite(record)}
            for site in sorted(spec.train_sites)
        }
    return out


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
