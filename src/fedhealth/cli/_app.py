"""The root ``fedhealth`` command and the registration of its command groups."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fedhealth",
    help="Federated learning for hospitals.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    app()
