"""``fedhealth site check`` (the pilot probe, at a site) and ``fedhealth site readiness`` (every site's latest
probe, for the operator).

    fedhealth site check --home HOME [--json] [--no-report] [--transfer-mb 10]
    fedhealth site readiness --credential admin.credential [--json]

``site check`` prints a readiness table and exits 0 when nothing failed, 1 (with one ``error:`` line after
the table) when a check failed. Its figures are sent to the orchestrator unless ``--no-report``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedhealth.cli._common import (
    CredentialOption,
    JsonOption,
    UrlOption,
    operator_client,
    print_json,
    shown,
    shown_cell,
)
from fedhealth.cli._errors import fail

if TYPE_CHECKING:
    from fedhealth.protocol import ReadinessCheck


def site_check(
    home: Annotated[Path, typer.Option("--home", help="The site's home (from `site enroll`).")],
    orchestrator: Annotated[
        str | None, typer.Option("--orchestrator", help="Override the orchestrator URL of the home.")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder of builtin datasets.")] = None,
    transfer_mb: Annotated[
        float, typer.Option(min=0.1, max=32, help="Size of each bandwidth probe, MB.")
    ] = 10.0,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Send the figures to the orchestrator.")
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Probe this site's readiness: the orchestrator (DNS, TLS with the pinned CA, login, clock skew,
    latency, bandwidth both ways), a reference training step per recipe, disk, memory, every dataset."""
    from fedhealth.agent import SiteHome, run_site_check

    site = SiteHome(home)
    site.require()
    result = run_site_check(
        site, url=orchestrator, data_dir=data_dir, transfer_bytes=int(transfer_mb * 1e6), report=report
    )
    if as_json:
        print_json({"readiness": result.readiness(_now()), "details": result.details, "sent": result.sent})
    else:
        _print_table(result.checks, result.details)
        if report:
            typer.echo(
                "readiness sent to the orchestrator (figures only)"
                if result.sent
                else "warning: the readiness report was not sent (the orchestrator was not reached)",
                err=True,
            )
    if not result.ready:
        failed = [c.name for c in result.checks if c.status.value == "fail"]
        fail(
            f"this site is not ready: {len(failed)} check(s) failed ({', '.join(failed)})",
            "see the table above",
        )


def _now() -> datetime:
    return datetime.now(UTC)


def _print_table(checks: list[ReadinessCheck], details: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    styles = {"ok": "green", "warn": "yellow", "fail": "bold red", "skipped": "dim"}
    table = Table(title="site readiness", show_edge=False)
    for column in ("check", "status", "value", "note"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for c in checks:
        value = "" if c.value is None else f"{c.value:g} {c.unit}".strip()
        note = c.note + (f": {details[c.name]}" if c.name in details else "")
        table.add_row(
            shown_cell(c.name),
            Text(c.status.value, style=styles[c.status.value]),
            shown_cell(value),
            shown_cell(note),
        )
    Console().print(table)


def site_readiness(
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Every site's latest `site check`: ready or not, when, its fedhealth version, each failed check."""
    with operator_client(credential, orchestrator) as client:
        reports = client.site_readiness()
    if as_json:
        print_json(reports)
        return
    for entry in reports:
        r = entry.readiness
        if r is None:
            typer.echo(f"{shown(entry.site)}\tnot checked")
            continue
        failed = [c.name for c in r.checks if c.status.value == "fail"]
        warned = [c.name for c in r.checks if c.status.value == "warn"]
        state = "ready" if r.ready else f"NOT READY ({', '.join(failed)})"
        extra = f"; warnings: {', '.join(warned)}" if warned else ""
        when = f"checked {r.checked_at:%Y-%m-%d %H:%M} UTC"
        version = shown(r.software_version)
        typer.echo(f"{shown(entry.site)}\t{shown(state)}\t{when}\tfedhealth {version}{shown(extra)}")
