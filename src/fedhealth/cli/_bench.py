"""``fedhealth benchmark ...``: measurements that go into docs/benchmarks.md."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedhealth.core import write_private_file

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


@benchmark_app.command("collective")
def collective_benchmark(
    sites: Annotated[int, typer.Option(min=3, help="Number of site agents (a session needs 3).")] = 4,
    size: Annotated[int, typer.Option(min=1, help="float64 values per sum.")] = 10_000,
    calls: Annotated[int, typer.Option(min=1, help="Timed calls of each kind (after 3 warm-up).")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Median and p99 latency of one secure_sum over the real services (loopback HTTPS, real agents), with
    the same sum unmasked beside it in the same session."""
    from fedhealth.sim import benchmark_collective

    result = benchmark_collective(sites=sites, size=size, calls=calls)
    if as_json:
        print(json.dumps(result.to_json()))
        return
    if result.mismatches:
        raise typer.Exit(f"error: {result.mismatches} calls returned a sum other than the exact one")
    load = ", ".join(f"{v:.2f}" for v in result.load_before)
    secure = f"median {result.secure_median_s * 1e3:.2f} ms   p99 {result.secure_p99_s * 1e3:.2f} ms"
    plain = f"median {result.plain_median_s * 1e3:.2f} ms   p99 {result.plain_p99_s * 1e3:.2f} ms"
    Console().print(
        f"{sites} sites x {size:,} float64, {result.calls} calls each:\n"
        f"  secure_sum   {secure}\n  unmasked sum {plain}\n"
        f"  every sum exact; load average at start {load} on {result.cpus} CPUs"
    )


