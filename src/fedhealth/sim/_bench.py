"""Transport benchmarks over a real local federation (orchestrator + agents as processes, loopback HTTP)."""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedhealth.learning import COLLECTIVE_PROBE_RECIPE, SYNTHETIC_RECIPE, ProbeParams, SyntheticParams
from fedhealth.protocol import SecureAggregationSpec, StudySpec, StudyStatus, TaskKind
from fedhealth.runtime import recipe_spec
from fedhealth.sim._federation import FederationError, LocalFederation


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundBenchmark:
    sites: int
    params: int
    rounds: int
    median_s: float
    p90_s: float
    min_s: float
    round_times_s: tuple[float, ...]


def benchmark_rounds(
    *,
    sites: int,
    params: int,
    rounds: int = 20,
    warmup: int = 2,
    workdir: Path | None = None,
    orchestrator_args: tuple[str, ...] = (),
    agent_args: tuple[str, ...] = (),
    tls: bool = True,
    secure: bool = False,
) -> RoundBenchmark:
    """Median wall time of a training round of a synthetic model of ``params`` float32 parameters.

    A round is timed by the orchestrator from its opening to its close: task delivery by long-poll, model
    download, the (trivial) local step, upload, validation, aggregation and the next round's opening.
    The first ``warmup`` rounds are dropped. ``tls=False`` serves plain HTTP (tokens still on);
    ``secure=True`` runs every round as a SecAgg+ round.
    """
    with tempfile.TemporaryDirectory(prefix="fedhealth-bench-") as tmp:
        root = workdir or Path(tmp)
        with LocalFederation(root, log_level="warning", orchestrator_args=orchestrator_args, tls=tls) as fed:
            fed.start_orchestrator()
            names = [f"site-{i:02d}" for i in range(sites)]
            for name in names:
                fed.add_site(name)
                fed.start_agent(name, {}, extra_args=agent_args)
            fed.wait_for_sites(names)
            spec = StudySpec(
                name="bench-rounds",
                dataset="none",
                recipe=recipe_spec(SYNTHETIC_RECIPE, SyntheticParams(n_params=params)),
                rounds=rounds + warmup,
                train_sites=names,
                min_sites=sites,
                round_deadline_s=120.0,
                secure_aggregation=SecureAggregationSpec(stage_timeout_s=60.0, site_keys=fed.site_keys(names))
                if secure
                else None,
            )
            study = fed.create_study(spec)
            final = fed.wait_for_study(study.study_id, timeout=600, interval=0.5)
            if final.status is not StudyStatus.COMPLETED:
                raise FederationError(f"benchmark study {final.status.value}: {final.reason}")
            times = [
                (r.ended_at - r.started_at).total_seconds()
                for r in final.rounds
                if r.kind is TaskKind.TRAIN and r.ended_at is not None
            ][warmup:]
    ordered = sorted(times)
    return RoundBenchmark(
        sites=sites,
        params=params,
        rounds=len(times),
        median_s=statistics.median(times),
        p90_s=ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        min_s=ordered[0],
        round_times_s=tuple(times),
    )


# --- collective sessions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveBenchmark:
    """Latency of one collective over the real services: per call, the mean over the sites of the time from
    entering the collective to its result (the session's sites are in step, so they differ little)."""

    sites: int
    size: int
    calls: int
    secure_s: tuple[float, ...]  # each timed secure_sum
    plain_s: tuple[float, ...]  # each timed unmasked sum, interleaved with the secure ones
    mismatches: int  # calls whose result differed from the exact fixed-point sum (must be 0)
    load_before: tuple[float, float, float]  # os.getloadavg() when the session started
    load_after: tuple[float, float, float]
    cpus: int

    @property
    def secure_median_s(self) -> float:
        return statistics.median(self.secure_s)

    @property
    def plain_median_s(self) -> float:
        return statistics.median(self.plain_s)

    @property
    def secure_p99_s(self) -> float:
        return percentile(self.secure_s, 0.99)

    @property
    def plain_p99_s(self) -> float:
        return percentile(self.plain_s, 0.99)

    def to_json(self) -> dict[str, object]:
        return {
            "sites": self.sites,
            "size": self.size,
            "calls": self.calls,
            "secure_median_ms": self.secure_median_s * 1e3,
            "secure_p99_ms": self.secure_p99_s * 1e3,
            "plain_median_ms": self.plain_median_s * 1e3,
            "plain_p99_ms": self.plain_p99_s * 1e3,
            "mismatches": self.mismatches,
            "load_before": self.load_before,
            "load_after": self.load_after,
            "cpus": self.cpus,
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in (0, 1]): the smallest value with at least q of them at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def benchmark_collective(
    *,
    sites: int = 4,
    size: int = 10_000,
    calls: int = 200,
    workdir: Path | None = None,
    tls: bool = True,
) -> CollectiveBenchmark:
    """``calls`` secure sums of ``size`` float64 (after 3 warm-up calls), each followed by the same sum
    unmasked, in one collective session of ``sites`` real agents with a real orchestrator over loopback
    (HTTPS with the federation's CA unless ``tls=False``). The session is a study of the
    ``collective-probe`` recipe, approved and audited like any other."""
    with tempfile.TemporaryDirectory(prefix="fedhealth-bench-") as tmp:
        root = workdir or Path(tmp)
        with LocalFederation(root, log_level="warning", tls=tls) as fed:
            fed.start_orchestrator()
            names = [f"site-{i:02d}" for i in range(sites)]
            for name in names:
                fed.add_site(name)
                fed.start_agent(name, {})
            fed.wait_for_sites(names)
            spec = StudySpec(
                name="bench-collective",
                dataset="none",
                recipe=recipe_spec(COLLECTIVE_PROBE_RECIPE, ProbeParams(size=size, calls=calls)),
                rounds=1,
                train_sites=names,
                min_sites=sites,
                round_deadline_s=3600.0,
                secure_aggregation=SecureAggregationSpec(
                    stage_timeout_s=120.0, site_keys=fed.site_keys(names)
                ),
            )
            load_before = os.getloadavg()
            study = fed.create_study(spec)
            # the figures are the sites' own timings: a slow poll, so as not to load the server they measure
            final = fed.wait_for_study(study.study_id, timeout=3600, interval=1.0)
            load_after = os.getloadavg()
            if final.status is not StudyStatus.COMPLETED:
                raise FederationError(f"benchmark session {final.status.value}: {final.reason}")
            report = final.rounds[0].metrics or {}
    return CollectiveBenchmark(
        sites=sites,
        size=size,
        calls=int(report["calls"]),
        secure_s=tuple(report["secure_s"]),
        plain_s=tuple(report["plain_s"]),
        mismatches=int(report["mismatches"]),
        load_before=load_before,
        load_after=load_after,
        cpus=os.cpu_count() or 1,
    )


