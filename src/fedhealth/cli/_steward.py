"""``fedhealth site approvals [show HASH]``: what a data steward reads before approving a study.

    site approvals --home HOME                 the specs this site holds, after fetching those awaiting it
    site approvals show HASH --home HOME       the full spec, a plain-language summary (recorded as read)
    site approve HASH --reason ... --home HOME (in cli/_governance.py) refuses a hash not shown here first

With ``--home``, both fetch the specs awaiting this site from the orchestrator first (authenticated as the
site); when it cannot be reached they say so in one line and show what the site holds.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedhealth.cli._common import JsonOption, print_json, shown
from fedhealth.cli._errors import fail, usage
from fedhealth.governance import ApprovalStatus

if TYPE_CHECKING:
    from fedhealth.agent import SiteGovernance

approvals_app = typer.Typer(
    help="Study specs awaiting or decided by this site's data steward.",
    invoke_without_command=True,
    no_args_is_help=False,
)
SiteHomeOption = Annotated[Path | None, typer.Option("--home", help="The site's home (from `site enroll`).")]
DbOption = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL, or path of a SQLite file.")]
OfflineOption = Annotated[
    bool, typer.Option("--offline", help="Do not ask the orchestrator for the specs awaiting this site.")
]


def sync_from_orchestrator(governance: SiteGovernance) -> str | None:
    """Fetch and register the specs awaiting this site; a warning sentence if the orchestrator is out of
    reach (the steward still sees what the site holds)."""
    import httpx

    from fedhealth.agent import site_client, sync_approvals
    from fedhealth.core import FedHealthError

    client = None
    try:
        client = site_client(governance.home, max_elapsed_s=5.0)  # no CA to pin: a warning, like no reach
        result = sync_approvals(governance, client)
    except (FedHealthError, httpx.HTTPError) as exc:
        why = shown(" ".join(str(exc).split())[:200])
        return f"warning: could not fetch the specs awaiting this site ({why})"
    finally:
        if client is not None:
            client.close()
    if result.refused:
        return "warning: not registered (bad signature or spec): " + shown("; ".join(result.refused))
    return None


def _open(home: Path) -> SiteGovernance:
    from fedhealth.agent import SiteGovernance, SiteHome

    return SiteGovernance(SiteHome(home))


@approvals_app.callback()
def approvals_list(
    ctx: typer.Context,
    home: SiteHomeOption = None,
    db: DbOption = None,
    status: Annotated[ApprovalStatus | None, typer.Option("--status", help="Only this status.")] = None,
    offline: OfflineOption = False,
    as_json: JsonOption = False,
) -> None:
    """List the study specs this site holds, with their status (after fetching those awaiting it)."""
    from fedhealth.cli._governance import _engine, _list_approvals
    from fedhealth.governance import list_study_approvals

    if ctx.invoked_subcommand is not None:
        return
    if (home is None) == (db is None):
        usage("give exactly one of --home, --db")
    warning = None
    if home is not None:
        with _open(home) as governance:
            if not offline:
                warning = sync_from_orchestrator(governance)
            records = list_study_approvals(governance.engine, status=status)
            lines = _list_approvals(governance.engine, status)
    else:
        engine = _engine(db or "")
        records = list_study_approvals(engine, status=status)
        lines = _list_approvals(engine, status)
    if warning:
        typer.echo(warning, err=True)
    if as_json:
        print_json([_record_json(r) for r in records])
        return
    if not lines:
        typer.echo("no study specs submitted")
    for line in lines:
        typer.echo(line)


def _record_json(record: Any) -> dict[str, Any]:
    return {
        "spec_hash": record.spec_hash,
        "study": record.study,
        "owner": record.owner,
        "status": record.status.value,
        "signed": record.signed,
        "submitted_at": record.submitted_at.isoformat() if record.submitted_at else None,
        "decided_at": record.decided_at.isoformat() if record.decided_at else None,
        "decided_by": record.decided_by,
        "reason": record.reason,
    }


@approvals_app.command("show")
def approvals_show(
    spec: Annotated[str, typer.Argument(help="Spec hash (or at least 8 leading hex characters).")],
    home: SiteHomeOption = None,
    db: DbOption = None,
    identity: Annotated[
        Path | None,
        typer.Option(
            "--identity", envvar="FEDHEALTH_IDENTITY_KEY", help="With --db: the site's identity key."
        ),
    ] = None,
    site: Annotated[
        str, typer.Option("--site", envvar="FEDHEALTH_SITE", help="With --db: the site's name.")
    ] = ("site"),
    steward: Annotated[
        str | None, typer.Option("--steward", help="Your name (default: the current user).")
    ] = None,
    spec_file: Annotated[
        Path | None,
        typer.Option(
            "--spec", help="A spec file (TOML or JSON) to register first, if the site has not got it."
        ),
    ] = None,
    offline: OfflineOption = False,
    data_dir: Annotated[Path | None, typer.Option(help="Folder of builtin datasets.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Print a spec in full with a plain-language summary; `site approve` accepts it only after this."""
    from pydantic import ValidationError

    from fedhealth.agent import review, spec_summary
    from fedhealth.client import field_errors, load_spec
    from fedhealth.governance import ApprovalRegistry, spec_hash
    from fedhealth.protocol import StudySpec

    if (home is None) == (db is None):
        usage("give exactly one of --home, --db")
    warning = None
    governance = _open(home) if home is not None else None
    try:
        if governance is not None:
            registry, log, site_name = governance.approvals, governance.log, governance.site
        else:
            from fedhealth.cli._governance import _audit_log

            log = _audit_log(db or "", identity, site)
            registry, site_name = ApprovalRegistry(log.engine, log), site
        if spec_file is not None:
            body = load_spec(spec_file).model_dump(mode="json")
            if not spec_hash(body).startswith(spec.strip().lower()):
                fail(f"{spec_file} hashes to {spec_hash(body)}, not {spec}", "is it the spec you were sent?")
            registry.submit(body)
        digest, warning = _resolve(registry, spec, governance, offline)
        record = review(registry, log, digest, steward=steward or getpass.getuser())
        try:
            parsed = StudySpec.model_validate(dict(record.spec))
        except ValidationError as exc:
            summary = [
                f"Not a study spec this release can summarise ({field_errors(exc.errors())}): read it above."
            ]
        else:
            dataset, problem = _dataset_summary(governance, parsed.dataset, data_dir)
            warning = warning or problem
            summary = spec_summary(parsed, site_name, dataset)
    finally:
        if governance is not None:
            governance.close()
    if warning:
        typer.echo(warning, err=True)
    if as_json:
        print_json({**_record_json(record), "spec": dict(record.spec), "summary": summary, "site": site_name})
        return
    signed = (
        f"signed by its owner's key {record.owner_key_fingerprint[:16]}"
        if record.signed and record.owner_key_fingerprint
        else "UNSIGNED"
    )
    typer.echo(
        f"spec {record.spec_hash}  {record.status.value}  study {shown(record.study)} "
        f"({shown(record.owner)}, {signed})"
    )
    typer.echo("")
    typer.echo(json.dumps(dict(record.spec), indent=2, sort_keys=True))
    typer.echo("")
    typer.echo("In plain words:")
    for line in summary:
        typer.echo(f"  - {shown(line)}")  # the description, params and names are the spec writer's text
    typer.echo("")
    if record.status is ApprovalStatus.PENDING:
        where = f"--home {home}" if home is not None else f"--db {db}"
        typer.echo(
            f'Approve: fedhealth site approve {record.spec_hash} --reason "..." {where}\n'
            f'Reject:  fedhealth site reject {record.spec_hash} --reason "..." {where}'
        )