@benchmark_app.command("boosting")
def boosting_benchmark(
    sites: Annotated[int, typer.Option(min=3, help="Number of site agents (a session needs 3).")] = 4,
    rows: Annotated[
        int, typer.Option(min=100, help="Synthetic rows in all, split evenly over the sites.")
    ] = 50_000,
    features: Annotated[int, typer.Option(min=1, help="Features per row.")] = 30,
    trees: Annotated[int, typer.Option(min=1, help="Boosting rounds of each library.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Federated LightGBM and XGBoost through the real services against the same library on the pooled rows,
    in one run: wall-time ratio, collectives per tree, bytes per site, share of time waiting."""
    from fedhealth.sim import benchmark_boosting

    console = Console(stderr=as_json)
    with console.status("preparing") as status:
        result = benchmark_boosting(
            sites=sites, rows=rows, features=features, trees=trees, on_step=status.update
        )
    if as_json:
        print(json.dumps(result.to_json()))
        return
    console.print(f"{sites} sites, {rows:,} rows x {features} features, {trees} trees (binary):")
    for r in result.runs:
        accuracy = f", accuracy {r.accuracy:.3f}" if r.accuracy is not None else ""
        console.print(
            f"  {r.library}: pooled {r.pooled_s:.2f} s, federated {r.federated_s:.1f} s = {r.ratio:.0f}x; "
            f"{r.collectives_per_tree:.1f} collectives/tree, {r.bytes_per_site / 1e6:.1f} MB/site, "
            f"{r.waiting_share:.0%} of each site's time in collective calls; "
            f"{'equal to' if r.identical_to_pooled else 'DIFFERENT from'} the pooled model{accuracy}"
        )
        if r.cores_busy is not None:
            console.print(
                f"    CPU: orchestrator {r.orchestrator_cpu_s:.1f} s, each site {r.site_cpu_s:.1f} s "
                f"({r.cores_busy:.2f} cores busy on average), pooled {r.pooled_cpu_s:.2f} s; "
                f"at best {r.cpu_bound_ratio:.0f}x on {result.cpus} cores for that much CPU"
            )
    load = ", ".join(f"{v:.2f}" for v in result.load_before)
    console.print(f"load average at start {load} on {result.cpus} CPUs")


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


@benchmark_app.command("privacy")
def privacy_benchmark(
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per privacy target.")] = 5,
    epsilon: Annotated[
        list[float] | None, typer.Option(help="Target epsilons (repeatable; default 0.5 1 3 8).")
    ] = None,
    delta: Annotated[list[float] | None, typer.Option(help="Deltas (repeatable; default 1e-3 1e-5).")] = None,
    baseline: Annotated[
        bool, typer.Option("--baseline/--no-baseline", help="Also run the same recipe without noise.")
    ] = True,
    data_dir: Annotated[
        Path | None, typer.Option(help="Datasets folder (default $FEDHEALTH_DATA_DIR; downloads otherwise).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG to write.")] = Path(
        "docs/dp_heart_disease_services.png"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Fed-Heart-Disease with record-level DP-SGD through the real orchestrator and agents: mean client
    accuracy at each privacy target, each site's epsilon as its own ledger accounted it."""
    from rich.table import Table

    from fedhealth.sim import benchmark_privacy, plot_privacy

    console = Console(stderr=as_json)
    started = time.monotonic()
    with console.status("running studies") as status:
        results = benchmark_privacy(
            seeds=seeds,
            epsilons=epsilon,
            deltas=delta,
            no_dp=baseline,
            data_dir=data_dir,
            on_result=lambda m, s, a: status.update(f"{m} seed {s}: {a:.4f}"),
        )
    if plot is not None:
        plot_privacy(results, plot)
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "target_epsilon": r.target_epsilon,
                        "delta": r.delta,
                        "noise_multiplier": r.noise_multiplier,
                        "mean": r.mean,
                        "std": r.std,
                        "accuracies": r.accuracies,
                        "per_center": r.per_center,
                        "site_epsilons": r.site_epsilons,
                        "bit_identical": r.bit_identical,
                    }
                    for r in results
                ]
            )
        )
        return
    table = Table(
        title=f"Fed-Heart-Disease with DP-SGD through the services, {seeds} seeds, mean client accuracy"
    )
    for col in ("epsilon", "delta", "sigma", "site epsilon (max)", "accuracy", "per center", "= in-memory"):
        table.add_column(col, justify="left" if col == "per center" else "right")
    for r in results:
        table.add_row(
            f"{r.target_epsilon:g}" if r.target_epsilon is not None else "no DP",
            f"{r.delta:g}" if r.delta is not None else "",
            f"{r.noise_multiplier:.4g}",
            f"{r.max_site_epsilon:.4f}" if r.max_site_epsilon is not None else "inf",
            f"{r.mean:.4f} ± {r.std:.4f}",
            " ".join(f"{a:.3f}" for a in r.per_center),
            "yes" if r.bit_identical else "NO",
        )
    console.print(table)
    if plot is not None:
        console.print(f"plot written to {plot}")
    console.print(f"wall time {time.monotonic() - started:.0f} s")


