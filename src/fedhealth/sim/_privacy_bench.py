"""Fed-Heart-Disease with record-level differential privacy, through the real orchestrator and agents.

Every (epsilon, delta) preset of ``fedhealth.learning.HEART_DISEASE_DP_PRESETS`` and every seed is one
study of DP-SGD FedAvg over the four hospitals, run by real agents over HTTPS. Accounting is the services'
own: each site's ledger holds a budget for the study's dataset and reserves, commits and attests every
round; the figure reported per site is the study's epsilon its ledger attested (at the budget's delta,
PLD), and the budget is the target itself, so a site would refuse a study that exceeded it.

Each study gets a dataset name of its own at every site (one budget per study, all on the same
hospital data): the ledger composes every study on one dataset, and five seeds of eight targets on one
budget would be refused after the first few, as they should. "no DP" is the same recipe with noise
multiplier 0 (clipping and sampling kept) on a dataset without a budget, which is the only place a site
runs a study without noise.

The agents run with ``FEDHEALTH_REPRODUCIBLE_NOISE=1``, so the noise is drawn from ``task_rng(seed, round,
site)`` as in ``benchmarks/dp_heart_disease_inprocess.py``: every final model is compared, bit for bit,
with :func:`fedhealth.runtime.run_study_in_memory` (and the in-process benchmark's loop equals it). The
noise has the same distribution either way; only its seed is public, which is fine for a benchmark and
never for a hospital (see docs/privacy.md).
"""

from __future__ import annotations

import io
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.core import decode_tensors, write_private_file
from fedhealth.data import open_dataset
from fedhealth.learning import HEART_DISEASE_DP_PRESETS, LOGREG_RECIPE, DpPreset, LogRegParams
from fedhealth.protocol import (
    AccountantName,
    DpMode,
    PrivacySpec,
    StudyPrivacyInfo,
    StudySpec,
    StudyStatus,
)
from fedhealth.runtime import (
    REPRODUCIBLE_NOISE_ENV,
    noise_multiplier,
    recipe_spec,
    run_study_in_memory,
    strategy_spec,
)
from fedhealth.sim._bench import HEART_DISEASE_CENTERS
from fedhealth.sim._federation import FederationError, LocalFederation

# FLamby (Terrail et al. 2022), Fed-Heart-Disease with DP-SGD, delta 1e-3: mean client accuracy at its
# *nominal* epsilon (its schedule makes epsilon 1 really 1.5 to 4.4 once every step is accounted).
FLAMBY_DP_HEART_DISEASE: tuple[tuple[float, float], ...] = (
    (0.1, 0.629),
    (1.0, 0.702),
    (5.0, 0.700),
    (10.0, 0.698),
)
FLAMBY_NO_DP_HEART_DISEASE = 0.7125
NO_DP_DATASET = "heart-disease"


def dp_preset_study(preset: DpPreset, *, noise_multiplier: float | None = None, **fields: Any) -> StudySpec:
    """The study spec running a DP preset: DP-SGD logreg at the preset's target epsilon (noise calibrated by
    the services), or at ``noise_multiplier`` when given (0: the no-DP baseline of the same recipe).
    ``fields`` give the rest (name, dataset, sites, seed...)."""
    privacy = PrivacySpec(
        mode=DpMode.RECORD,
        delta=preset.delta,
        target_epsilon=preset.target_epsilon if noise_multiplier is None else None,
        noise_multiplier=noise_multiplier,
        max_grad_norm=preset.max_grad_norm,
        sample_rate=preset.sample_rate,
        steps_per_round=preset.local_steps,
        accountant=AccountantName(preset.accountant.value),
    )
    recipe = recipe_spec(
        LOGREG_RECIPE,
        LogRegParams(
            n_features=preset.n_features,
            local_steps=preset.local_steps,
            learning_rate=preset.learning_rate,
            l2=preset.l2,
        ),
    )
    return StudySpec.model_validate(
        {
            "recipe": recipe,
            "strategy": strategy_spec(preset.strategy),
            "rounds": preset.rounds,
            "privacy": privacy,
            **fields,
        }
    )