# --- Fed-Heart-Disease through the services ---------------------------------------------------------------

# FLamby (NeurIPS 2022 datasets & benchmarks), results CSVs: client-average accuracy, 5 seeds.
FLAMBY_HEART_DISEASE: dict[str, float] = {
    "pooled": 0.7353,
    "local-0": 0.7221,
    "local-1": 0.6287,
    "local-2": 0.5670,
    "local-3": 0.6366,
    "fedavg": 0.6850,
    "fedprox": 0.6850,
    "fedadam": 0.7255,
    "fedyogi": 0.7314,
    "fedadagrad": 0.7314,
}
HEART_DISEASE_CENTERS = ("center-0", "center-1", "center-2", "center-3")


@dataclass(frozen=True, slots=True, kw_only=True)
class MethodResult:
    method: str
    rounds: int
    accuracies: tuple[float, ...]  # mean over the 4 centers' test sets, one per seed
    per_center: tuple[float, ...]  # mean over seeds, one per center
    reference: float | None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def heart_disease_methods() -> list[tuple[str, str, list[str]]]:
    """(method, preset name, training sites) for every row of FLamby's table."""
    rows = [("pooled", "pooled", ["pooled"])]
    rows += [(f"local-{k}", "local", [HEART_DISEASE_CENTERS[k]]) for k in range(4)]
    rows += [
        (m, m, list(HEART_DISEASE_CENTERS)) for m in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")
    ]
    return rows


def benchmark_heart_disease(
    *,
    seeds: int = 5,
    data_dir: Path | None = None,
    workdir: Path | None = None,
    on_result: Callable[[str, int, float], None] | None = None,
) -> list[MethodResult]:
    """FLamby's Fed-Heart-Disease protocol through a real orchestrator and five real agents (the four
    hospitals and one holding the pooled training data), every method and seed a separate study. Each final
    model is evaluated by the four hospitals on their own test sets; the figure is the plain mean."""
    from fedhealth.learning import HEART_DISEASE_PRESETS
    from fedhealth.runtime import preset_study

    env = {"FEDHEALTH_DATA_DIR": str(data_dir)} if data_dir else None
    results: list[MethodResult] = []
    with tempfile.TemporaryDirectory(prefix="fedhealth-hd-") as tmp:
        root = workdir or Path(tmp)
        with LocalFederation(root, log_level="warning", env=env) as fed:
            fed.start_orchestrator()
            datasets = {name: f"builtin://heart-disease/{k}" for k, name in enumerate(HEART_DISEASE_CENTERS)}
            datasets["pooled"] = "builtin://heart-disease/pooled"
            for name, uri in datasets.items():
                fed.add_site(name)
                fed.start_agent(name, {"heart-disease": uri})
            fed.wait_for_sites(list(datasets))
            for method, preset_name, train_sites in heart_disease_methods():
                preset = HEART_DISEASE_PRESETS[preset_name]
                accs: list[list[float]] = []
                for seed in range(seeds):
                    spec = preset_study(
                        preset,
                        name=f"hd-{method}-{seed}",
                        dataset="heart-disease",
                        train_sites=train_sites,
                        eval_sites=list(HEART_DISEASE_CENTERS),
                        min_sites=len(train_sites),
                        round_deadline_s=120.0,
                        seed=seed,
                    )
                    final = fed.wait_for_study(fed.create_study(spec).study_id, timeout=900, interval=0.2)
                    if final.status is not StudyStatus.COMPLETED or final.reason:
                        raise FederationError(f"{method} seed {seed}: {final.status.value}: {final.reason}")
                    per_site = fed.report(final.study_id)["evaluation"]["per_site"]
                    row = [per_site[c]["accuracy"] for c in HEART_DISEASE_CENTERS]
                    accs.append(row)
                    if on_result is not None:
                        on_result(method, seed, statistics.fmean(row))
                results.append(
                    MethodResult(
                        method=method,
                        rounds=preset.rounds,
                        accuracies=tuple(statistics.fmean(r) for r in accs),
                        per_center=tuple(statistics.fmean(col) for col in zip(*accs, strict=True)),
                        reference=FLAMBY_HEART_DISEASE.get(method),
                    )
                )
    return results