@benchmark_app.command("connectors")
def connectors_benchmark(
    postgres_url: Annotated[
        str | None,
        typer.Option(
            help="A PostgreSQL URL (default $FEDHEALTH_TEST_POSTGRES_URL, else 127.0.0.1:5432/test)."
        ),
    ] = None,
    patients: Annotated[int, typer.Option(min=10, help="Patients in the PostgreSQL table.")] = 100_000,
    omop_persons: Annotated[int, typer.Option(min=10, help="Persons in the OMOP CDM.")] = 100_000,
    fhir_patients: Annotated[int, typer.Option(min=10, help="Patients on the FHIR server.")] = 10_000,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per measurement (median).")] = 3,
    ddl: Annotated[Path, typer.Option(help="The OMOP CDM v5.4 PostgreSQL DDL subset.")] = Path(
        "tests/connectors/omop_cdm_v5.4_postgresql_subset.sql"
    ),
    sekmet: Annotated[
        Path | None,
        typer.Option(help="The sekmet command of a sekmet-fhir virtualenv (default .cache/sekmet-venv)."),
    ] = None,
    workdir: Annotated[Path, typer.Option(help="Scratch folder.")] = Path(".cache/bench-connectors"),
    data_dir: Annotated[
        Path | None, typer.Option(help="Datasets folder (default $FEDHEALTH_DATA_DIR).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON array.")] = False,
) -> None:
    """Rows per second extracted from PostgreSQL, an OMOP CDM and a FHIR server, beside pandas' read_sql."""
    import os

    from rich.table import Table

    from fedhealth.sim import benchmark_connectors

    url = (
        postgres_url
        or os.environ.get("FEDHEALTH_TEST_POSTGRES_URL")
        or ("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    )
    if not ddl.is_file():
        raise typer.BadParameter(f"{ddl} does not exist; run from the repository root or pass --ddl")
    exe = (sekmet or Path(".cache/sekmet-venv/bin/sekmet")).absolute()
    if not exe.exists():
        raise typer.BadParameter(
            f"{exe} does not exist: build it with `python -m venv .cache/sekmet-venv && "
            ".cache/sekmet-venv/bin/pip install sekmet-fhir` (or run the FHIR tests once), or pass --sekmet"
        )
    console = Console(stderr=True)
    started = time.monotonic()
    with console.status("loading") as status:
        results = benchmark_connectors(
            postgres_url=url,
            ddl=ddl,
            sekmet=exe,
            workdir=workdir,
            data_dir=data_dir,
            patients_n=patients,
            omop_persons=omop_persons,
            fhir_patients=fhir_patients,
            repeats=repeats,
            on_step=status.update,
        )
    if as_json:
        print(json.dumps([r.to_json() for r in results]))
        return
    table = Table(
        title=f"Connector extraction, median of {repeats} ({time.monotonic() - started:.0f} s in all)"
    )
    for col in ("source", "what", "rows", "median", "rows/s"):
        table.add_column(col, justify="left" if col in ("source", "what") else "right")
    for r in results:
        table.add_row(r.source, r.what, f"{r.rows:,}", f"{r.seconds:.2f} s", f"{r.rows_per_s:,.0f}")
    Console().print(table)


@benchmark_app.command("dashboard")
def dashboard_benchmark(
    sites: Annotated[int, typer.Option(min=1, help="Sites in the seeded federation.")] = 50,
    studies: Annotated[int, typer.Option(min=1, help="Finished studies.")] = 200,
    rounds: Annotated[
        int, typer.Option(min=1, help="Rounds in all (split evenly over the studies).")
    ] = 20_000,
    sites_per_study: Annotated[int, typer.Option(min=1, help="Training sites of each study.")] = 5,
    repeats: Annotated[int, typer.Option(min=1, help="Timed requests per page (median).")] = 15,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Each dashboard page's server time (median) on a seeded database of sites, studies and rounds."""
    from dataclasses import asdict

    from fedhealth.dashboard import benchmark_dashboard

    result = benchmark_dashboard(
        sites=sites, studies=studies, rounds=rounds, sites_per_study=sites_per_study, repeats=repeats
    )
    if as_json:
        print(json.dumps(asdict(result)))
        return
    console = Console()
    console.print(
        f"{result.sites} sites, {result.studies} studies, {result.rounds:,} rounds, {result.tasks:,} tasks, "
        f"{result.audit_entries:,} budget entries (seeded in {result.seed_s:.0f} s)"
    )
    for page in result.pages:
        console.print(
            f"{page.page:<40} first {page.first_ms:7.1f} ms  median {page.median_ms:7.1f} ms  "
            f"p90 {page.p90_ms:7.1f} ms  "
            f"{page.bytes:>9,} bytes"
        )


@benchmark_app.command("membership")
def membership_benchmark(
    dataset: Annotated[
        list[str] | None,
        typer.Option(help="heart-disease or breastmnist (repeatable; default both)."),
    ] = None,
    epsilon: Annotated[
        list[float] | None, typer.Option(help="Target epsilons (repeatable; default 1 4 8).")
    ] = None,
    models: Annotated[
        int,
        typer.Option(
            min=3, help="Federations trained per setting: each the target once, the others its shadows."
        ),
    ] = 8,
    breastmnist_models: Annotated[
        int | None, typer.Option(min=3, help="Models per BreastMNIST setting (default: --models).")
    ] = None,
    rounds: Annotated[
        int, typer.Option(min=1, help="BreastMNIST rounds without DP (heart disease: its presets').")
    ] = 20,
    dp_rounds: Annotated[int, typer.Option(min=1, help="BreastMNIST rounds with DP-SGD.")] = 20,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the halves each model trains on.")] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="A small run: 4 models, epsilon 1 and 8, 3 BreastMNIST rounds.")
    ] = False,
    data_dir: Annotated[
        Path | None, typer.Option(help="Datasets folder (default $FEDHEALTH_DATA_DIR; downloads otherwise).")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="JSON result to write (`fedhealth model card --membership` reads it).")
    ] = Path("membership.json"),
    plot: Annotated[Path | None, typer.Option(help="PNG to write.")] = Path("docs/membership.png"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON result.")] = False,
) -> None:
    """Membership-inference attacks (loss threshold; LiRA online and offline) on the models released at each
    epsilon and without DP: attack AUC and TPR at 1% FPR beside the epsilon the sites' ledgers accounted."""
    from rich.table import Table

    from fedhealth.sim import MembershipDataset, benchmark_membership, membership_report, plot_membership

    try:
        chosen = [MembershipDataset(d) for d in dataset] if dataset else list(MembershipDataset)
    except ValueError:
        raise typer.BadParameter(
            f"--dataset must be one of {', '.join(d.value for d in MembershipDataset)}"
        ) from None
    if epsilon is not None and any(not 0 < e <= 100 for e in epsilon):
        raise typer.BadParameter("--epsilon must lie in (0, 100]")
    epsilons = epsilon or ([1.0, 8.0] if quick else [1.0, 4.0, 8.0])
    if quick:
        models, rounds, dp_rounds = min(models, 4), min(rounds, 3), min(dp_rounds, 3)
        breastmnist_models = min(breastmnist_models or models, 4)
    console = Console(stderr=as_json)
    started = time.monotonic()

    def step(text: str) -> None:
        status.update(text)
        if not console.is_terminal:  # a log file gets each step as a line
            console.print(f"{time.monotonic() - started:7.0f} s  {text}")

    with console.status("preparing") as status:
        results = benchmark_membership(
            datasets=chosen,
            epsilons=epsilons,
            models=models,
            breastmnist_models=breastmnist_models,
            breastmnist_rounds=rounds,
            breastmnist_dp_rounds=dp_rounds,
            seed=seed,
            data_dir=data_dir,
            on_step=step,
        )
    wall = time.monotonic() - started
    setup = {
        "models": models,
        "breastmnist_models": breastmnist_models or models,
        "breastmnist_rounds": rounds,
        "breastmnist_dp_rounds": dp_rounds,
        "seed": seed,
        "quick": quick,
        "wall_time_s": round(wall, 1),
    }
    report = membership_report(results, setup)
    write_private_file(out, (json.dumps(report.to_json(), indent=2) + "\n").encode())
    if plot is not None:
        plot_membership(results, plot)
    if as_json:
        print(json.dumps(report.to_json()))
        return
    table = Table(title="Membership inference: attack AUC / TPR at 1% FPR (each model the target once)")
    for col in (
        "dataset",
        "setting",
        "models x rounds",
        "ε target",
        "ε accounted",
        "δ",
        "task AUC",
        "loss",
        "LiRA online",
        "LiRA offline",
    ):
        table.add_column(col, justify="left" if col in ("dataset", "setting") else "right")
    for r in results:
        table.add_row(
            r.dataset.value,
            r.setting,
            f"{r.models} x {r.rounds}",
            f"{r.target_epsilon:g}" if r.target_epsilon is not None else "-",
            f"{r.epsilon:.3f}" if r.epsilon is not None else "∞",
            f"{r.delta:g}" if r.delta is not None else "-",
            f"{r.test_auc:.3f}",
            *(f"{f.auc:.3f} / {f.tpr_at_fpr:.3f}" for f in r.attacks.values()),
        )
    console.print(table)
    console.print(f"result written to {out}" + (f", plot to {plot}" if plot is not None else ""))
    console.print(f"wall time {wall:.0f} s")
