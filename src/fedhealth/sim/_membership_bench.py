"""The privacy benchmark: membership-inference attacks on the models fedhealth releases at each privacy
setting, beside the epsilon that the sites' ledgers accounted (``fedhealth benchmark membership``).

Setup (LiRA's, Carlini et al. 2022): each site's pool is all its rows, training and test alike (one
distribution per site). ``models`` federations are trained, each with every site training on a random half
of its own pool (drawn from ``seed``) and the rest held out, through :func:`run_study_in_memory`, the
runtime the services run, with the very spec the services would run (DP-SGD noise drawn as an agent with
``FEDHEALTH_REPRODUCIBLE_NOISE=1`` draws it). Every model in turn is the target and the others its shadow
models; the target's members are the rows its sites trained on, its non-members the held-out halves, so
there are as many of each and both come from the same distribution. Scores are pooled over the targets
(LiRA's scores are likelihood ratios, comparable across targets), and AUC and TPR at 1 % FPR computed on
the pool. Attacks: the loss threshold (Yeom et al.) and LiRA online and offline (``fedhealth.privacy``),
each from one query per record (no augmented queries).

Each model trains on half of each site's rows, so the benchmark attacks models trained on half the data of
the federation's real release: more exposed per record, if anything. The accounted epsilon does not depend
on the rows: each site's ledger (a real :class:`~fedhealth.privacy.BudgetLedger` per site, PLD, its budget
the target itself) reserves and commits each training round's release exactly as an agent does, and the
figure is the largest site's study epsilon at the spec's delta.

Datasets and the releases attacked:
- ``heart-disease`` (Fed-Heart-Disease, 4 centers, logistic regression): DP-SGD FedAvg with the frozen recipe
  of ``HEART_DISEASE_DP_PRESETS`` (15 rounds x 1 step, q 0.2, clip 1, learning rate 0.03, delta 1e-5) at
  each target epsilon; the same recipe without noise; and without DP the ``fedavg`` preset (15 rounds x 100
  SGD steps), the model the benchmarks release without DP.
- ``breastmnist`` (4 sites, the ``torch`` recipe's small CNN): DP-SGD as docs/benchmarks.md runs it
  (GroupNorm, SGD 0.1, q 0.1, 10 steps per round, clip 1, delta 1e-4) for ``breastmnist_dp_rounds`` rounds
  (the noise calibrated for them), and without DP ``BREASTMNIST_PARAMS`` (Adam, BatchNorm, flips) for
  ``breastmnist_rounds``.
"""

from __future__ import annotations

import io
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from fedhealth.core import write_private_file
from fedhealth.data import TabularDataset, breastmnist_federation, load_heart_disease
from fedhealth.learning import (
    BREASTMNIST_PARAMS,
    BREASTMNIST_ROUNDS,
    HEART_DISEASE_DP_PRESETS,
    HEART_DISEASE_PRESETS,
    TorchParams,
    logreg_predict_proba,
    torch_predict_proba,
    torch_threads,
)
from fedhealth.privacy import (
    AccountantKind,
    AttackFigures,
    BudgetLedger,
    MembershipAttack,
    MembershipMeasurement,
    MembershipReport,
    attack_figures,
    cross_entropy_of_confidence,
    lira_scores,
    logit_confidence,
    loss_attack_scores,
    roc_auc,
    sqlite_engine,
)
from fedhealth.protocol import PrivacySpec, RecipeSpec, StrategySpec, StudySpec, TaskKind
from fedhealth.runtime import preset_study, run_study_in_memory, task_plan
from fedhealth.sim._bench import HEART_DISEASE_CENTERS
from fedhealth.sim._privacy_bench import dp_preset_study

