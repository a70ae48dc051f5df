"""Command groups for governance: ``audit``, ``provenance``, ``model``, ``approval`` and ``consent``.

Register them on the root app (``app.add_typer(audit_app, name="audit")``, ``approval_app`` as ``site``, ...).
Exit codes: 0 success (for ``audit verify``: the log verified); 1 ``audit verify`` found a bad entry, and
printed which; 2 usage or input errors. Messages are one line, never a traceback. Commands take ``--db``: a
SQLAlchemy URL, or the path of a SQLite file (which must exist).
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from fedhealth.core import FedHealthError, SystemClock
from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.governance import (
    DEFAULT_LOG_ID,
    ApprovalRegistry,
    ApprovalStatus,
    AuditLog,
    ConsentRegistry,
    LogHead,
    ProvenanceStore,
    create_governance_tables,
    export_stored_log,
    list_study_approvals,
    model_card_markdown,
    parse_public_key,
    read_jsonl,
    read_stored_log,
    stored_keys,
    stored_log_ids,
    to_prov_json,
    verify_loaded,
)

EXIT_BAD_ENTRY = 1
EXIT_USAGE = 2

DbOption = Annotated[str, typer.Option("--db", help="SQLAlchemy URL, or path of an existing SQLite file.")]
IdentityOption = Annotated[
    Path,
    typer.Option(
        "--identity",
        envvar="FEDHEALTH_IDENTITY_KEY",
        help="This site's Ed25519 identity key (PEM, mode 600): signs the audit entries.",
    ),
]
SiteOption = Annotated[
    str, typer.Option("--site", envvar="FEDHEALTH_SITE", help="This site's name (the audit log's actor).")
]
LogOption = Annotated[str, typer.Option("--log", help="Which log in the database.")]


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _errors_as_messages() -> Iterator[None]:
    """The one boundary where fedhealth and database errors become a one-line message and exit code 2."""
    try:
        yield
    except FedHealthError as exc:
        _fail(str(exc) or type(exc).__name__)
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        _fail(f"database: {(str(cause).splitlines() or [type(cause).__name__])[0]}")
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


def _engine(db: str) -> Engine:
    if "://" in db:
        try:
            return create_engine(db)
        except (ArgumentError, ImportError, ValueError) as exc:
            _fail(f"--db: {db!r} is not a usable database URL ({exc})")
    path = Path(db).expanduser()
    if not path.is_file():
        _fail(f"--db: no SQLite file at {path}")
    return create_engine(f"sqlite:///{path.resolve()}")


def _audit_log(db: str, identity: Path, site: str) -> AuditLog:
    engine = _engine(db)
    create_governance_tables(engine)
    return AuditLog(engine, IdentityKey.load(identity), site, SystemClock())


def _keys(values: list[str]) -> dict[str, PublicIdentity]:
    keys: dict[str, PublicIdentity] = {}
    for value in values:
        text = value
        candidate = Path(value).expanduser()
        if len(value) != 64 and candidate.is_file():
            text = candidate.read_text(encoding="utf-8").strip()
        key = parse_public_key(text)
        if key is None:
            _fail(
                f"--key {value!r}: expected an Ed25519 public key as 64 hex characters, or a file holding one"
            )
        keys[key.fingerprint] = key
    return keys


def _anchors(values: list[str]) -> list[LogHead]:
    heads = []
    for value in values:
        seq, _, digest = value.partition(":")
        try:
            heads.append(LogHead.from_json({"seq": int(seq), "hash": digest.strip().lower()}))
        except (ValueError, FedHealthError):
            _fail(f"--anchor {value!r}: expected SEQ:HASH, e.g. 12:3f1a... (64 hex characters)")
    return heads


def _group(name: str, help_text: str) -> typer.Typer:
    app = typer.Typer(name=name, help=help_text, no_args_is_help=True, add_completion=False)

    # a callback keeps a one-command group a group (``fedhealth model card``, not ``fedhealth model``)
    @app.callback()
    def _callback() -> None:
        pass

    _callback.__doc__ = help_text
    return app


# --- audit --------------------------------------------------------------------------------------------------

audit_app = _group("audit", "Verify and export hash-chained, signed audit logs.")


@audit_app.command("verify")
def audit_verify(
    db: Annotated[str | None, typer.Option("--db", help="Verify a log in this database.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Verify an exported JSON Lines file.")] = None,
    key: Annotated[
        list[str] | None,
        typer.Option(
            "--key", help="Trusted writer key (64 hex, or a file); repeatable. Default: keys stored."
        ),
    ] = None,
    anchor: Annotated[
        list[str] | None, typer.Option("--anchor", help="A head a peer anchored, SEQ:HASH; repeatable.")
    ] = None,
    log_id: LogOption = DEFAULT_LOG_ID,
) -> None:
    """Check the chain, hashes and signatures (offline); name the first bad entry. Exit 1 if there is one."""
    if (db is None) == (file is None):
        _fail("give exactly one of --db or --file")
    with _errors_as_messages():
        pinned = _keys(key or [])
        heads = _anchors(anchor or [])
        if file is not None:
            export = read_jsonl(file)
            stored, fallback = export.stored, dict(export.header_keys)
            where = "the file header"
        else:
            engine = _engine(db or "")
            stored, fallback = read_stored_log(engine, log_id=log_id), stored_keys(engine)
            where = "the database"
            others = [name for name in stored_log_ids(engine) if name != log_id]
            if not stored.entries and stored.malformed is None and others:
                _fail(f"log {log_id!r} is empty here; this database holds {others}: pass --log")
        if not pinned:
            typer.echo(
                f"note: trusting the writer keys from {where} (integrity only); pin them with --key", err=True
            )
        report = verify_loaded(stored, pinned or fallback, anchored_heads=heads)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(EXIT_BAD_ENTRY)


@audit_app.command("export")
def audit_export(
    db: DbOption,
    out: Annotated[Path, typer.Option("--out", help="The JSON Lines file to write.")],
    log_id: LogOption = DEFAULT_LOG_ID,
) -> None:
    """Write a log as JSON Lines (header line with the writer keys, then one entry per line, as stored)."""
    with _errors_as_messages():
        count = export_stored_log(_engine(db), out, log_id=log_id)
    typer.echo(f"exported {count} entries of log {log_id!r} to {out}")


# --- provenance and model cards -----------------------------------------------------------------------------


class ProvenanceFormat(StrEnum):
    TEXT = "text"
    PROV_JSON = "prov-json"


provenance_app = _group("provenance", "Show where a model version came from.")


@provenance_app.command("show")
def provenance_show(
    model: Annotated[str, typer.Argument(help="Model digest (or at least 8 leading hex characters).")],
    db: DbOption,
    fmt: Annotated[ProvenanceFormat, typer.Option("--format", help="text or W3C PROV-JSON.")] = (
        ProvenanceFormat.TEXT
    ),
) -> None:
    """Print a model version's lineage, newest first."""
    with _errors_as_messages():
        store = ProvenanceStore(_engine(db))
        lineage = store.lineage(store.resolve(model))
        flags = [f for p in lineage for f in store.flags(p.model_digest)]
    if fmt is ProvenanceFormat.PROV_JSON:
        typer.echo(json.dumps(to_prov_json(lineage, flags=flags), indent=2, sort_keys=True))
        return
    flagged = {f.model_digest for f in flags}
    for depth, p in enumerate(lineage):
        mark = "  [FLAGGED: consent withdrawn]" if p.model_digest in flagged else ""
        typer.echo(
            f"{'  ' * depth}{p.model_digest[:16]}  study {p.study_id}  round {p.round}  sites {p.n_sites}  "
            f"spec {p.spec_hash[:12]}  fedhealth {p.software_version}{mark}"
        )


