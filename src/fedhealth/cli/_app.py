"""The root ``fedhealth`` command and the registration of its command groups.

Every failure prints one line ``error: <what> (<hint>)`` (see :mod:`fedhealth.cli._errors`): exit code 1 for a
runtime failure, 2 for a usage error.
"""

from __future__ import annotations

from typing import Annotated

import typer

import fedhealth
from fedhealth.cli._bench import benchmark_app
from fedhealth.cli._demo import demo
from fedhealth.cli._errors import FedhealthGroup
from fedhealth.cli._governance import (
    approval_app,
    audit_app,
    commitment_app,
    consent_app,
    model_app,
    provenance_app,
)
from fedhealth.cli._model import model_export, model_predict, model_scaling
from fedhealth.cli._privacy import budget_app, privacy_app
from fedhealth.cli._services import orchestrator_app, site_app, user_app
from fedhealth.cli._site_check import site_check, site_readiness
from fedhealth.cli._site_datasets import dataset_app
from fedhealth.cli._stats import stats_app
from fedhealth.cli._steward import approvals_app
from fedhealth.cli._study import study_app

app = typer.Typer(
    name="fedhealth",
    help="Federated learning for hospitals.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=FedhealthGroup,
)


def _version(value: bool) -> None:
    if value:
        from fedhealth.protocol import PROTOCOL_VERSION

        typer.echo(f"fedhealth {fedhealth.__version__} (protocol {PROTOCOL_VERSION})")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Federated learning for hospitals."""


app.add_typer(orchestrator_app, name="orchestrator")
app.add_typer(site_app, name="site")
app.add_typer(user_app, name="user")
app.add_typer(study_app, name="study")
app.command("demo")(demo)
app.add_typer(benchmark_app, name="benchmark")
app.add_typer(privacy_app, name="privacy")
site_app.add_typer(budget_app, name="budget")
site_app.add_typer(consent_app, name="consent")
site_app.add_typer(dataset_app, name="dataset")
site_app.command("check")(site_check)
site_app.command("readiness")(site_readiness)
# The data steward's approvals live beside the other site commands: `fedhealth site approvals [show HASH]`,
# `fedhealth site approve HASH --reason ...`, `fedhealth site reject HASH --reason ...`.
site_app.add_typer(approvals_app, name="approvals")
for _command in approval_app.registered_commands:
    if _command.name in ("approve", "reject"):  # approval_app's `list` is `site approvals` above
        site_app.registered_commands.append(_command)
# ...and so does opening the site's commitments: `fedhealth site reveal-commitment-key STUDY --to ...`
site_app.registered_commands.extend(commitment_app.registered_commands)
app.add_typer(audit_app, name="audit")
app.add_typer(provenance_app, name="provenance")
model_app.command("predict")(model_predict)
model_app.command("export")(model_export)
model_app.command("scaling")(model_scaling)
app.add_typer(model_app, name="model")
app.add_typer(stats_app, name="stats")


def main() -> None:
    app()