DEFAULT_EPSILONS: tuple[float, ...] = (1.0, 4.0, 8.0)
HEART_DISEASE_DELTA = 1e-5
BREASTMNIST_DELTA = 1e-4
BREASTMNIST_SITES = ("site-0", "site-1", "site-2", "site-3")
# The DP-SGD recipe of docs/benchmarks.md's BreastMNIST table (benchmarks/imaging_breastmnist.py defaults)
BREASTMNIST_DP_PARAMS = TorchParams(
    **{**BREASTMNIST_PARAMS.model_dump(), "norm": "group", "optimizer": "sgd", "learning_rate": 0.1}
)
BREASTMNIST_DP_SAMPLE_RATE = 0.1
BREASTMNIST_DP_STEPS = 10


class MembershipDataset(StrEnum):
    HEART_DISEASE = "heart-disease"
    BREASTMNIST = "breastmnist"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Pool:
    """Each site's rows (training and test parts together) and how to read a model's P(label 1)."""

    sites: tuple[tuple[str, np.ndarray, np.ndarray], ...]
    feature_names: tuple[str, ...]
    predict: Callable[[StudySpec, dict[str, np.ndarray], np.ndarray], np.ndarray]

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([y for _, _, y in self.sites])


@dataclass(frozen=True, slots=True, kw_only=True)
class _Setting:
    label: str
    target_epsilon: float | None
    delta: float | None  # None: no DP
    spec: Callable[[list[str], int], StudySpec]  # (training sites, study seed) -> the study


@dataclass(frozen=True, slots=True, kw_only=True)
class SettingResult:
    """One privacy setting of one dataset: the accounted epsilon and each attack's figures."""

    dataset: MembershipDataset
    setting: str
    target_epsilon: float | None
    epsilon: float | None
    delta: float | None
    attacks: dict[MembershipAttack, AttackFigures]
    test_auc: float  # the models' task AUC on their held-out rows, mean over models
    seconds: float
    models: int
    rounds: int


def _pooled_rows(
    sites: Sequence[tuple[str, TabularDataset]],
) -> tuple[tuple[str, np.ndarray, np.ndarray], ...]:
    return tuple(
        (name, np.vstack([d.X_train, d.X_test]), np.concatenate([d.y_train, d.y_test])) for name, d in sites
    )


