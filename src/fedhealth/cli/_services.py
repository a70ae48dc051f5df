"""``fedhealth orchestrator ...``, ``fedhealth site ...``, ``fedhealth user ...``: run and administer the
services. Imports of the heavy service modules happen inside the commands, so ``--help`` stays fast."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import typer

from fedhealth.cli._common import (
    JsonOption,
    LogLevel,
    check_url,
    operator_client,
    parse_duration,
    print_json,
    shown,
)
from fedhealth.cli._errors import error_line, explain, fail, usage
from fedhealth.core import FedHealthError, InputError, Tightened, is_valid_name

if TYPE_CHECKING:
    from fedhealth.client import OperatorClient

orchestrator_app = typer.Typer(help="Run and administer the orchestrator.", no_args_is_help=True)
site_app = typer.Typer(help="Enroll, run and administer site agents.", no_args_is_help=True)
user_app = typer.Typer(help="Operator accounts (admin only).", no_args_is_help=True)

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
InsecureOption = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Allow a plain http:// orchestrator URL (local tests only: credentials cross in clear).",
    ),
]


@contextmanager
def friendly_errors() -> Iterator[None]:
    """One plain line on stderr (``error: what (hint)``) and exit code 1 for any fedhealth, file or
    connection error; no tracebacks for users. (Plain text: a message's brackets are not markup.)"""
    import httpx

    try:
        yield
    except (FedHealthError, OSError, httpx.HTTPError) as exc:
        known = explain(exc)
        typer.echo(error_line(*(known or (str(exc), None))), err=True)
        raise typer.Exit(1) from exc


def _operator(credential: Path, url: str | None, insecure: bool = False) -> OperatorClient:
    return operator_client(credential, url, insecure)


class UserRole(StrEnum):
    """The roles an operator account may have (sites enroll; they are not users)."""

    ADMIN = "admin"
    RESEARCHER = "researcher"
    AUDITOR = "auditor"


def _setup_logging(level: LogLevel) -> None:
    logging.basicConfig(level=level.value.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


# --- orchestrator ------------------------------------------------------------------------------------------


@orchestrator_app.command("init")
def orchestrator_init(
    home: Annotated[Path, typer.Argument(help="New folder for the federation's keys, settings and state.")],
    host: Annotated[
        list[str] | None, typer.Option(help="Host name or IP the TLS certificate covers (repeatable).")
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port the orchestrator will serve on.")] = 8443,
    url: Annotated[str | None, typer.Option(help="Public URL (default https://<first host>:<port>).")] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL (default: SQLite in HOME/state). A URL with a password: set "
            "FEDHEALTH_DATABASE_URL instead, as other local accounts can read a command's arguments.",
            envvar="FEDHEALTH_DATABASE_URL",
        ),
    ] = None,
) -> None:
    """Create a federation: its CA, the orchestrator's TLS certificate and signing key, the database and a
    first admin credential."""
    from fedhealth.orchestrator import init_home

    hosts = host or ["localhost", "127.0.0.1"]
    for name in hosts:  # checked before anything is written: a bad one would leave half a home behind
        if not _is_host(name):
            usage(f"--host {name!r} is not a host name or an IP address", "e.g. fl.example.org or 10.0.0.5")
    url_host = f"[{hosts[0]}]" if ":" in hosts[0] else hosts[0]
    if url is not None:
        check_url(url, "--url")
    if database_url is not None:
        _check_database_url(database_url)
    with friendly_errors():
        init_home(home, hosts=hosts, url=url or f"https://{url_host}:{port}", database_url=database_url)
    typer.echo(f"federation created in {home}")
    typer.echo(f"  CA certificate (give it to each site): {home / 'ca.pem'}")
    typer.echo(f"  admin credential (keep it secret):     {home / 'admin.credential'}")
    typer.echo(f"  serve it with: fedhealth orchestrator serve --home {home} --port {port}")


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z", re.ASCII)


def _is_host(name: str) -> bool:
    """An IP address, or a DNS name of ASCII labels (what a TLS certificate can name)."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return 0 < len(name) <= 253 and all(
        _HOST_LABEL.match(label) for label in name.removesuffix(".").split(".")
    )


def _check_database_url(database_url: str) -> None:
    """A usage error, before anything is written, for a database URL SQLAlchemy cannot use (the URL itself
    is not echoed: it may hold a password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(database_url).get_dialect()
    except (ArgumentError, ImportError, ValueError) as exc:
        usage(
            f"--database-url is not a usable database URL ({exc})", "e.g. postgresql+psycopg://user@db/name"
        )


def _secure_home(tightened: Tightened, home: Path) -> None:
    """A service's files are its own from here on (keys, databases and their -wal/-shm, blobs, logs it
    writes), and one warning line names anything in its home that was readable by others."""
    os.umask(0o077)
    if tightened:
        typer.echo(f"warning: {home}: {tightened.summary()}", err=True)  # one line, never wrapped


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@orchestrator_app.command("serve")
def orchestrator_serve(
    home: Annotated[Path, typer.Option(help="The folder `orchestrator init` created.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8443,
    insecure: Annotated[
        bool, typer.Option(help="Serve plain HTTP (testing only; prints a warning).")
    ] = False,
    mtls: Annotated[bool, typer.Option(help="Require client certificates from the federation CA.")] = False,
    enroll_port: Annotated[
        int | None,
        typer.Option(
            min=0, max=65535, help="Also listen here, without client certificates, for enrollment only."
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL (overrides the home's setting). A URL with a password: set "
            "FEDHEALTH_DATABASE_URL instead, as other local accounts can read a command's arguments.",
            envvar="FEDHEALTH_DATABASE_URL",
        ),
    ] = None,
    ready_file: Annotated[Path | None, typer.Option(help="Write {url, pid} here once ready.")] = None,
    fsync: Annotated[
        bool, typer.Option(help="fsync every commit and blob (survives power loss, slower).")
    ] = False,
    max_body_mb: Annotated[
        int, typer.Option(min=1, max=1 << 20, help="Largest request body accepted, in MiB.")
    ] = 512,
    rate_limit: Annotated[
        float, typer.Option(min=0, help="Requests per second per site or user (0: off).")
    ] = 200.0,
    approval_wait: Annotated[
        str, typer.Option(help="How long a study waits for its sites' approvals by default (e.g. 12h, 7d).")
    ] = "7d",
    log_level: Annotated[LogLevel, typer.Option(help="How much to log.")] = LogLevel.INFO,
    dashboard: Annotated[
        bool, typer.Option(help="Serve the governance dashboard under /ui (needs fedhealth[dashboard]).")
    ] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0, max=65535, help="Serve Prometheus metrics on this port (0: any free port; default: off)."
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address of the metrics listener (keep it local: metrics carry no auth).")
    ] = "127.0.0.1",
    drift_warn: Annotated[
        float, typer.Option(help="Feature drift: a PSI at or above this is a warning (dashboard, audit).")
    ] = 0.1,
    drift_alert: Annotated[
        float, typer.Option(help="Feature drift: a PSI at or above this is an alert (dashboard, audit).")
    ] = 0.25,
    drift_dataset: Annotated[
        list[str] | None,
        typer.Option(
            help="One dataset's own drift thresholds, DATASET=WARN,ALERT (repeatable; e.g. "
            "heart-disease=0.05,0.2); other datasets use --drift-warn/--drift-alert."
        ),
    ] = None,
) -> None:
    """Serve the agent API, the operator API and the dashboard (/ui) on one HTTPS port."""
    from fedhealth.orchestrator import OrchestratorHome, OrchestratorSettings, TlsFiles, serve

    orch_home = OrchestratorHome(home)
    if not math.isfinite(rate_limit):
        usage(f"--rate-limit {rate_limit!r} is not a finite number of requests per second", "0 turns it off")
    if database_url is not None:
        _check_database_url(database_url)
    approval_wait_s = parse_duration(approval_wait, "--approval-wait")
    # built (and so checked: drift thresholds, installed assets) before anything else is touched
    extensions = _serve_extensions(
        dashboard=dashboard,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        drift=(drift_warn, drift_alert),
        drift_datasets=drift_dataset or (),
    )
    with friendly_errors():
        orch_home.require()
        _secure_home(orch_home.secure(), home)
        _check_port(host, port)
        note = _follow_port(orch_home, port, insecure=insecure)
        settings = OrchestratorSettings(
            state_dir=orch_home.state_dir,
            signing_key=orch_home.signing_key(),
            ca=orch_home.ca() if orch_home.ca_key.exists() else None,
            database_url=orch_home.database_url(database_url),
            fsync=fsync,
            max_body_bytes=max_body_mb << 20,
            rate_per_s=rate_limit,
            rate_burst=max(1, int(rate_limit * 2)),
            approval_wait_s=approval_wait_s,
        )
    if note is not None:
        typer.echo(note, err=True)
    if insecure:
        typer.echo("warning: --insecure: serving plain HTTP; use it only for local tests", err=True)
        tls = None
    else:
        tls = TlsFiles(
            cert=orch_home.tls_cert, key=orch_home.tls_key, ca=orch_home.ca_cert, require_client_cert=mtls
        )
    try:  # the port was free a moment ago; another process may still take it first
        serve(
            settings,
            host=host,
            port=port,
            tls=tls,
            enroll_port=enroll_port,
            ready_file=ready_file,
            log_level=log_level.value,
            extensions=extensions,
        )
    except OSError as exc:
        _explain_bind(exc, host, port)
        raise


def _serve_extensions(
    *,
    dashboard: bool,
    metrics_port: int | None,
    metrics_host: str,
    drift: tuple[float, float] | None = None,
    drift_datasets: Sequence[str] = (),
) -> list[Any]:
    """The orchestrator's default extensions, plus the dashboard and the Prometheus metrics (they sit above
    the orchestrator in the layers, so the command adds them, not the orchestrator)."""
    from fedhealth.orchestrator import default_extensions

    extensions: list[Any] = list(default_extensions())
    if metrics_port is not None:
        try:
            from fedhealth.dashboard import MetricsExtension
        except ImportError as exc:
            fail(f"metrics cannot be served: {exc}", "pip install 'fedhealth[dashboard]'")
        extensions.append(MetricsExtension(metrics_port, host=metrics_host))
    if dashboard:
        try:
            from fedhealth.dashboard import DashboardExtension, DriftPolicy, DriftThresholds

            try:
                default = DriftThresholds(*drift) if drift is not None else DriftThresholds()
            except InputError as exc:
                usage(f"--drift-warn/--drift-alert: {exc}")
            try:
                policy = DriftPolicy.parse(default, drift_datasets)
            except InputError as exc:
                usage(f"--drift-dataset: {exc}")
            extensions.append(DashboardExtension(drift=policy))
        except (ImportError, FedHealthError) as exc:
            hint = "pip install 'fedhealth[dashboard]', or serve with --no-dashboard"
            fail(f"the dashboard cannot be served: {exc}", hint)
    return extensions


def _explain_bind(exc: OSError, host: str, port: int) -> None:
    if exc.errno == errno.EADDRINUSE:
        fail(
            f"cannot listen on {host}:{port}: the port is already in use",
            "stop the other process using it, or serve on another --port",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        fail(
            f"cannot listen on {host}:{port}: no such address here", "give --host an address of this machine"
        )


def _check_port(host: str, port: int) -> None:
    """Fail in one line, before anything is recorded or started, if the address cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror:
            fail(f"cannot listen on {host}:{port}: no such address", "give --host an address of this machine")
        except OSError as exc:
            _explain_bind(exc, host, port)
            raise


def _follow_port(home: object, port: int, *, insecure: bool) -> str | None:
    """Serving on another port than the URL `orchestrator init` recorded: update the recorded URL and the
    admin credential to it (the credential would otherwise point operators at the wrong port), and say so
    in one line. Port 0 (any free port) leaves them alone: the port is not known yet."""
    from fedhealth.orchestrator import OrchestratorHome
    from fedhealth.protocol import OperatorCredential

    assert isinstance(home, OrchestratorHome)
    settings = home.settings()
    recorded = str(settings.get("url") or "")
    parts = urlsplit(recorded)
    if port == 0 or not parts.hostname or parts.port == port:
        return None
    scheme = "http" if insecure else parts.scheme
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    new_url = urlunsplit((scheme, f"{host}:{port}", parts.path, "", ""))
    settings["url"] = new_url
    from fedhealth.crypto import write_private

    write_private(home.settings_path, json.dumps(settings, indent=2).encode())
    if home.admin_credential.exists():
        credential = OperatorCredential.model_validate_json(home.admin_credential.read_text())
        if credential.orchestrator == recorded:
            updated = credential.model_copy(update={"orchestrator": new_url})
            home.admin_credential.unlink()
            write_private(home.admin_credential, updated.model_dump_json(indent=2).encode())
    return (
        f"note: serving on port {port}, not the {parts.port or 'default'} recorded at init: "
        f"the recorded URL and admin.credential now say {new_url}"
    )


# --- sites -------------------------------------------------------------------------------------------------


@site_app.command("add")
def site_add(
    name: Annotated[str, typer.Argument(help="The new site's name (lowercase letters, digits, - _ .).")],
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Register a site and print its one-time enrollment token (valid 24 h)."""
    with friendly_errors(), _operator(credential, orchestrator, insecure) as client:
        created = client.add_site(name)
    typer.echo(created.enrollment_token)
    typer.echo(
        f"site {name} registered; the token above expires at {created.expires_at:%Y-%m-%d %H:%M} UTC. "
        "Give it, with ca.pem from the orchestrator's home, to the site's administrator for `site enroll`.",
        err=True,
    )


@site_app.command("token")
def site_token(
    name: Annotated[str, typer.Argument(help="An existing site.")],
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Issue a fresh enrollment token for a site that has not enrolled yet (a lost token); the site's earlier
    tokens stop working. An enrolled site is re-keyed with `site rotate`."""
    with friendly_errors(), _operator(credential, orchestrator, insecure) as client:
        created = client.new_enrollment_token(name)
    typer.echo(created.enrollment_token)


@site_app.command("rotate")
def site_rotate(
    name: Annotated[str, typer.Argument(help="The enrolled site to re-key.")],
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Re-key a site: its current key, access tokens and client certificate stop working at once; print the
    enrollment token for its new key (the site enrolls again with it, into a new --home)."""
    with friendly_errors(), _operator(credential, orchestrator, insecure) as client:
        created = client.rotate_site(name)
    typer.echo(created.enrollment_token)
    typer.echo(
        f"site {name} rotated: its old key is retired; the token above expires at "
        f"{created.expires_at:%Y-%m-%d %H:%M} UTC",
        err=True,
    )


@site_app.command("revoke")
def site_revoke(
    name: Annotated[str, typer.Argument(help="The site to revoke.")],
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Revoke a site: its next request is refused (403)."""
    with friendly_errors(), _operator(credential, orchestrator, insecure) as client:
        info = client.revoke_site(name)
    typer.echo(f"site {shown(info.name)} is {shown(info.status)}")


@site_app.command("list")
def site_list(
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    as_json: JsonOption = False,
    insecure: InsecureOption = False,
) -> None:
    """List the sites: state, last contact, the fedhealth version each runs, and its readiness."""
    with friendly_errors(), _operator(credential, orchestrator, insecure) as client:
        found = client.sites()
        readiness = {r.site: r.readiness for r in _readiness_or_empty(client)}
    if as_json:
        print_json([{**s.model_dump(mode="json"), "readiness": readiness.get(s.name)} for s in found])
        return
    for s in found:
        seen = f"{s.last_seen_at:%Y-%m-%d %H:%M:%S}" if s.last_seen_at else "never"
        version = f"fedhealth {s.software_version}" if s.software_version else "version unknown"
        ready = readiness.get(s.name)
        check = "not checked" if ready is None else ("ready" if ready.ready else "NOT READY")
        typer.echo(f"{shown(s.name)}\t{shown(s.status)}\tlast seen {seen}\t{shown(version)}\t{check}")


def _readiness_or_empty(client: OperatorClient) -> list[object]:
    from fedhealth.client import ClientError

    try:
        return list(client.site_readiness())
    except ClientError as exc:
        if exc.status == 404:  # an orchestrator from before readiness reports
            return []
        raise


@site_app.command("enroll")
def site_enroll(
    orchestrator: Annotated[str, typer.Option(help="The orchestrator's URL.")],
    ca: Annotated[
        Path,
        typer.Option(help="The federation CA certificate to pin: ca.pem from the orchestrator's home."),
    ],
    name: Annotated[str, typer.Option(help="This site's name, as registered.")],
    home: Annotated[Path, typer.Option(help="Folder for this site's identity key and settings.")] = Path(
        "fedhealth-site"
    ),
    serve_url: Annotated[
        str | None,
        typer.Option(help="Under mutual TLS: the main URL (--orchestrator is the enrollment port)."),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="A file holding the one-time enrollment token from `site add` (else: standard input)."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="The token itself. Avoid: every local account sees a command's arguments (`ps`) while it "
            "runs; give --token-file or pipe the token in."
        ),
    ] = None,
    insecure: InsecureOption = False,
) -> None:
    """Generate this site's identity key locally, register its public key and pin the federation CA.

    The one-time enrollment token comes from --token-file, else from standard input (piped, or typed at a
    hidden prompt): never from the command line, where other local accounts can read it."""
    from fedhealth.agent import SiteHome, enroll_site

    check_url(orchestrator, "--orchestrator")
    if serve_url is not None:
        check_url(serve_url, "--serve-url")
    if not is_valid_name(name):
        usage(
            f"--name {name!r} is not a site name",
            "lowercase letters, digits, '-', '_' or '.', starting with a letter or digit, at most 63 long",
        )
    if home.exists() and not home.is_dir():
        fail(f"{home} is not a folder", "give --home a new folder, or the folder of an earlier enrollment")
    token = _enrollment_token(token_file, token)
    with friendly_errors():
        if SiteHome(home).identity_path.exists():
            raise FedHealthError(f"{home} already holds an identity key; use another --home to enroll anew")
        if not ca.is_file():
            fail(
                f"CA file {ca} not found",
                "copy ca.pem from the orchestrator's home (the folder given to `orchestrator init`), "
                "as the orchestrator's operator gives it to you",
            )
        ca_pem = ca.read_bytes()
        if not ca_pem.isascii():
            fail(f"CA file {ca} is not a PEM certificate", "give ca.pem from the orchestrator's home")
        enrolled = enroll_site(
            home,
            name=name,
            orchestrator=orchestrator,
            token=token,
            ca_pem=ca_pem,
            serve_url=serve_url,
            insecure=insecure,
        )
    typer.echo(f"site {name} enrolled; identity key in {enrolled.identity_path} (mode 0600)")


def _enrollment_token(token_file: Path | None, token: str | None) -> str:
    """The enrollment token from the file, the option (with a warning) or standard input, stripped."""
    if token_file is not None and token is not None:
        usage(
            "give the enrollment token once",
            "--token-file FILE, or pipe it in; not both --token-file and --token",
        )
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8")
        except OSError as exc:
            fail(f"cannot read the enrollment token from {token_file}: {exc.strerror or exc}")
        except UnicodeDecodeError:
            fail(
                f"cannot read the enrollment token from {token_file}: not text",
                "give the file `site add` wrote",
            )
    elif token is not None:
        typer.echo(
            "warning: --token puts the enrollment token where every local account can read it (the process "
            "list); use --token-file FILE or pipe it in",
            err=True,
        )
        text = token
    elif sys.stdin.isatty():
        text = typer.prompt("enrollment token", hide_input=True)
    else:
        text = sys.stdin.readline()
    value = text.strip()
    if not value or any(c.isspace() for c in value):
        usage(
            "no enrollment token",
            "give the one-time token of `fedhealth site add`: --token-file FILE or on stdin",
        )
    return value


def _parse_datasets(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, uri = value.partition("=")
        if not sep or not name or not uri:
            raise typer.BadParameter(f"expected NAME=URI, got {value!r}", param_hint="--dataset")
        out[name] = uri
    return out


@site_app.command("serve")
def site_serve(
    home: Annotated[Path, typer.Option(help="The folder `site enroll` created.")] = Path("fedhealth-site"),
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=URI of a local dataset, e.g. heart-disease=builtin://heart-disease/0 (repeatable)."
        ),
    ] = None,
    orchestrator: UrlOption = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder of downloaded datasets (default $FEDHEALTH_DATA_DIR).")
    ] = None,
    poll_wait: Annotated[float, typer.Option(min=0, max=60, help="Long-poll wait, seconds.")] = 25.0,
    log_level: Annotated[LogLevel, typer.Option(help="How much to log.")] = LogLevel.INFO,
    insecure: InsecureOption = False,
) -> None:
    """Run the site agent: poll the orchestrator for tasks and train on local data.

    Uses the datasets registered with `site dataset add` (a --dataset of the same name overrides one);
    each is checked before the first poll, and a dataset that fails its check stops the agent at once."""
    from fedhealth.agent import (
        AgentSettings,
        RetryPolicy,
        SiteHome,
        datasets_for_serve,
        default_gates,
        run_agent,
    )

    _setup_logging(log_level)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    site_home = SiteHome(home)
    overrides = _parse_datasets(dataset or [])
    if orchestrator is not None:
        check_url(orchestrator, "--orchestrator")
    with friendly_errors():
        site_home.require()
        _secure_home(site_home.secure(), home)
        datasets, checked = datasets_for_serve(site_home, overrides, data_dir)
        for summary in checked:
            logging.getLogger("fedhealth.agent").info(
                "dataset %s: %d rows, %d features", summary.name, summary.rows, len(summary.features)
            )
        if not datasets:
            typer.echo(
                "warning: no datasets registered; a study that reads data will fail here "
                "(add one with `fedhealth site dataset add`)",
                err=True,
            )
        settings = AgentSettings(
            orchestrator_url=orchestrator or site_home.orchestrator,
            site=site_home.name,
            identity=site_home.identity(),
            ca_pem=site_home.ca_pem(),
            client_cert=site_home.client_cert(),
            datasets=datasets,
            data_dir=data_dir,
            poll_wait_s=poll_wait,
            retry=RetryPolicy(base_s=0.1, max_s=5.0),
            home=home,
            insecure=insecure,
        )
        gates = default_gates(site_home)
    with friendly_errors():  # e.g. a plain http:// URL without --insecure
        code = run_agent(settings, gates)
    sys.exit(code)


# --- users -------------------------------------------------------------------------------------------------


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="The user's name.")],
    role: Annotated[UserRole, typer.Option(help="What the account may do.")],
    out: Annotated[
        Path | None, typer.Option(help="Write the new user's credential file here (mode 0600).")
    ] = None,
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Create an operator account; its API key is shown once."""
    from fedhealth.crypto import write_private
    from fedhealth.protocol import OperatorCredential

    with friendly_errors(), _operator(credential, orchestrator, insecure) as client:
        created = client.add_user(name, role.value)
        admin = client.read_credential(credential)  # checked as when the client was made
    if out is not None:
        new = OperatorCredential(
            orchestrator=orchestrator or admin.orchestrator,
            ca_pem=admin.ca_pem,
            user=name,
            api_key=created.api_key,
        )
        write_private(out, new.model_dump_json(indent=2).encode())
        typer.echo(f"user {name} ({role.value}) created; credential written to {out}")
    else:
        typer.echo(created.api_key)


@user_app.command("list")
def user_list(
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    as_json: JsonOption = False,
    insecure: InsecureOption = False,
) -> None:
    """List operator accounts."""
    with friendly_errors(), _operator(credential, orchestrator, insecure) as client:
        users = client.users()
    if as_json:
        print_json(users)
        return
    for u in users:
        typer.echo(f"{shown(u.name)}\t{u.role.value}\t{'revoked' if u.revoked_at else 'active'}")


@user_app.command("new-key")
def user_new_key(
    name: Annotated[str, typer.Argument(help="The user whose API key to replace.")],
    out: Annotated[
        Path | None, typer.Option(help="Write the user's new credential file here (mode 0600).")
    ] = None,
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Replace a user's API key (a lost or leaked key): the old key and its tokens stop working at once."""
    from fedhealth.crypto import write_private
    from fedhealth.protocol import OperatorCredential

    with friendly_errors(), _operator(credential, orchestrator, insecure) as client:
        created = client.new_api_key(name)
        admin = client.read_credential(credential)  # checked as when the client was made
    if out is not None:
        new = OperatorCredential(
            orchestrator=orchestrator or admin.orchestrator,
            ca_pem=admin.ca_pem,
            user=name,
            api_key=created.api_key,
        )
        write_private(out, new.model_dump_json(indent=2).encode())
        typer.echo(f"user {name}: new API key written to {out}")
    else:
        typer.echo(created.api_key)


@user_app.command("revoke")
def user_revoke(
    name: Annotated[str, typer.Argument(help="The user to revoke.")],
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    insecure: InsecureOption = False,
) -> None:
    """Revoke a user: their next request is refused (403)."""
    with friendly_errors(), _operator(credential, orchestrator, insecure) as client:
        client.revoke_user(name)
    typer.echo(f"user {name} is revoked")


@site_app.command("dashboard")
def site_dashboard(
    home: Annotated[Path, typer.Option(help="The folder `site enroll` created.")] = Path("fedhealth-site"),
    host: Annotated[str, typer.Option(help="Address to listen on (keep it local).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8765,
    steward: Annotated[str | None, typer.Option(help="Your name (default: the current user).")] = None,
    ready_file: Annotated[
        Path | None, typer.Option(help="Write {url, login_url, pid} here (mode 0600) once listening.")
    ] = None,
    log_level: Annotated[LogLevel, typer.Option(help="How much to log.")] = LogLevel.WARNING,
) -> None:
    """The data steward's dashboard in a browser: the approvals queue (read a spec, approve or refuse it with
    a reason). Prints a one-time sign-in link (`fedhealth site dashboard-link` prints a new one)."""
    import getpass

    from fedhealth.agent import SiteHome

    with friendly_errors():
        site_home = SiteHome(home)
        site_home.require()
        try:
            from fedhealth.dashboard import serve_site_dashboard
        except ImportError as exc:
            fail(f"the dashboard cannot be served: {exc}", "pip install 'fedhealth[dashboard]'")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        serve_site_dashboard(
            site_home,
            host=host,
            port=port,
            steward=steward or getpass.getuser(),
            ready_file=ready_file,
            log_level=log_level.value,
        )
    except KeyboardInterrupt:
        return
    except OSError as exc:
        _explain_bind(exc, host, port)
        raise


@site_app.command("dashboard-link")
def site_dashboard_link(
    home: Annotated[Path, typer.Option(help="The folder `site enroll` created.")] = Path("fedhealth-site"),
) -> None:
    """Print a fresh one-time sign-in link (void after 15 minutes) to the site dashboard running for this
    home: after a session ended (8 hours, or signed out) or the first link expired unused."""
    from fedhealth.agent import SiteHome

    with friendly_errors():
        site_home = SiteHome(home)
        site_home.require()
        try:
            from fedhealth.dashboard import site_dashboard_link as signed_link
        except ImportError as exc:
            fail(f"the dashboard cannot be served: {exc}", "pip install 'fedhealth[dashboard]'")
        typer.echo(signed_link(site_home))