def study_dataset(target_epsilon: float, delta: float, seed: int) -> str:
    """The dataset name one benchmark study uses at every site (one budget per study)."""
    return f"hd-e{target_epsilon:g}-d{delta:g}-s{seed}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyResult:
    """One row: a privacy target (None: no DP) over all seeds."""

    target_epsilon: float | None
    delta: float | None
    noise_multiplier: float
    accuracies: tuple[float, ...]  # mean over the 4 centers' test sets, one per seed
    per_center: tuple[float, ...]  # mean over seeds, one per center
    site_epsilons: dict[str, float]  # each site's attested study epsilon (max over seeds)
    bit_identical: bool  # every final model equals run_study_in_memory's

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    @property
    def max_site_epsilon(self) -> float | None:
        return max(self.site_epsilons.values()) if self.site_epsilons else None


def _privacy_info(fed: LocalFederation, study_id: str) -> StudyPrivacyInfo:
    response = fed.operator.request("GET", f"/api/v1/studies/{study_id}/privacy")
    return StudyPrivacyInfo.model_validate(response.json())


def benchmark_privacy(
    *,
    seeds: int = 5,
    epsilons: Sequence[float] | None = None,
    deltas: Sequence[float] | None = None,
    no_dp: bool = True,
    data_dir: Path | None = None,
    workdir: Path | None = None,
    on_result: Callable[[str, int, float], None] | None = None,
) -> list[PrivacyResult]:
    """Every target (epsilon x delta) and seed as a study through a real federation of the four hospitals."""

    targets = [
        key
        for key in sorted(HEART_DISEASE_DP_PRESETS, key=lambda k: (-k[1], k[0]))
        if (epsilons is None or key[0] in epsilons) and (deltas is None or key[1] in deltas)
    ]
    if not targets:
        raise FederationError("no DP preset matches the requested epsilons and deltas")
    env = {REPRODUCIBLE_NOISE_ENV: "1"}
    if data_dir is not None:
        env["FEDHEALTH_DATA_DIR"] = str(data_dir)
    uris = {name: f"builtin://heart-disease/{k}" for k, name in enumerate(HEART_DISEASE_CENTERS)}
    local = {name: open_dataset(uri, data_dir) for name, uri in uris.items()}
    results: list[PrivacyResult] = []
    with tempfile.TemporaryDirectory(prefix="fedhealth-dp-") as tmp:
        root = workdir or Path(tmp)
        with LocalFederation(root, log_level="warning", env=env) as fed:
            fed.start_orchestrator()
            for site, uri in uris.items():
                fed.add_site(site)
                datasets = {NO_DP_DATASET: uri}
                for eps, delta in targets:
                    for seed in range(seeds):
                        name = study_dataset(eps, delta, seed)
                        datasets[name] = uri
                        fed.set_budget(site, name, eps, delta)
                fed.start_agent(site, datasets)
            fed.wait_for_sites(list(uris))

            def run(spec: StudySpec, label: str, seed: int) -> tuple[list[float], dict[str, float], bool]:
                final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=900, interval=0.2)
                if final.status is not StudyStatus.COMPLETED or final.reason:
                    raise FederationError(f"{label} seed {seed}: {final.status.value}: {final.reason}")
                per_site = fed.report(final.study_id)["evaluation"]["per_site"]
                row = [per_site[c]["accuracy"] for c in HEART_DISEASE_CENTERS]
                spent = {
                    s.site: s.spent.study_epsilon
                    for s in _privacy_info(fed, final.study_id).sites
                    if s.spent is not None
                }
                model, _ = decode_tensors(fed.model_bytes(final.study_id))
                reference = run_study_in_memory(spec, local).params
                same = all(np.array_equal(model[k], reference[k]) for k in reference)
                if on_result is not None:
                    on_result(label, seed, statistics.fmean(row))
                return row, spent, same

            rows: list[tuple[float | None, float | None, Any, float]] = [
                (eps, delta, HEART_DISEASE_DP_PRESETS[(eps, delta)], -1.0) for eps, delta in targets
            ]
            if no_dp:
                rows.append((None, None, HEART_DISEASE_DP_PRESETS[targets[0]], 0.0))
            for target, target_delta, preset, fixed in rows:
                accs: list[list[float]] = []
                epsilons_seen: dict[str, float] = {}
                identical = True
                for seed in range(seeds):
                    label = f"eps {target:g} delta {target_delta:g}" if target is not None else "no DP"
                    spec = dp_preset_study(
                        preset,
                        noise_multiplier=None if fixed < 0 else fixed,
                        name=f"dp-{'none' if target is None else f'{target:g}-{target_delta:g}'}-{seed}",
                        dataset=study_dataset(target, target_delta, seed)
                        if target is not None and target_delta is not None
                        else NO_DP_DATASET,
                        train_sites=list(HEART_DISEASE_CENTERS),
                        min_sites=len(HEART_DISEASE_CENTERS),
                        round_deadline_s=120.0,
                        seed=seed,
                    )
                    row, spent, same = run(spec, label, seed)
                    accs.append(row)
                    identical &= same
                    for site, value in spent.items():
                        epsilons_seen[site] = max(value, epsilons_seen.get(site, 0.0))
                sigma = noise_multiplier(spec, HEART_DISEASE_CENTERS[0])
                results.append(
                    PrivacyResult(
                        target_epsilon=target,
                        delta=target_delta,
                        noise_multiplier=sigma,
                        accuracies=tuple(statistics.fmean(r) for r in accs),
                        per_center=tuple(statistics.fmean(col) for col in zip(*accs, strict=True)),
                        site_epsilons=epsilons_seen,
                        bit_identical=identical,
                    )
                )
    return results


