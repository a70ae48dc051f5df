"""``fedhealth onboarding pack --site NAME --out DIR --home HOME``: a site's onboarding kit (an ethics board
consultation template, a data processing agreement annex of technical and organisational measures and a site
readiness checklist, as Markdown) rendered from the federation's actual settings, read from the orchestrator's
home and database (docs/dashboard.md). The dashboard offers the same kit to admins as a download.
Exit codes: 0 written; 1 an unknown site, a folder that already holds the files, a home that is not one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedhealth.cli._errors import fail

onboarding_app = typer.Typer(help="Onboarding documents for a new site.", no_args_is_help=True)


@onboarding_app.command("pack")
def onboarding_pack_command(
    site: Annotated[str, typer.Option(help="The site the kit is for (as `fedhealth site add` named it).")],
    out: Annotated[Path, typer.Option(help="Folder to write the Markdown files into (created if missing).")],
    home: Annotated[Path, typer.Option(help="The orchestrator's home (`orchestrator init`).")],
    database_url: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL (overrides the home's setting). A URL with a password: set "
            "FEDHEALTH_DATABASE_URL instead, as other local accounts can read a command's arguments.",
            envvar="FEDHEALTH_DATABASE_URL",
        ),
    ] = None,
) -> None:
    """Render a site's IRB consultation template, DPA annex (TOMs) and readiness checklist."""
    from fedhealth.core import FedHealthError
    from fedhealth.dashboard import onboarding_pack, write_onboarding_pack
    from fedhealth.governance import AuditLog
    from fedhealth.orchestrator import OrchestratorHome, Store, make_engine

    orch_home = OrchestratorHome(home)
    try:
        orch_home.require()
        engine = make_engine(orch_home.database_url(database_url))
        try:
            audit = AuditLog(engine, orch_home.signing_key(), "orchestrator")
            pack = onboarding_pack(Store(engine), audit, site)
            written = write_onboarding_pack(pack, out)
        finally:
            engine.dispose()
    except FedHealthError as exc:
        fail(str(exc))
    for path in written:
        typer.echo(str(path))
