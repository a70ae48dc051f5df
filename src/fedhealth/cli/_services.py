"""``fedhealth orchestrator ...`` and ``fedhealth site ...``: run the two services."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from fedhealth.agent import AgentSettings, RetryPolicy, run_agent
from fedhealth.orchestrator import OrchestratorSettings, serve

orchestrator_app = typer.Typer(help="Run and administer the orchestrator.", no_args_is_help=True)
site_app = typer.Typer(help="Run and administer a site agent.", no_args_is_help=True)


@orchestrator_app.command("serve")
def orchestrator_serve(
    state_dir: Annotated[Path, typer.Option(help="Database, blobs and reports live here.")] = Path(
        "fedhealth-orchestrator"
    ),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8443,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: SQLite in the state dir)."
        ),
    ] = None,
    ready_file: Annotated[Path | None, typer.Option(help="Write {url, pid} here once ready.")] = None,
    fsync: Annotated[
        bool, typer.Option(help="fsync every commit and blob (survives power loss, slower).")
    ] = False,
    max_body_mb: Annotated[int, typer.Option(help="Largest request body accepted, in MiB.")] = 512,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the agent API, the operator API and the dashboard on one port."""
    settings = OrchestratorSettings(
        state_dir=state_dir, database_url=database_url, fsync=fsync, max_body_bytes=max_body_mb << 20
    )
    serve(settings, host=host, port=port, ready_file=ready_file, log_level=log_level)


def _parse_datasets(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, uri = value.partition("=")
        if not sep or not name or not uri:
            raise typer.BadParameter(f"expected NAME=URI, got {value!r}", param_hint="--dataset")
        out[name] = uri
    return out


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@site_app.command("serve")
def site_serve(
    orchestrator: Annotated[str, typer.Option(help="The orchestrator's URL.")],
    name: Annotated[str, typer.Option(help="This site's name, as registered at the orchestrator.")],
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=URI of a local dataset, e.g. heart-disease=builtin://heart-disease/0 (repeatable)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder of downloaded datasets (default $FEDHEALTH_DATA_DIR).")
    ] = None,
    poll_wait: Annotated[float, typer.Option(help="Long-poll wait, seconds.")] = 25.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the site agent: poll the orchestrator for tasks and train on local data."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    settings = AgentSettings(
        orchestrator_url=orchestrator,
        site=name,
        datasets=_parse_datasets(dataset or []),
        data_dir=data_dir,
        poll_wait_s=poll_wait,
        retry=RetryPolicy(base_s=0.1, max_s=5.0),
    )
    run_agent(settings)