model_app = _group("model", "Model versions: cards.")


@model_app.command("card")
def model_card(
    model: Annotated[str, typer.Argument(help="Model digest (or at least 8 leading hex characters).")],
    db: DbOption,
    out: Annotated[
        Path | None, typer.Option("--out", help="Markdown file to write (default: stdout).")
    ] = None,
    intended_use: Annotated[str, typer.Option("--intended-use", help="The intended-use statement.")] = (
        "Research within the study named above. Not validated for clinical decisions."
    ),
) -> None:
    """Write a Markdown model card: intended use, data, per-site metrics, privacy guarantee, consent."""
    with _errors_as_messages():
        store = ProvenanceStore(_engine(db))
        digest = store.resolve(model)
        card = model_card_markdown(
            store.lineage(digest),
            intended_use=intended_use,
            site_metrics=store.metrics(digest),
            flags=store.flags(digest),
        )
        if out is None:
            typer.echo(card, nl=False)
            return
        out.write_text(card, encoding="utf-8")
    typer.echo(f"wrote the model card of {digest[:16]} to {out}")


# --- site: study approval -----------------------------------------------------------------------------------

approval_app = _group("site", "The data steward's study approvals.")


def _steward_decision(
    decide: Callable[[ApprovalRegistry, str, str, str], object],
    spec: str,
    reason: str,
    db: str,
    identity: Path,
    site: str,
    steward: str | None,
    verb: str,
) -> None:
    with _errors_as_messages():
        log = _audit_log(db, identity, site)
        registry = ApprovalRegistry(log.engine, log)
        digest = registry.resolve(spec)
        decide(registry, digest, reason, steward or getpass.getuser())
    typer.echo(f"{verb} spec {digest}")


