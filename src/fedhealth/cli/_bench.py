"""``fedhealth benchmark ...``: measurements that go into docs/benchmarks.md."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

benchmark_app = typer.Typer(
    help="Reproducible measurements (accuracy, latency, privacy).", no_args_is_help=True
)


@benchmark_app.command("rounds")
def rounds_benchmark(
    sites: Annotated[int, typer.Option(min=1, help="Number of site agents.")] = 3,
    params: Annotated[int, typer.Option(min=1, help="float32 parameters of the synthetic model.")] = 1000,
    rounds: Annotated[int, typer.Option(min=1, help="Timed rounds (after 2 warm-up rounds).")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Median round wall time over loopback for a synthetic model of P float32 parameters."""
    from fedhealth.sim import benchmark_rounds

    result = benchmark_rounds(sites=sites, params=params, rounds=rounds)
    if as_json:
        print(json.dumps({k: getattr(result, k) for k in result.__slots__}))  # type: ignore[attr-defined]
        return
    Console().print(
        f"{sites} sites x {params:,} params: median round {result.median_s * 1000:.1f} ms "
        f"(p90 {result.p90_s * 1000:.1f} ms, min {result.min_s * 1000:.1f} ms, {result.rounds} rounds)"
    )


@benchmark_app.command("heart-disease")
def heart_disease_benchmark(
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per method (FLamby used 5).")] = 5,
    data_dir: Annotated[
        Path | None, typer.Option(help="Datasets folder (default $FEDHEALTH_DATA_DIR; downloads otherwise).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """FLamby's Fed-Heart-Disease protocol through the real orchestrator and agents, beside FLamby's."""
    from rich.table import Table

    from fedhealth.sim import benchmark_heart_disease

    console = Console(stderr=as_json)
    started = time.monotonic()
    with console.status("running studies") as status:
        results = benchmark_heart_disease(
            seeds=seeds,
            data_dir=data_dir,
            on_result=lambda m, s, a: status.update(f"{m} seed {s}: {a:.4f}"),
        )
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "method": r.method,
                        "rounds": r.rounds,
                        "mean": r.mean,
                        "std": r.std,
                        "accuracies": r.accuracies,
                        "per_center": r.per_center,
                        "flamby": r.reference,
                    }
                    for r in results
                ]
            )
        )
        return
    table = Table(title=f"Fed-Heart-Disease, {seeds} seeds, mean client accuracy (through the services)")
    for col in ("method", "rounds", "fedhealth", "per center", "FLamby"):
        table.add_column(col, justify="left" if col in ("method", "per center") else "right")
    for r in results:
        table.add_row(
            r.method,
            str(r.rounds),
            f"{r.mean:.4f} ± {r.std:.4f}",
            " ".join(f"{a:.3f}" for a in r.per_center),
            f"{r.reference:.4f}" if r.reference is not None else "",
        )
    console.print(table)
    console.print(f"wall time {time.monotonic() - started:.0f} s")


@benchmark_app.command("secagg")
def secagg_benchmark(
    sites: Annotated[int, typer.Option(min=2, help="Number of sites.")] = 10,
    params: Annotated[int, typer.Option(min=1, help="Parameters summed per round.")] = 1_000_000,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.9, help="Fraction of sites that drop out.")] = 0.0,
    repeats: Annotated[int, typer.Option(min=1, help="Rounds timed (the median is reported).")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Pure SecAgg+ protocol compute per round (all clients and the server, one process) and upload size."""
    from fedhealth.secagg import simulate_round

    report = simulate_round(sites=sites, params=params, dropout=dropout, repeats=repeats)
    if as_json:
        print(json.dumps(report.to_json()))
        return
    Console().print_json(json.dumps(report.to_json()))
