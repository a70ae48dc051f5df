"""What the command modules share: the operator credential options, JSON output, durations, log levels, and
:func:`shown`, through which every text another party wrote reaches the terminal."""

from __future__ import annotations

import json
import re
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

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

    if url is not None:
        check_url(url, "--orchestrator")
    if credential.is_dir() and not credential.is_symlink():
        fail(f"credential file {credential} is a folder", "give --credential FILE")
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


# Characters Python counts as printable that show as nothing (Hangul fillers, the combining grapheme
# joiner, Khmer inherent vowels, the braille blank): text could hide behind them as behind a zero-width space.
_BLANK_LOOKING = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")


def _visible(ch: str) -> str:
    if ch.isprintable() and ch not in _BLANK_LOOKING:
        return ch
    return ch.encode("unicode_escape").decode("ascii")  # \x1b, \r, \n, \u202e, \U000e0041


def shown(text: object) -> str:
    """``text`` as one line a terminal prints and never acts on: every control character (ESC, BEL, a
    carriage return, a backspace, a newline, C1 controls), every bidi control (U+202A-202E, U+2066-2069),
    every invisible or format character (zero-width space and joiners, U+2028, a BOM, tag characters) and
    every space other than U+0020 is shown as its escape (``\\x1b``, ``\\u202e``), so whatever a study
    spec, a site, the orchestrator or another operator wrote can neither recolour, retitle, rewrite nor
    reorder what is read, nor hide part of itself. Nothing is cut: a long line is printed whole."""
    value = str(text)
    if value.isprintable() and _BLANK_LOOKING.isdisjoint(value):
        return value
    return "".join(_visible(ch) for ch in value)


def shown_lines(text: str) -> str:
    """A multi-line text another party wrote (a Markdown model card the orchestrator rendered) with every
    line :func:`shown`: its newlines are kept, every other control or invisible character is escaped."""
    return "\n".join(shown(line) for line in text.split("\n"))


def shown_cell(text: object) -> Any:
    """:func:`shown` as a rich ``Text`` cell: rich reads no markup in it (``[link=...]``, ``[/]``)."""
    from rich.text import Text

    return Text(shown(text))


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


def check_url(url: str, option: str) -> str:
    """``url`` if it is an http(s) URL with a host (and a port in range, if it names one); a usage error
    otherwise, before anything is read, written or sent."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        usage(f"{option} {url!r} is not a usable URL ({exc})", "e.g. https://fl.example.org:8443")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        usage(f"{option} {url!r} is not an http(s) URL with a host", "e.g. https://fl.example.org:8443")
    return url


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.ASCII)
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_APPROVAL_WAIT_S = 366 * 86400.0  # the orchestrator's own bound on a study's approval wait


def parse_duration(text: str, option: str, most: float = MAX_APPROVAL_WAIT_S) -> float:
    """``90``, ``90s``, ``15m``, ``12h`` or ``7d`` in seconds, at most ``most`` (a usage error otherwise)."""
    found = _DURATION.match(text.lower())
    if found is None or float(found.group(1)) <= 0:
        usage(f"{option} {text!r} is not a duration", "e.g. 90s, 15m, 12h or 7d")
    seconds = float(found.group(1)) * _UNIT_S[found.group(2)]
    if not seconds <= most:  # float("9" * 400) is inf
        usage(f"{option} {text!r} is longer than {most / 86400:g} days", "e.g. 90s, 15m, 12h or 7d")
    return seconds
