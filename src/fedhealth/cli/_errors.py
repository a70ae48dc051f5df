"""The command line's one error boundary: every failure is one line ``error: <what> (<hint>)``.

Exit codes: 0 success; 1 a runtime failure (the orchestrator refused, a file is bad, a server is unreachable);
2 a usage error (an unknown option, a missing argument, a value outside its choices). A few commands document
their own extra codes (``audit verify`` exits 1 for a bad entry; ``site serve`` exits 3 when the
orchestrator refuses the site). No traceback reaches a user unless ``FEDHEALTH_DEBUG=1``.

Foreign exceptions are explained here and nowhere else: httpx connection errors (what to check), TLS
verification failures (which CA to pin), a port already in use, SQLAlchemy errors, and the orchestrator's
422 answers rendered as ``field X: rule`` in words.
"""

from __future__ import annotations

import contextlib
import errno
import os
import ssl
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as _click_errors  # type: ignore[no-redef]

from fedhealth.client import field_errors
from fedhealth.core import FedHealthError

EXIT_RUNTIME = 1
EXIT_USAGE = 2
# absent before click 8.2: then no class matches and click's usage error path applies
_NoArgsIsHelp: type[Exception] = getattr(_click_errors, "NoArgsIsHelpError", type("_Never", (Exception,), {}))
DEBUG_ENV = "FEDHEALTH_DEBUG"


class CliError(Exception):
    """Raised by a command: printed as ``error: message (hint)`` with ``code``."""

    def __init__(self, message: str, hint: str | None = None, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


def fail(message: str, hint: str | None = None, code: int = EXIT_RUNTIME) -> NoReturn:
    raise CliError(message, hint, code)


def usage(message: str, hint: str | None = None) -> NoReturn:
    raise CliError(message, hint, EXIT_USAGE)


def _printable(text: str) -> str:
    """``text`` with every control character (ESC, BEL, backspace, a lone CR...) shown as its escape: an
    error line may carry the orchestrator's or a data source's words, and a terminal would act on them
    (recolour, retitle, rewrite the line the steward reads)."""
    from fedhealth.cli._common import shown  # _common imports this module: the one sanitizer lives there

    return shown(text)


def error_line(message: str, hint: str | None = None) -> str:
    """``error: <what> (<hint>)`` on one line (newlines in either are folded, control characters escaped)."""
    what = " ".join(message.split()).removeprefix("Value error, ").replace(": Value error, ", ": ")
    what = _printable(what.rstrip(".")) or "failed"
    if hint:
        return f"error: {what} ({_printable(' '.join(hint.split()))})"
    return f"error: {what}"


def _refusal(status: int, error: str, detail: Any) -> tuple[str, str | None]:
    """An orchestrator's 4xx answer as (what, hint)."""
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        return f"the orchestrator refused the request: {field_errors(detail)}", None
    text = f"{error}: {detail}" if detail not in (None, "", []) else error
    hints = {
        401: "check the credential file; an API key may have been revoked",
        403: "this account or site is not allowed to do that",
        404: "check the name or id",
        413: "the request is larger than the orchestrator accepts",
        429: "too many requests; wait a moment and retry",
    }
    return f"the orchestrator refused the request ({status}): {text}", hints.get(status)


def explain(exc: BaseException) -> tuple[str, str | None] | None:
    """What a known exception means for the user, as (what, hint); None for an unknown one."""
    import httpx
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from fedhealth.agent import OrchestratorRefused, TlsVerificationError
    from fedhealth.client import ClientError

    if isinstance(exc, CliError):
        return exc.message, exc.hint
    if isinstance(exc, ClientError | OrchestratorRefused):
        return _refusal(exc.status, exc.error, exc.detail)
    if isinstance(exc, TlsVerificationError):
        return str(exc), None
    if isinstance(exc, httpx.TransportError):
        return _transport(exc)
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}", "check the pinned CA (ca.pem) and the URL's scheme"
    if isinstance(exc, ValidationError):
        return field_errors(exc.errors()), None
    if isinstance(exc, FedHealthError):
        return str(exc) or type(exc).__name__, None
    if isinstance(exc, SQLAlchemyError):
        cause = getattr(exc, "orig", None) or exc
        return f"database: {(str(cause).splitlines() or [type(cause).__name__])[0]}", None
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return (
                "the address is already in use",
                "another process listens there; stop it or pick another --port",
            )
        # an int filename is a file descriptor, which tells the user nothing
        where = f"{exc.filename}: " if exc.filename and not isinstance(exc.filename, int) else ""
        return f"{where}{exc.strerror or exc}", None
    return None


def _transport(exc: Any) -> tuple[str, str | None]:
    import httpx

    from fedhealth.agent import TlsVerificationError, connection_problem

    problem = connection_problem(exc)
    if isinstance(problem, TlsVerificationError):
        return str(problem), None
    url = ""
    with contextlib.suppress(RuntimeError, AttributeError):
        url = str(exc.request.url.copy_with(path="/", query=None)).rstrip("/")
    where = f" at {url}" if url else ""
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        cause = " ".join(str(exc).split()) or type(exc).__name__
        return (
            f"cannot reach the orchestrator{where}: {cause}",
            "is `fedhealth orchestrator serve` running there? check the host and port of the URL, "
            "or give --orchestrator URL",
        )
    if isinstance(exc, httpx.TimeoutException):
        return f"the orchestrator{where} did not answer in time", "it may be overloaded; retry"
    return f"the connection to the orchestrator{where} failed: {type(exc).__name__}: {exc}", None


class FedhealthGroup(TyperGroup):
    """The root command: click's own usage errors and everything a command raises become one line."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as exc:  # `fedhealth site`: the help, exit 2
            typer.echo(exc.format_message(), err=True)
            return _leave(EXIT_USAGE, standalone_mode)
        except _click_errors.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "fedhealth"
            typer.echo(error_line(exc.format_message(), f"see `{where} --help`"), err=True)
            return _leave(EXIT_USAGE, standalone_mode)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            return _leave(EXIT_RUNTIME, standalone_mode)
        except _click_errors.ClickException as exc:
            typer.echo(error_line(exc.format_message()), err=True)
            return _leave(exc.exit_code, standalone_mode)
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            return _leave(130, standalone_mode)
        except (SystemExit, typer.Exit):
            raise
        except Exception as exc:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            known = explain(exc)
            code = exc.code if isinstance(exc, CliError) else EXIT_RUNTIME
            if known is None:
                known = (
                    f"internal error: {type(exc).__name__}: {exc}",
                    f"a bug; rerun with {DEBUG_ENV}=1 for the traceback and report it",
                )
            typer.echo(error_line(*known), err=True)
            return _leave(code, standalone_mode)
        if isinstance(result, int) and not isinstance(result, bool):  # a click.Exit's code
            return _leave(result, standalone_mode)
        return _leave(0, standalone_mode)


def _leave(code: int, standalone_mode: bool) -> int:
    if standalone_mode:
        sys.exit(code)
    return code
