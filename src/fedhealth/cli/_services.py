"""``fedhealth orchestrator ...``, ``fedhealth site ...``, ``fedhealth user ...``: run and administer the
services. Imports of the heavy service modules happen inside the commands, so ``--help`` stays fast."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from fedhealth.core import FedHealthError, Tightened

if TYPE_CHECKING:
    from fedhealth.client import OperatorClient

orchestrator_app = typer.Typer(help="Run and administer the orchestrator.", no_args_is_help=True)
site_app = typer.Typer(help="Enroll, run and administer site agents.", no_args_is_help=True)
user_app = typer.Typer(help="Operator accounts (admin only).", no_args_is_help=True)
err = Console(stderr=True)

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
    """One clear line on stderr and exit code 1 for any fedhealth error; no tracebacks for users."""
    try:
        yield
    except FedHealthError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    except OSError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from exc


def _operator(credential: Path, url: str | None, insecure: bool = False) -> OperatorClient:
    from fedhealth.client import OperatorClient

    if not credential.exists():
        raise FedHealthError(
            f"credential file {credential} not found (set --credential or FEDHEALTH_CREDENTIAL)"
        )
    return OperatorClient.from_credential(credential, url=url, insecure=insecure)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


# --- orchestrator ------------------------------------------------------------------------------------------


@orchestrator_app.command("init")
def orchestrator_init(
    home: Annotated[Path, typer.Argument(help="New folder for the federation's keys, settings and state.")],
    host: Annotated[
        list[str] | None, typer.Option(help="Host name or IP the TLS certificate covers (repeatable).")
    ] = None,
    port: Annotated[int, typer.Option(help="Port the orchestrator will serve on.")] = 8443,
    url: Annotated[str | None, typer.Option(help="Public URL (default https://<first host>:<port>).")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (default: SQLite in HOME/state).")
    ] = None,
) -> None:
    """Create a federation: its CA, the orchestrator's TLS certificate and signing key, the database and a
    first admin credential."""
    from fedhealth.orchestrator import init_home

    hosts = host or ["localhost", "127.0.0.1"]
    with friendly_errors():
        init_home(home, hosts=hosts, url=url or f"https://{hosts[0]}:{port}", database_url=database_url)
    typer.echo(f"federation created in {home}")
    typer.echo(f"  CA certificate (give it to each site): {home / 'ca.pem'}")
    typer.echo(f"  admin credential (keep it secret):     {home / 'admin.credential'}")


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
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8443,
    insecure: Annotated[
        bool, typer.Option(help="Serve plain HTTP (testing only; prints a warning).")
    ] = False,
    mtls: Annotated[bool, typer.Option(help="Require client certificates from the federation CA.")] = False,
    enroll_port: Annotated[
        int | None, typer.Option(help="Also listen here, without client certificates, for enrollment only.")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL (overrides the home's setting).")
    ] = None,
    ready_file: Annotated[Path | None, typer.Option(help="Write {url, pid} here once ready.")] = None,
    fsync: Annotated[
        bool, typer.Option(help="fsync every commit and blob (survives power loss, slower).")
    ] = False,
    max_body_mb: Annotated[int, typer.Option(help="Largest request body accepted, in MiB.")] = 512,
    rate_limit: Annotated[float, typer.Option(help="Requests per second per site or user (0: off).")] = 200.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the agent API and the operator API on one HTTPS port."""
    from fedhealth.orchestrator import OrchestratorHome, OrchestratorSettings, TlsFiles, serve

    orch_home = OrchestratorHome(home)
    with friendly_errors():
        orch_home.require()
        _secure_home(orch_home.secure(), home)
        settings = OrchestratorSettings(
            state_dir=orch_home.state_dir,
            signing_key=orch_home.signing_key(),
            ca=orch_home.ca() if orch_home.ca_key.exists() else None,
            database_url=orch_home.database_url(database_url),
            fsync=fsync,
            max_body_bytes=max_body_mb << 20,
            rate_per_s=rate_limit,
            rate_burst=max(1, int(rate_limit * 2)),
        )
    if insecure:
        err.print("[yellow]warning:[/] --insecure: serving plain HTTP; use it only for local tests")
        tls = None
    else:
        tls = TlsFiles(
            cert=orch_home.tls_cert, key=orch_home.tls_key, ca=orch_home.ca_cert, require_client_cert=mtls
        )
    serve(
        settings,
        host=host,
        port=port,
        tls=tls,
        enroll_port=enroll_port,
        ready_file=ready_file,
        log_level=log_level,
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
    err.print(f"site {name} registered; the token above expires at {created.expires_at:%Y-%m-%d %H:%M} UTC")


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
    err.print(
        f"site {name} rotated: its old key is retired; the token above expires at "
        f"{created.expires_at:%Y-%m-%d %H:%M} UTC"
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
    typer.echo(f"site {info.name} is {info.status}")


@site_app.command("list")
def site_list(
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    insecure: InsecureOption = False,
) -> None:
    """List the sites and their state."""
    with friendly_errors(), _operator(credential, orchestrator, insecure) as client:
        for s in client.sites():
            seen = f"{s.last_seen_at:%Y-%m-%d %H:%M:%S}" if s.last_seen_at else "never"
            typer.echo(f"{s.name}\t{s.status}\tlast seen {seen}")


@site_app.command("enroll")
def site_enroll(
    orchestrator: Annotated[str, typer.Option(help="The orchestrator's URL.")],
    token: Annotated[str, typer.Option(help="The one-time enrollment token from `site add`.")],
    ca: Annotated[Path, typer.Option(help="The federation CA certificate (ca.pem) to pin.")],
    name: Annotated[str, typer.Option(help="This site's name, as registered.")],
    home: Annotated[Path, typer.Option(help="Folder for this site's identity key and settings.")] = Path(
        "fedhealth-site"
    ),
    serve_url: Annotated[
        str | None,
        typer.Option(help="Under mutual TLS: the main URL (--orchestrator is the enrollment port)."),
    ] = None,
    insecure: InsecureOption = False,
) -> None:
    """Generate this site's identity key locally, register its public key and pin the federation CA."""
    from fedhealth.agent import SiteHome, enroll_site

    with friendly_errors():
        if SiteHome(home).identity_path.exists():
            raise FedHealthError(f"{home} already holds an identity key; use another --home to enroll anew")
        enrolled = enroll_site(
            home,
            name=name,
            orchestrator=orchestrator,
            token=token,
            ca_pem=ca.read_bytes(),
            serve_url=serve_url,
            insecure=insecure,
        )
    typer.echo(f"site {name} enrolled; identity key in {enrolled.identity_path} (mode 0600)")


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
    poll_wait: Annotated[float, typer.Option(help="Long-poll wait, seconds.")] = 25.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    insecure: InsecureOption = False,
) -> None:
    """Run the site agent: poll the orchestrator for tasks and train on local data."""
    from fedhealth.agent import AgentSettings, RetryPolicy, SiteHome, default_gates, run_agent

    _setup_logging(log_level)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    site_home = SiteHome(home)
    with friendly_errors():
        site_home.require()
        _secure_home(site_home.secure(), home)
        settings = AgentSettings(
            orchestrator_url=orchestrator or site_home.orchestrator,
            site=site_home.name,
            identity=site_home.identity(),
            ca_pem=site_home.ca_pem(),
            client_cert=site_home.client_cert(),
            datasets=_parse_datasets(dataset or []),
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
    role: Annotated[str, typer.Option(help="admin, researcher or auditor.")],
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
        created = client.add_user(name, role)
        admin = OperatorCredential.model_validate_json(credential.read_text())
    if out is not None:
        new = OperatorCredential(
            orchestrator=orchestrator or admin.orchestrator,
            ca_pem=admin.ca_pem,
            user=name,
            api_key=created.api_key,
        )
        write_private(out, new.model_dump_json(indent=2).encode())
        typer.echo(f"user {name} ({role}) created; credential written to {out}")
    else:
        typer.echo(created.api_key)


@user_app.command("list")
def user_list(
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    insecure: InsecureOption = False,
) -> None:
    """List operator accounts."""
    with friendly_errors(), _operator(credential, orchestrator, insecure) as client:
        for u in client.users():
            typer.echo(f"{u.name}\t{u.role.value}\t{'revoked' if u.revoked_at else 'active'}")


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
        admin = OperatorCredential.model_validate_json(credential.read_text())
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
