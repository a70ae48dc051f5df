"""``fedhealth stats ...``: federated descriptive statistics (docs/statistics.md).

    stats run study.toml [--out stats.json]   submit a statistics study, wait for it, print the table
    stats show stats.json                     print the table of a report written by ``stats run --out``

``stats run`` is ``study submit`` then ``study status --watch`` for a spec whose recipe releases a statistics
report (``[recipe] name = "stats"``): the sites must approve the spec's hash first, as for any study. The
table shows every stratum and feature; a suppressed cell (fewer than k records) shows as ``<k``. Exit codes:
0 the statistics were released; 1 the study failed, was cancelled, timed out or released no statistics;
2 a usage error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fedhealth.cli._common import (
    CredentialOption,
    UrlOption,
    operator_client,
    parse_duration,
    shown,
    shown_cell,
)
from fedhealth.cli._errors import fail
from fedhealth.core import write_private_file
from fedhealth.protocol import StudyStatus

stats_app = typer.Typer(help="Federated descriptive statistics.", no_args_is_help=True)
OutOption = Annotated[Path | None, typer.Option("--out", help="Also write the report (JSON) to this file.")]


def statistics_of(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The statistics report in a session's released result, or None if it holds none."""
    if not metrics or metrics.get("kind") != "federated-statistics" or "strata" not in metrics:
        return None
    return {k: v for k, v in metrics.items() if k != "session"}


def _figure(cell: dict[str, Any], k: int, digits: int = 4) -> str:
    if cell.get("suppressed"):
        return f"<{k}"
    value = cell.get("value")
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def _stratum_name(stratum: dict[str, Any]) -> str:
    parts = []
    if stratum.get("site") is not None:
        parts.append(f"site={stratum['site']}")
    if stratum.get("label") is not None:
        parts.append(f"label={stratum['label']}")
    return ", ".join(parts) or "all"


def stats_table(report: dict[str, Any]) -> Any:
    """The report as a rich table: one row per stratum and feature (histograms as counts per bin)."""
    from rich.table import Table

    k = int(report["min_cell_count"])
    noise = report.get("noise")
    title = f"federated statistics over {len(report['sites'])} sites (k = {k}"
    title += f", Gaussian noise z = {noise['noise_multiplier']:.4g})" if noise else ", exact)"
    table = Table(title=title, show_edge=False)
    for column, justify in (
        ("stratum", "left"),
        ("rows", "right"),
        ("feature", "left"),
        ("count", "right"),
        ("missing", "right"),
        ("mean", "right"),
        ("variance", "right"),
        ("histogram", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for stratum in report["strata"]:
        name = _stratum_name(stratum["stratum"])
        rows = _figure(stratum["rows"], k)
        for feature, figures in stratum["features"].items():
            fraction = figures["missing_fraction"]
            missing = _figure(figures["missing"], k)
            if not fraction["suppressed"] and fraction["value"] is not None:
                missing += f" ({fraction['value']:.1%})"
            table.add_row(
                shown_cell(name),  # a site, a label and a feature name are text from elsewhere: no markup
                rows,
                shown_cell(feature),
                _figure(figures["count"], k),
                missing,
                _figure(figures["mean"], k),
                _figure(figures["variance"], k),
                " ".join(_figure(c, k) for c in figures["histogram"]),
            )
            name = rows = ""
    return table


def _print(report: dict[str, Any]) -> None:
    from rich.console import Console

    Console(width=200).print(stats_table(report))
    bins = report.get("bins") or {}
    if bins:
        typer.echo("bins: below the first edge, between successive edges [a, b), at or above the last:")
        for feature, edges in bins.items():
            typer.echo(f"  {shown(feature)}: {', '.join(f'{e:g}' for e in edges)}")


@stats_app.command("run")
def stats_run(
    spec: Annotated[
        Path, typer.Argument(dir_okay=False, help="The study spec (TOML, or .json) of a statistics study.")
    ],
    out: OutOption = None,
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    signing_key: Annotated[
        Path | None,
        typer.Option(help="Your spec-signing key (default: beside the credential; made on first use)."),
    ] = None,
    approval_wait: Annotated[
        str | None, typer.Option(help="How long the study waits for the sites' approvals (default 7d).")
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=1, help="Give up waiting for the result after this many seconds.")
    ] = 3600.0,
) -> None:
    """Submit a statistics study signed with your key, wait until it ends, print the table."""
    from fedhealth.client import ClientError, load_signing_key, load_spec, signing_key_path

    wait = parse_duration(approval_wait, "--approval-wait") if approval_wait is not None else None
    loaded = load_spec(spec)
    with operator_client(credential, orchestrator) as client:  # a bad credential or URL: no key made
        key = load_signing_key(signing_key or signing_key_path(credential))
        if loaded.owner != client.user:
            fail(
                f"the spec's owner is {loaded.owner!r} but the credential is {client.user!r}'s",
                f"set owner = {client.user!r} in {spec}",
            )
        info = client.submit_study(loaded, key, approval_wait_s=wait)
        typer.echo(
            f"study {shown(info.study_id)} submitted (spec {shown(info.spec_hash)}); waiting for its result",
            err=True,
        )
        try:
            info = client.wait_for_study(info.study_id, timeout=timeout, interval=0.5)
        except ClientError as exc:
            fail(str(exc), f"follow it with `fedhealth study status {info.study_id} --watch`")
    if info.status is not StudyStatus.COMPLETED:
        fail(f"study {info.study_id} {info.status.value}" + (f": {info.reason}" if info.reason else ""))
    report = statistics_of(info.rounds[-1].metrics if info.rounds else None)
    if report is None:
        fail(f"study {info.study_id} completed but released no statistics report (is its recipe stats?)")
    if out is not None:
        # 0600, like `study download --report`; a link or FIFO planted at --out is replaced, not followed
        write_private_file(out, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
        typer.echo(f"report written to {out}", err=True)
    _print(report)


@stats_app.command("show")
def stats_show(
    report: Annotated[Path, typer.Argument(help="A report written by `stats run --out`.")],
) -> None:
    """Print the table of a statistics report."""
    try:
        loaded = json.loads(report.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{report}: no such file")
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"{report}: not JSON ({exc})")
    found = statistics_of(loaded if isinstance(loaded, dict) else None)
    if found is None:
        fail(f"{report}: not a statistics report")
    _print(found)