def plot_privacy(results: Sequence[PrivacyResult], path: Path, *, title: str | None = None) -> Path:
    """Mean client accuracy against each site's accounted epsilon, one line per delta, beside FLamby's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    deltas = sorted({r.delta for r in results if r.delta is not None}, reverse=True)
    for delta, marker, shift in zip(deltas, ("o", "s", "^", "D"), (0.97, 1.03, 1.0, 1.0), strict=False):
        rows = sorted((r for r in results if r.delta == delta), key=lambda r: r.target_epsilon or 0.0)
        ax.errorbar(
            [(r.max_site_epsilon or 0.0) * shift for r in rows],
            [r.mean for r in rows],
            yerr=[r.std for r in rows],
            marker=marker,
            capsize=3,
            label=f"fedhealth services, δ = {delta:g} (each site's ledger ε, mean ± std over seeds)",
        )
    baseline = next((r for r in results if r.target_epsilon is None), None)
    if baseline is not None:
        ax.axhline(baseline.mean, color="0.3", linewidth=1, label="fedhealth, same recipe, no DP")
    ax.axhline(FLAMBY_NO_DP_HEART_DISEASE, color="tab:red", linestyle=":", linewidth=1, label="FLamby, no DP")
    ax.plot(
        [e for e, _ in FLAMBY_DP_HEART_DISEASE],
        [a for _, a in FLAMBY_DP_HEART_DISEASE],
        "x--",
        color="tab:red",
        label="FLamby DP, δ = 1e-3 (nominal ε, under-accounted)",
    )
    ax.set_xscale("log")
    ax.set_xlabel("ε (record level, per site, accounted by the site's ledger)")
    ax.set_ylabel("mean client test accuracy")
    ax.set_title(title or "Fed-Heart-Disease through the services: accuracy vs privacy")
    ax.set_ylim(0.6, 0.78)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_private_file(path, image.getvalue())  # never through a link another account planted there
    return path