ReasonOption = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")]
StewardOption = Annotated[
    str | None, typer.Option("--steward", help="The steward's name (default: the current user).")
]
HashArgument = Annotated[str, typer.Argument(help="Spec hash (or at least 8 leading hex characters).")]


@approval_app.command("approve")
def approval_approve(
    spec: HashArgument,
    reason: ReasonOption,
    db: DbOption,
    identity: IdentityOption,
    site: SiteOption = "site",
    steward: StewardOption = None,
) -> None:
    """Approve a submitted study spec by its hash."""
    _steward_decision(
        lambda r, h, why, who: r.approve(h, reason=why, steward=who),
        spec,
        reason,
        db,
        identity,
        site,
        steward,
        "approved",
    )


@approval_app.command("reject")
def approval_reject(
    spec: HashArgument,
    reason: ReasonOption,
    db: DbOption,
    identity: IdentityOption,
    site: SiteOption = "site",
    steward: StewardOption = None,
) -> None:
    """Reject (or revoke the approval of) a study spec by its hash."""
    _steward_decision(
        lambda r, h, why, who: r.reject(h, reason=why, steward=who),
        spec,
        reason,
        db,
        identity,
        site,
        steward,
        "rejected",
    )


@approval_app.command("list")
def approval_list(
    db: DbOption,
    status: Annotated[ApprovalStatus | None, typer.Option("--status", help="Only this status.")] = None,
) -> None:
    """List submitted study specs with their status."""
    with _errors_as_messages():
        engine = _engine(db)
        rows = _list_approvals(engine, status)
    if not rows:
        typer.echo("no study specs submitted")
    for line in rows:
        typer.echo(line)


def _list_approvals(engine: Engine, status: ApprovalStatus | None) -> list[str]:
    out = []
    for a in list_study_approvals(engine, status=status):
        decided = f" by {a.decided_by}: {a.reason}" if a.decided_by else ""
        out.append(f"{a.spec_hash}  {a.status.value:<8}  {a.study}{decided}")
    return out


# --- consent ------------------------------------------------------------------------------------------------


class ConsentFormat(StrEnum):
    AUTO = "auto"
    CSV = "csv"
    FHIR = "fhir"


consent_app = _group("consent", "Patient consent records at this site.")


@consent_app.command("import")
def consent_import(
    file: Annotated[
        Path, typer.Argument(help="A consent CSV, or FHIR R4 Consent JSON (Bundle or resource).")
    ],
    db: DbOption,
    identity: IdentityOption,
    site: SiteOption = "site",
    fmt: Annotated[ConsentFormat, typer.Option("--format", help="csv, fhir, or auto (by extension).")] = (
        ConsentFormat.AUTO
    ),
) -> None:
    """Import consent records; a bad row stops the import before anything is stored."""
    kind = fmt
    if kind is ConsentFormat.AUTO:
        suffix = file.suffix.lower()
        if suffix not in (".csv", ".json"):
            _fail(f"cannot tell the format of {file.name}; pass --format csv or --format fhir")
        kind = ConsentFormat.CSV if suffix == ".csv" else ConsentFormat.FHIR
    with _errors_as_messages():
        log = _audit_log(db, identity, site)
        registry = ConsentRegistry(log.engine, log)
        summary = registry.import_csv(file) if kind is ConsentFormat.CSV else registry.import_fhir(file)
    typer.echo(
        f"imported {file.name}: {summary.added} added, {summary.updated} updated, "
        f"{summary.unchanged} unchanged, {summary.withdrawn} withdrawn, {summary.skipped} skipped"
    )


@consent_app.command("withdraw")
def consent_withdraw(
    patient: Annotated[str, typer.Argument(help="The pseudonymous patient id.")],
    db: DbOption,
    identity: IdentityOption,
    purpose: Annotated[
        str | None, typer.Option("--purpose", help="Only this purpose (default: all).")
    ] = None,
    site: SiteOption = "site",
) -> None:
    """Withdraw a patient's consent now; prints the notice for the orchestrator (snapshot hashes, no id)."""
    with _errors_as_messages():
        log = _audit_log(db, identity, site)
        notice = ConsentRegistry(log.engine, log).withdraw(patient, purpose)
    typer.echo(json.dumps(notice.to_json(), sort_keys=True))