def _logreg_p1(spec: StudySpec, model: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    return logreg_predict_proba(model, X)


def _torch_p1(spec: StudySpec, model: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    return torch_predict_proba(TorchParams.model_validate(spec.recipe.params), model, X)


def heart_disease_pool(data_dir: Path | None) -> _Pool:
    sites = [(name, load_heart_disease(k, data_dir)) for k, name in enumerate(HEART_DISEASE_CENTERS)]
    return _Pool(sites=_pooled_rows(sites), feature_names=sites[0][1].feature_names, predict=_logreg_p1)


def breastmnist_pool(data_dir: Path | None) -> _Pool:
    sites = list(zip(BREASTMNIST_SITES, breastmnist_federation(4, 0, data_dir), strict=True))
    return _Pool(sites=_pooled_rows(sites), feature_names=sites[0][1].feature_names, predict=_torch_p1)


def heart_disease_settings(epsilons: Sequence[float]) -> list[_Setting]:
    base = HEART_DISEASE_DP_PRESETS[(1.0, HEART_DISEASE_DELTA)]

    def common(sites: list[str], seed: int, label: str) -> dict[str, Any]:
        return {
            "name": f"membership-hd-{label}",
            "dataset": "heart-disease",
            "train_sites": sites,
            "seed": seed,
        }

    def at(eps: float) -> Callable[[list[str], int], StudySpec]:
        preset = replace(base, target_epsilon=eps)  # the noise is calibrated from the target by the spec
        return lambda sites, seed: dp_preset_study(preset, **common(sites, seed, f"e{eps:g}"))

    settings = [
        _Setting(label="DP-SGD FedAvg", target_epsilon=eps, delta=HEART_DISEASE_DELTA, spec=at(eps))
        for eps in sorted(epsilons)
    ]
    settings.append(
        _Setting(
            label="DP-SGD recipe, noise 0",
            target_epsilon=None,
            delta=None,
            spec=lambda sites, seed: dp_preset_study(
                base, noise_multiplier=0.0, **common(sites, seed, "nonoise")
            ),
        )
    )
    settings.append(
        _Setting(
            label="FedAvg preset (no DP)",
            target_epsilon=None,
            delta=None,
            spec=lambda sites, seed: preset_study(
                HEART_DISEASE_PRESETS["fedavg"], **common(sites, seed, "fedavg")
            ),
        )
    )
    return settings


def _breastmnist_spec(
    params: TorchParams, rounds: int, privacy: PrivacySpec | None, sites: list[str], seed: int, label: str
) -> StudySpec:
    return StudySpec(
        name=f"membership-bm-{label}",
        dataset="breastmnist",
        recipe=RecipeSpec(name="torch", params=params.model_dump(mode="json")),
        strategy=StrategySpec(name="fedavg"),
        rounds=rounds,
        train_sites=sites,
        seed=seed,
        privacy=privacy,
    )


def breastmnist_settings(epsilons: Sequence[float], rounds: int, dp_rounds: int) -> list[_Setting]:
    def dp(eps: float) -> PrivacySpec:
        return PrivacySpec(
            delta=BREASTMNIST_DELTA,
            target_epsilon=eps,
            max_grad_norm=1.0,
            sample_rate=BREASTMNIST_DP_SAMPLE_RATE,
            steps_per_round=BREASTMNIST_DP_STEPS,
        )

    def at(eps: float) -> Callable[[list[str], int], StudySpec]:
        return lambda sites, seed: _breastmnist_spec(
            BREASTMNIST_DP_PARAMS, dp_rounds, dp(eps), sites, seed, f"e{eps:g}"
        )

    settings = [
        _Setting(label="DP-SGD FedAvg", target_epsilon=eps, delta=BREASTMNIST_DELTA, spec=at(eps))
        for eps in sorted(epsilons)
    ]
    settings.append(
        _Setting(
            label="FedAvg (no DP)",
            target_epsilon=None,
            delta=None,
            spec=lambda sites, seed: _breastmnist_spec(BREASTMNIST_PARAMS, rounds, None, sites, seed, "nodp"),
        )
    )
    return settings


def accounted_epsilon(spec: StudySpec) -> float | None:
    """The study's record-level epsilon as the sites' ledgers account it (the largest site's), or None
    without noise. Each site's ledger, its budget the target, reserves and commits every training round's
    release as an agent does; a release beyond the target would be refused here."""
    privacy = spec.privacy
    if privacy is None or privacy.noise_multiplier == 0:
        return None
    budget = privacy.target_epsilon if privacy.target_epsilon is not None else 1e6
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="fedhealth-membership-") as folder:
        for site in spec.train_sites:
            engine = sqlite_engine(Path(folder) / f"{site}.sqlite")
            try:
                BudgetLedger.create_schema(engine)
                ledger = BudgetLedger(engine, accountant=AccountantKind(privacy.accountant.value))
                ledger.set_budget(spec.dataset, budget, privacy.delta)
                for number in range(1, spec.rounds + 1):
                    plan = task_plan(spec, TaskKind.TRAIN, site)
                    reservation = ledger.reserve(spec.dataset, spec.name, f"round-{number}", plan)
                    ledger.commit(reservation, plan)
                worst = max(worst, ledger.study_epsilon(spec.dataset, spec.name, delta=privacy.delta))
            finally:
                engine.dispose()
    return worst


def _halves(pool: _Pool, models: int, seed: int) -> np.ndarray:
    """``inside[j, i]``: whether model ``j``'s site trains on pool row ``i`` (half of each site's rows)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4D49]))
    parts = []
    for _, _, y in pool.sites:
        n = y.size
        part = np.zeros((models, n), dtype=bool)
        for j in range(models):
            part[j, rng.permutation(n)[: n // 2]] = True
        parts.append(part)
    return np.concatenate(parts, axis=1)


def _train(pool: _Pool, spec: StudySpec, inside: np.ndarray) -> np.ndarray:
    """Train one federation on the rows ``inside`` marks; its logit-scaled confidence on every pool row."""
    datasets: dict[str, TabularDataset | None] = {}
    offset = 0
    for name, X, y in pool.sites:
        keep = inside[offset : offset + y.size]
        offset += y.size
        datasets[name] = TabularDataset(
            name=name,
            X_train=X[keep],
            y_train=y[keep],
            X_test=X[~keep],
            y_test=y[~keep],
            feature_names=pool.feature_names,
        )
    model = run_study_in_memory(spec, datasets).params
    X_all = np.vstack([X for _, X, _ in pool.sites])
    p1 = pool.predict(spec, model, X_all)
    return logit_confidence(np.where(pool.labels == 1, p1, 1.0 - p1))


def attack_setting(
    conf: np.ndarray, inside: np.ndarray, labels: np.ndarray
) -> tuple[dict[MembershipAttack, AttackFigures], float]:
    """Every model in turn the target, the others its shadows; each attack's figures over the pooled
    targets, and the models' mean task AUC on their held-out rows."""
    models = conf.shape[0]
    scores: dict[MembershipAttack, list[np.ndarray]] = {a: [] for a in MembershipAttack}
    members, test_aucs = [], []
    for t in range(models):
        shadows = np.arange(models) != t
        scores[MembershipAttack.LOSS].append(loss_attack_scores(cross_entropy_of_confidence(conf[t])))
        for attack in (MembershipAttack.LIRA_ONLINE, MembershipAttack.LIRA_OFFLINE):
            scores[attack].append(lira_scores(conf[t], conf[shadows], inside[shadows], attack=attack))
        members.append(inside[t])
        out = ~inside[t]
        logit1 = np.where(labels == 1, conf[t], -conf[t])  # the model's log-odds of label 1
        test_aucs.append(roc_auc(logit1[out], labels[out] == 1))
    is_member = np.concatenate(members)
    figures = {a: attack_figures(np.concatenate(s), is_member) for a, s in scores.items()}
    return figures, float(np.mean(test_aucs))


def benchmark_membership(
    *,
    datasets: Sequence[MembershipDataset] = tuple(MembershipDataset),
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    models: int = 8,
    breastmnist_models: int | None = None,
    breastmnist_rounds: int = BREASTMNIST_ROUNDS,
    breastmnist_dp_rounds: int = BREASTMNIST_ROUNDS,
    seed: int = 0,
    data_dir: Path | None = None,
    on_step: Callable[[str], object] = lambda _: None,
) -> list[SettingResult]:
    """Every dataset's settings: ``models`` federations each (``breastmnist_models`` for BreastMNIST, whose
    models cost far more), attacked (see the module docstring). BreastMNIST trains ``breastmnist_rounds``
    rounds without DP and ``breastmnist_dp_rounds`` with DP-SGD (each accounted for its own rounds)."""
    if min(models, breastmnist_models or models) < 3:
        raise ValueError("LiRA needs at least 3 models (a target and two shadows)")
    results: list[SettingResult] = []
    for dataset in datasets:
        if dataset is MembershipDataset.HEART_DISEASE:
            pool, settings = heart_disease_pool(data_dir), heart_disease_settings(epsilons)
            count = models
        else:
            pool = breastmnist_pool(data_dir)
            settings = breastmnist_settings(epsilons, breastmnist_rounds, breastmnist_dp_rounds)
            count = breastmnist_models or models
        inside = _halves(pool, count, seed)
        sites = [name for name, _, _ in pool.sites]
        for setting in settings:
            started = time.monotonic()
            eps = accounted_epsilon(setting.spec(sites, seed))
            conf = np.empty((count, inside.shape[1]))
            for j in range(count):
                where = f"{setting.label} {_eps_text(setting.target_epsilon)}".strip()
                on_step(f"{dataset.value}, {where}: model {j + 1}/{count}")
                conf[j] = _train(pool, setting.spec(sites, seed * 1000 + j), inside[j])
            figures, test_auc = attack_setting(conf, inside, pool.labels)
            results.append(
                SettingResult(
                    dataset=dataset,
                    setting=setting.label,
                    target_epsilon=setting.target_epsilon,
                    epsilon=eps,
                    delta=setting.delta,
                    attacks=figures,
                    test_auc=test_auc,
                    seconds=time.monotonic() - started,
                    models=count,
                    rounds=setting.spec(sites, seed).rounds,
                )
            )
    return results


def _eps_text(target: float | None) -> str:
    return f"at epsilon {target:g}" if target is not None else ""


def membership_report(results: Sequence[SettingResult], setup: dict[str, Any]) -> MembershipReport:
    """The results as the JSON file the model card reads (one measurement per setting and attack)."""
    rows = tuple(
        MembershipMeasurement(
            dataset=r.dataset.value,
            setting=r.setting,
            target_epsilon=r.target_epsilon,
            epsilon=r.epsilon,
            delta=r.delta,
            attack=attack,
            figures=figures,
            test_auc=r.test_auc,
            models=r.models,
            rounds=r.rounds,
        )
        for r in results
        for attack, figures in r.attacks.items()
    )
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads {torch_threads()}"
    return MembershipReport(
        measurements=rows,
        measured_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        setup={"machine": machine, **setup},
    )


def plot_membership(results: Sequence[SettingResult], path: Path) -> Path:
    """Attack AUC and TPR at 1 % FPR against the accounted epsilon, one panel per dataset; settings without
    DP to the right of the axis break."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r.dataset for r in results))
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.2 * len(datasets), 7.0), dpi=110, squeeze=False)
    markers = {
        MembershipAttack.LOSS: "o",
        MembershipAttack.LIRA_ONLINE: "s",
        MembershipAttack.LIRA_OFFLINE: "^",
    }
    for col, dataset in enumerate(datasets):
        rows = [r for r in results if r.dataset is dataset]
        dp = sorted((r for r in rows if r.epsilon is not None), key=lambda r: r.epsilon or 0.0)
        plain = [r for r in rows if r.epsilon is None]
        top = max((r.epsilon or 1.0 for r in dp), default=1.0)
        plain_x = [top * 2.5 * (1.6**k) for k in range(len(plain))]
        for row, (metric, chance) in enumerate((("auc", 0.5), ("tpr_at_fpr", 0.01))):
            ax = axes[row][col]
            for k, (attack, marker) in enumerate(markers.items()):
                color = f"C{k}"
                ax.plot(
                    [r.epsilon for r in dp],
                    [getattr(r.attacks[attack], metric) for r in dp],
                    marker=marker,
                    color=color,
                    label=attack.value,
                )
                values = [getattr(r.attacks[attack], metric) for r in plain]
                ax.scatter(plain_x, values, marker=marker, s=40, color=color)
            ax.axhline(chance, color="0.4", linestyle=":", linewidth=1, label="chance")
            ax.set_xscale("log")
            ticks = [r.epsilon for r in dp] + plain_x
            ax.set_xticks(ticks)
            ax.set_xticklabels(
                [f"{r.epsilon:.2g}" for r in dp] + [_short(r.setting) for r in plain], fontsize=7
            )
            ax.minorticks_off()
            ax.set_ylabel("attack AUC" if metric == "auc" else "TPR at 1 % FPR")
            ax.grid(True, alpha=0.3)
            if row == 0:
                ax.set_title(f"{dataset.value}: membership inference vs ε")
            else:
                ax.set_xlabel("ε accounted by the sites' ledgers (right: no DP)")
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_private_file(path, image.getvalue())  # never through a link another account planted there
    return path


def _short(setting: str) -> str:
    return "no noise" if "noise 0" in setting else "no DP"