@approvals_app.command("trust-key")
def approvals_trust_key(
    owner: Annotated[str, typer.Argument(help="The study owner (their user name at the orchestrator).")],
    key: Annotated[
        str, typer.Argument(help="Their Ed25519 public key, 64 hex characters, given out of band.")
    ],
    reason: Annotated[str, typer.Option("--reason", help="Why (e.g. how the key reached you).")],
    home: Annotated[Path, typer.Option("--home", help="The site's home (from `site enroll`).")],
    steward: Annotated[
        str | None, typer.Option("--steward", help="Your name (default: the current user).")
    ] = None,
) -> None:
    """Trust KEY for OWNER's specs: before their first spec, or after their key changed. Otherwise the first
    key an owner's spec arrives signed with is pinned, and a spec signed by any other key is refused."""
    from fedhealth.core import CryptoError
    from fedhealth.crypto import PublicIdentity

    try:
        public = PublicIdentity(bytes.fromhex(key.strip()))
    except (ValueError, CryptoError):
        fail("KEY must be an Ed25519 public key: 64 hex characters")
    with _open(home) as governance:
        previous = governance.approvals.owner_key(owner)
        governance.approvals.trust_key(owner, public, steward=steward or getpass.getuser(), reason=reason)
    was = f" (was {previous.fingerprint[:16]})" if previous is not None and previous != public else ""
    typer.echo(f"owner {shown(owner)}: specs must be signed by key {public.fingerprint[:16]}{was}")


def _resolve(
    registry: Any, spec: str, governance: SiteGovernance | None, offline: bool
) -> tuple[str, str | None]:
    """The full hash of ``spec``, fetching the specs awaiting the site first if it holds none such."""
    from fedhealth.core import NotFoundError

    try:
        return registry.resolve(spec), None
    except NotFoundError:
        if offline or governance is None:
            raise
    warning = sync_from_orchestrator(governance)
    try:
        return registry.resolve(spec), warning
    except NotFoundError:
        fail(
            f"no study spec with hash {spec} is known at this site",
            (warning or "the orchestrator has no study awaiting this site with that hash")
            + "; check the hash, or give the spec file with --spec",
        )


def _dataset_summary(
    governance: SiteGovernance | None, name: str, data_dir: Path | None
) -> tuple[Any, str | None]:
    """The site's registered dataset of that name, checked now (None, and why, when it cannot be)."""
    from fedhealth.agent import DatasetCheckError, SiteDatasets, check_dataset

    if governance is None:
        return None, None
    datasets = SiteDatasets(governance.home)
    if name not in datasets.all():
        return None, None
    try:
        return check_dataset(name, datasets.uri(name), data_dir), None
    except DatasetCheckError as exc:
        return None, f"warning: {exc}"
