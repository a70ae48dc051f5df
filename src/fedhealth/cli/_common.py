"""What the command modules share: the operator credential options, JSON output, durations, log levels."""

from __future__ import annotations

import json
import re
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import BaseModel

from fedhealth.cli._errors import fail, usage

if TYPE_CHECKING:
    from fedhealth.client import OperatorClient

CredentialOption = Annotated[
    Path,
    typer.Option(
        "--credential",
        envvar="FEDHEALTH_CREDENTIAL",
        help="Operator credential file (written by `orchestrator init` or `user add`).",
    ),
]
UrlOption = Annotated[
    str | None, typer.Option("--orchestrator", help="Override the credential's orchestrator URL.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def operator_client(credential: Path, url: str | None, insecure: bool = False) -> OperatorClient:
    """The operator API client of a credential file (a missing file is one clear line)."""
    from pydantic import ValidationError

    from fedhealth.client import OperatorClient

    if not credential.exists() and not credential.is_symlink():  # anything else: read_credential says why
        fail(
            f"credential file {credential} not found",
            "give --credential FILE or set FEDHEALTH_CREDENTIAL; `orchestrator init` writes admin.credential "
            "in the orchestrator's home",
        )
    try:
        return OperatorClient.from_credential(credential, url=url, insecure=insecure)
    except (ValidationError, ValueError) as exc:
        fail(f"{credential} is not a fedhealth credential file ({type(exc).__name__})")


def print_json(value: Any) -> None:
    """Pydantic models, lists of them, or plain JSON data, indented, to stdout."""
    typer.echo(json.dumps(_plain(value), indent=2, sort_keys=True))


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, option: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h`` or ``7d`` in seconds (a usage error otherwise)."""
    found = _DURATION.match(text.lower())
    if found is None or float(found.group(1)) <= 0:
        usage(f"{option} {text!r} is not a duration", "e.g. 90s, 15m, 12h or 7d")
    return float(found.group(1)) * _UNIT_S[found.group(2)]
