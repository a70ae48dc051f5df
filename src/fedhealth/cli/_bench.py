"""``fedhealth benchmark ...``: measurements that go into docs/benchmarks.md."""

from __future__ import annotations

import json
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
