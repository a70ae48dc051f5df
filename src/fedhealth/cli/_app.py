"""The root ``fedhealth`` command and the registration of its command groups."""

from __future__ import annotations

import copy

import typer

from fedhealth.cli._bench import benchmark_app
from fedhealth.cli._demo import demo
from fedhealth.cli._governance import (
    approval_app,
    audit_app,
    commitment_app,
    consent_app,
    model_app,
    provenance_app,
)
from fedhealth.cli._privacy import budget_app, privacy_app
from fedhealth.cli._services import orchestrator_app, site_app, user_app

app = typer.Typer(
    name="fedhealth",
    help="Federated learning for hospitals.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(orchestrator_app, name="orchestrator")
app.add_typer(site_app, name="site")
app.add_typer(user_app, name="user")
app.command("demo")(demo)
app.add_typer(benchmark_app, name="benchmark")
app.add_typer(privacy_app, name="privacy")
site_app.add_typer(budget_app, name="budget")
site_app.add_typer(consent_app, name="consent")
# The data steward's approvals live beside the other site commands: `fedhealth site approve HASH --reason ...`
for _command in approval_app.registered_commands:
    if _command.name == "list":  # `site list` lists the sites; the steward's list is `site approvals`
        _command = copy.copy(_command)
        _command.name = "approvals"
    site_app.registered_commands.append(_command)
# ...and so does opening the site's commitments: `fedhealth site reveal-commitment-key STUDY --to ...`
site_app.registered_commands.extend(commitment_app.registered_commands)
app.add_typer(audit_app, name="audit")
app.add_typer(provenance_app, name="provenance")
app.add_typer(model_app, name="model")


def main() -> None:
    app()
