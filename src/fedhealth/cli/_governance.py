"""Command groups for governance: ``audit``, ``provenance``, ``model``, ``approval`` and ``consent``.

Registered on the root app: ``audit_app`` as ``audit``, ``approval_app``'s commands under ``site``,
``consent_app`` as ``site consent``, ``provenance_app`` and ``model_app``. Exit codes: 0 success (for
``audit verify``: the log verified); 1 ``audit verify`` found a bad entry, and printed which; 2 usage or
input errors. Messages are one line, never a traceback.

Where the data lives is given one of three ways:

- ``--home DIR``: an orchestrator home (``fedhealth orchestrator init``) or a site home (``fedhealth site
  enroll``). The log is the home's own, its writer key is pinned from the home's key file, and steward
  actions are signed with the site's identity key.
- ``--db``: a SQLAlchemy URL or the path of a SQLite file (plus ``--identity`` and ``--site`` to sign).
- ``--credential FILE`` (provenance and model cards): ask a running orchestrator over its operator API.

``audit verify --home A --peer B`` also checks the anchors: a site's log against the heads the orchestrator's
round records hold for it, and the orchestrator's log against the round commitments each site recorded (and
that each of those commits the study and round the site says it was given it for: a replayed head is named).
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from fedhealth.cli._common import shown, shown_cell, shown_lines
from fedhealth.core import FedHealthError, InputError, SystemClock, write_private_file
from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.governance import (
    DEFAULT_LOG_ID,
    ApprovalRegistry,
    ApprovalStatus,
    AuditLog,
    ConsentRegistry,
    LogHead,
    ProvenanceStore,
    StoredLog,
    VerificationReport,
    WithdrawalNotice,
    create_governance_tables,
    export_stored_log,
    list_study_approvals,
    model_card_markdown,
    orchestrator_anchors,
    parse_public_key,
    read_jsonl,
    read_stored_log,
    site_anchors,
    spec_hash,
    stored_keys,
    stored_log_ids,
    to_prov_json,
    verify_chain,
    verify_loaded,
    verify_round_anchors,
)
from fedhealth.privacy import MembershipReport

if TYPE_CHECKING:
    from rich.console import Console

    from fedhealth.agent import SiteGovernance

EXIT_BAD_ENTRY = 1
EXIT_RUNTIME = 1
EXIT_USAGE = 2
DEFAULT_INTENDED_USE = "Research within the study named above. Not validated for clinical decisions."

DbOption = Annotated[
    str | None, typer.Option("--db", help="SQLAlchemy URL, or path of an existing SQLite file.")
]
HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="An orchestrator home or a site home: its own database and key."),
]
SiteHomeOption = Annotated[
    Path | None, typer.Option("--home", help="The site's home (from `fedhealth site enroll`).")
]
IdentityOption = Annotated[
    Path | None,
    typer.Option(
        "--identity",
        envvar="FEDHEALTH_IDENTITY_KEY",
        help="With --db: this site's Ed25519 identity key (PEM, mode 600): signs the audit entries.",
    ),
]
SiteOption = Annotated[
    str, typer.Option("--site", envvar="FEDHEALTH_SITE", help="With --db: the site's name (the log's actor).")
]
LogOption = Annotated[str, typer.Option("--log", help="Which log in the database.")]
CredentialOption = Annotated[
    Path | None,
    typer.Option(
        "--credential",
        envvar="FEDHEALTH_CREDENTIAL",
        help="Operator credential file: ask the running orchestrator.",
    ),
]
UrlOption = Annotated[
    str | None, typer.Option("--orchestrator", help="With --credential: override its orchestrator URL.")
]


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"error: {shown(message)}", err=True)
    raise typer.Exit(code)


@contextmanager
def _errors_as_messages() -> Iterator[None]:
    """Where fedhealth and database errors become a one-line message and exit code 1 (a runtime failure;
    usage errors exit 2 where they are found)."""
    try:
        yield
    except FedHealthError as exc:
        _fail(str(exc) or type(exc).__name__, EXIT_RUNTIME)
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        _fail(f"database: {(str(cause).splitlines() or [type(cause).__name__])[0]}", EXIT_RUNTIME)
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), EXIT_RUNTIME)


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


def _audit_log(db: str, identity: Path | None, site: str) -> AuditLog:
    if identity is None:
        _fail("--db needs --identity (the site's key signs the entries); or give --home")
    engine = _engine(db)
    create_governance_tables(engine)
    return AuditLog(engine, IdentityKey.load(identity), site, SystemClock(), salted=True)


def _keys(values: list[str]) -> dict[str, PublicIdentity]:
    keys: dict[str, PublicIdentity] = {}
    for value in values:
        text = value
        candidate = Path(value).expanduser()
        if len(value) != 64 and candidate.is_file():
            try:
                text = candidate.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                text = ""  # not text: refused below as no key
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
            if not (seq.strip().isascii() and seq.strip().isdigit()):  # not -1, nor a digit of another script
                raise ValueError(seq)
            heads.append(LogHead.from_json({"seq": int(seq), "hash": digest.strip().lower()}))
        except (ValueError, FedHealthError):
            _fail(f"--anchor {value!r}: expected SEQ:HASH, e.g. 12:3f1a... (64 hex characters)")
    return heads


def _one_source(**given: object) -> None:
    named = [f"--{name}" for name, value in given.items() if value is not None]
    if len(named) != 1:
        _fail(f"give exactly one of {', '.join(f'--{n}' for n in given)}")


def _group(name: str, help_text: str) -> typer.Typer:
    app = typer.Typer(name=name, help=help_text, no_args_is_help=True, add_completion=False)

    # a callback keeps a one-command group a group (``fedhealth model card``, not ``fedhealth model``)
    @app.callback()
    def _callback() -> None:
        pass

    _callback.__doc__ = help_text
    return app


# --- homes ------------------------------------------------------------------------------------------------


class HomeKind(StrEnum):
    ORCHESTRATOR = "orchestrator"
    SITE = "site"


@dataclass(frozen=True, slots=True, kw_only=True)
class HomeLog:
    """The audit log of a home, with the writer key pinned from the home's own key file."""

    path: Path
    kind: HomeKind
    name: str  # the site's name, or "orchestrator"
    engine: Engine
    key: PublicIdentity

    def read(self) -> StoredLog:
        return read_stored_log(self.engine)

    def close(self) -> None:
        self.engine.dispose()


def open_home_log(path: Path) -> HomeLog:
    """The log of an orchestrator home or a site home (raises FedHealthError if ``path`` is neither)."""
    from fedhealth.agent import SiteHome
    from fedhealth.orchestrator import OrchestratorHome

    orchestrator = OrchestratorHome(path)
    site = SiteHome(path)
    if orchestrator.exists():
        url = orchestrator.database_url()
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
            raise FedHealthError(f"{path}: the orchestrator has no database yet ({url})")
        return HomeLog(
            path=path,
            kind=HomeKind.ORCHESTRATOR,
            name="orchestrator",
            engine=create_engine(url),
            key=orchestrator.signing_key().public(),
        )
    if site.settings_path.exists():
        if not site.database_path.is_file():
            raise FedHealthError(f"{path}: the site has no governance database yet ({site.database_path})")
        return HomeLog(
            path=path,
            kind=HomeKind.SITE,
            name=site.name,
            engine=create_engine(f"sqlite:///{site.database_path.resolve()}"),
            key=site.identity().public(),
        )
    raise FedHealthError(f"{path} is neither an orchestrator home nor a site home")


def anchors_from_peers(home: HomeLog, peers: Sequence[HomeLog]) -> tuple[list[LogHead], list[str]]:
    """The heads of ``home``'s log its peers anchored and ``home``'s key signed, and a note per peer (its
    own chain's state, and how many heads it holds that ``home`` never signed: those are not used).

    A peer whose own chain does not verify still contributes what it holds, and its note says so.
    """
    heads: list[LogHead] = []
    notes: list[str] = []
    for peer in peers:
        stored = peer.read()
        report = verify_chain(stored.entries, {peer.key.fingerprint: peer.key})
        state = "its log verifies" if report.ok and stored.malformed is None else "ITS LOG DOES NOT VERIFY"
        if home.kind is HomeKind.SITE and peer.kind is HomeKind.ORCHESTRATOR:
            held = site_anchors(stored.entries, home.name)
        elif home.kind is HomeKind.ORCHESTRATOR and peer.kind is HomeKind.SITE:
            held = orchestrator_anchors(stored.entries)
        else:
            raise FedHealthError(f"{peer.path}: a {home.kind.value} log is anchored by the other side only")
        # Only a head the home's own key signed is the home's word: a peer can write any head into its own
        # log, and one the home never signed would frame an honest log as rewritten.
        signed = [h for h in held if h.signed_by(home.key)]
        heads.extend(signed)
        unsigned = len(held) - len(signed)
        ignored = (
            f"; {unsigned} more not signed by {home.name}'s key, ignored (the peer's word, not {home.name}'s)"
            if unsigned
            else ""
        )
        notes.append(f"{peer.name} holds {len(signed)} anchor(s) of {home.name}'s log{ignored}; {state}")
    return heads, notes


def verify_home(home: HomeLog, peers: Sequence[HomeLog] = ()) -> VerificationReport:
    """Chain, hashes and signatures under the home's pinned key, then every anchor its peers hold, then (an
    orchestrator's log) that each round commitment a site anchored commits the round the site names."""
    heads, _ = anchors_from_peers(home, peers)
    report = verify_loaded(home.read(), {home.key.fingerprint: home.key}, anchored_heads=heads)
    return _with_round_anchors(report, home, peers)


def _with_round_anchors(
    report: VerificationReport, home: HomeLog, peers: Sequence[HomeLog]
) -> VerificationReport:
    # a replayed head is still in the log, unchanged, so the anchor check passes it; only the round each site
    # says it was given it for tells it apart (governance.verify_round_anchors)
    if not report.ok or home.kind is not HomeKind.ORCHESTRATOR:
        return report
    sites = {peer.name: peer.read().entries for peer in peers if peer.kind is HomeKind.SITE}
    rounds = verify_round_anchors(home.read().entries, sites, home.key)
    return rounds if not rounds.ok else report


def verify_federation(orchestrator: Path, sites: Sequence[Path]) -> list[tuple[str, VerificationReport]]:
    """Verify the orchestrator's log (against every site's anchors) and each site's log (against the
    orchestrator's); ``(name, report)`` in that order. Offline: reads the databases directly."""
    orch = open_home_log(orchestrator)
    site_logs = [open_home_log(path) for path in sites]
    try:
        results = [(orch.name, verify_home(orch, site_logs))]
        results += [(site.name, verify_home(site, [orch])) for site in site_logs]
        return results
    finally:
        for opened in (orch, *site_logs):
            opened.close()


def write_model_card(
    orchestrator: Path, model: str, out: Path, *, intended_use: str = DEFAULT_INTENDED_USE
) -> str:
    """Write the Markdown model card of ``model`` (digest or prefix) from an orchestrator home's database;
    returns the full digest."""
    home = open_home_log(orchestrator)
    try:
        store = ProvenanceStore(home.engine)
        digest = store.resolve(model)
        # a new file renamed into place: a link or FIFO planted at ``out`` is replaced, never written through
        write_private_file(out, _card(store, digest, intended_use).encode("utf-8"))
        return digest
    finally:
        home.close()


def _card(
    store: ProvenanceStore, digest: str, intended_use: str, membership: MembershipReport | None = None
) -> str:
    return model_card_markdown(
        store.lineage(digest),
        intended_use=intended_use,
        site_metrics=store.metrics(digest),
        flags=store.flags(digest),
        membership=membership,
    )


def _membership_report(path: Path) -> MembershipReport:
    """A membership benchmark result file, or an InputError naming what is wrong with it."""
    data = path.read_bytes()
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise InputError(f"--membership: {path.name} is not JSON ({exc.msg}, line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise InputError(f"--membership: {path.name} is not UTF-8 JSON") from None
    try:
        return MembershipReport.from_json(obj)
    except InputError as exc:
        raise InputError(f"--membership: {path.name}: {exc}") from None


def _site_governance(home: Path) -> SiteGovernance:
    from fedhealth.agent import SiteGovernance, SiteHome

    return SiteGovernance(SiteHome(home))


# --- audit --------------------------------------------------------------------------------------------------

audit_app = _group("audit", "Verify and export hash-chained, signed audit logs.")


@audit_app.command("verify")
def audit_verify(
    db: Annotated[str | None, typer.Option("--db", help="Verify a log in this database.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Verify an exported JSON Lines file.")] = None,
    home: HomeOption = None,
    peer: Annotated[
        list[Path] | None,
        typer.Option(
            "--peer",
            help="With --home: the other side's home, whose anchors this log must match (repeatable).",
        ),
    ] = None,
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
    _one_source(db=db, file=file, home=home)
    if peer and home is None:
        _fail("--peer needs --home")
    with _errors_as_messages():
        pinned = _keys(key or [])
        heads = _anchors(anchor or [])
        if home is not None:
            report = _verify_with_home(home, peer or [], pinned, heads)
        else:
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
                    f"note: trusting the writer keys from {where} (integrity only); pin them with --key",
                    err=True,
                )
            report = verify_loaded(stored, pinned or fallback, anchored_heads=heads)
    typer.echo(shown(report.summary()))
    if not report.ok:
        raise typer.Exit(EXIT_BAD_ENTRY)


def _verify_with_home(
    path: Path, peers: list[Path], pinned: dict[str, PublicIdentity], heads: list[LogHead]
) -> VerificationReport:
    home = open_home_log(path)
    opened = [open_home_log(p) for p in peers]
    try:
        held, notes = anchors_from_peers(home, opened)
        for note in notes:
            typer.echo(f"note: {shown(note)}", err=True)
        keys = pinned or {home.key.fingerprint: home.key}
        typer.echo(
            f"note: {home.kind.value} log of {shown(home.name)}, writer key {home.key.fingerprint[:16]}",
            err=True,
        )
        report = verify_loaded(home.read(), keys, anchored_heads=[*heads, *held])
        return _with_round_anchors(report, home, opened)
    finally:
        for log_home in (home, *opened):
            log_home.close()


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Option("--out", help="The JSON Lines file to write.")],
    db: DbOption = None,
    home: HomeOption = None,
    log_id: LogOption = DEFAULT_LOG_ID,
) -> None:
    """Write a log as JSON Lines (header line with the writer keys, then one entry per line, as stored)."""
    _one_source(db=db, home=home)
    with _errors_as_messages():
        if home is not None:
            opened = open_home_log(home)
            try:
                count = export_stored_log(opened.engine, out, log_id=log_id)
            finally:
                opened.close()
        else:
            count = export_stored_log(_engine(db or ""), out, log_id=log_id)
    typer.echo(f"exported {count} entries of log {log_id!r} to {out}")


# --- provenance and model cards -----------------------------------------------------------------------------


class ProvenanceFormat(StrEnum):
    TEXT = "text"
    PROV_JSON = "prov-json"


provenance_app = _group("provenance", "Show where a model version came from.")


def _provenance_engine(db: str | None, home: Path | None) -> Engine:
    if home is not None:
        return open_home_log(home).engine
    return _engine(db or "")


def _remote(credential: Path, url: str | None, path: str, **params: str) -> str:
    import httpx

    from fedhealth.client import OperatorClient

    if not credential.is_file():
        raise FedHealthError(f"credential file {credential} not found")
    with OperatorClient.from_credential(credential, url=url) as client:
        try:
            return client.request("GET", path, params=params).text
        except httpx.TransportError as exc:
            raise FedHealthError(f"cannot reach the orchestrator at {client.url}: {exc}") from exc


@provenance_app.command("show")
def provenance_show(
    model: Annotated[str, typer.Argument(help="Model digest (or at least 8 leading hex characters).")],
    db: DbOption = None,
    home: HomeOption = None,
    credential: CredentialOption = None,
    orchestrator: UrlOption = None,
    fmt: Annotated[ProvenanceFormat, typer.Option("--format", help="text or W3C PROV-JSON.")] = (
        ProvenanceFormat.TEXT
    ),
) -> None:
    """Print a model version's lineage, newest first."""
    _one_source(db=db, home=home, credential=credential)
    with _errors_as_messages():
        if credential is not None:
            remote_format = "prov-json" if fmt is ProvenanceFormat.PROV_JSON else "json"
            body = json.loads(
                _remote(
                    credential,
                    orchestrator,
                    f"/api/v1/governance/models/{model}/provenance",
                    format=remote_format,
                )
            )
            if fmt is ProvenanceFormat.PROV_JSON:
                typer.echo(json.dumps(body, indent=2, sort_keys=True))
                return
            from fedhealth.governance import ModelProvenance

            lineage = [ModelProvenance.from_json(p) for p in body["lineage"]]
            flagged = {f["model_digest"] for f in body["flags"]}
        else:
            store = ProvenanceStore(_provenance_engine(db, home))
            lineage = store.lineage(store.resolve(model))
            flags = [f for p in lineage for f in store.flags(p.model_digest)]
            if fmt is ProvenanceFormat.PROV_JSON:
                typer.echo(json.dumps(to_prov_json(lineage, flags=flags), indent=2, sort_keys=True))
                return
            flagged = {f.model_digest for f in flags}
    for depth, p in enumerate(lineage):
        mark = "  [FLAGGED: consent withdrawn]" if p.model_digest in flagged else ""
        typer.echo(
            f"{'  ' * depth}{shown(p.model_digest[:16])}  study {shown(p.study_id)}  round {p.round}  "
            f"sites {p.n_sites}  spec {shown(p.spec_hash[:12])}  fedhealth {shown(p.software_version)}{mark}"
        )


model_app = _group("model", "Model versions: cards.")


@model_app.command("card")
def model_card(
    model: Annotated[str, typer.Argument(help="Model digest (or at least 8 leading hex characters).")],
    db: DbOption = None,
    home: HomeOption = None,
    credential: CredentialOption = None,
    orchestrator: UrlOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Markdown file to write (default: stdout).")
    ] = None,
    intended_use: Annotated[str, typer.Option("--intended-use", help="The intended-use statement.")] = (
        DEFAULT_INTENDED_USE
    ),
    membership: Annotated[
        Path | None,
        typer.Option(
            "--membership",
            help="A `fedhealth benchmark membership` result (JSON): its measured attack figures go beside "
            "epsilon (with --db or --home).",
        ),
    ] = None,
) -> None:
    """Write a Markdown model card: intended use, data, per-site metrics, privacy guarantee, consent."""
    _one_source(db=db, home=home, credential=credential)
    if membership is not None and credential is not None:
        _fail("--membership works with --db or --home (the orchestrator renders a remote card itself)")
    with _errors_as_messages():
        measured = _membership_report(membership) if membership is not None else None
        if credential is not None:
            card = _remote(
                credential,
                orchestrator,
                f"/api/v1/governance/models/{model}/card",
                intended_use=intended_use,
            )
            digest = model
        else:
            store = ProvenanceStore(_provenance_engine(db, home))
            digest = store.resolve(model)
            card = _card(store, digest, intended_use, measured)
        if out is None:
            typer.echo(shown_lines(card), nl=False)  # a remote card is the orchestrator's text
            return
        write_private_file(out, card.encode("utf-8"))  # never through a link or FIFO planted at --out
    typer.echo(f"wrote the model card of {shown(digest[:16])} to {out}")


# --- site: study approval -----------------------------------------------------------------------------------

approval_app = _group("site", "The data steward's study approvals.")


def _steward_decision(
    decide: Callable[[ApprovalRegistry, str, str, str], object],
    spec: str,
    reason: str,
    *,
    db: str | None,
    home: Path | None,
    identity: Path | None,
    site: str,
    steward: str | None,
    spec_file: Path | None,
    verb: str,
    require_review: bool = False,
    report: bool = True,
) -> None:
    from fedhealth.agent import was_reviewed

    _one_source(db=db, home=home)
    warning = None
    with _errors_as_messages():
        governance = _site_governance(home) if home is not None else None
        if governance is not None:
            registry = governance.approvals
        else:
            log = _audit_log(db or "", identity, site)
            registry = ApprovalRegistry(log.engine, log)
        try:
            if spec_file is not None:
                from fedhealth.client import load_spec

                # TOML, or JSON by its suffix; a FIFO, a huge or a non-text file is one refusal, never a hang
                body = load_spec(spec_file).model_dump(mode="json")
                if not spec_hash(body).startswith(spec.strip().lower()):
                    raise FedHealthError(
                        f"{spec_file} hashes to {spec_hash(body)}, not {spec}: is it the spec you reviewed?"
                    )
                registry.submit(body)
            digest = registry.resolve(spec)
            engine = governance.engine if governance is not None else log.engine
            if require_review and not was_reviewed(engine, digest):
                _fail(
                    f"spec {digest} has not been shown at this site (run `fedhealth site approvals show "
                    f"{digest[:12]}` first: a steward approves what they have read, not a hash)",
                    EXIT_RUNTIME,
                )
            decide(registry, digest, reason, steward or getpass.getuser())
        finally:
            if governance is not None:
                governance.close()
        if home is not None and report:
            warning = _report_decision(home, digest, approved=verb == "approved")
    typer.echo(f"{verb} spec {digest}")
    if warning is not None:
        typer.echo(warning, err=True)


def _report_decision(home: Path, digest: str, *, approved: bool) -> str | None:
    """Tell the orchestrator (state only; the reason stays here). A warning if it is out of reach: the
    site's agent reports the decision again while the study waits."""
    import httpx

    from fedhealth.agent import SiteHome, report_approval

    try:
        report_approval(SiteHome(home), digest, approved=approved)
    except (FedHealthError, httpx.HTTPError) as exc:
        return (
            "warning: the orchestrator was not told yet "
            f"({shown(' '.join(str(exc).split())[:200])}); "
            "the site's agent will tell it while the study waits"
        )
    return None


ReasonOption = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit log).")]
StewardOption = Annotated[
    str | None, typer.Option("--steward", help="The steward's name (default: the current user).")
]
ReportOption = Annotated[
    bool, typer.Option("--report/--no-report", help="With --home: tell the orchestrator (state only).")
]
HashArgument = Annotated[str, typer.Argument(help="Spec hash (or at least 8 leading hex characters).")]
SpecFileOption = Annotated[
    Path | None,
    typer.Option(
        "--spec",
        help="The study spec (TOML, or .json) to register first, when the site has not received it yet; "
        "it must hash to HASH.",
    ),
]


@approval_app.command("approve")
def approval_approve(
    spec: HashArgument,
    reason: ReasonOption,
    db: DbOption = None,
    home: SiteHomeOption = None,
    identity: IdentityOption = None,
    site: SiteOption = "site",
    steward: StewardOption = None,
    spec_file: SpecFileOption = None,
    report: ReportOption = True,
) -> None:
    """Approve a study spec by its hash, once `site approvals show HASH` displayed it: tasks of exactly this
    spec may run here. With --home the orchestrator is told, so a study waiting for it can start."""
    _steward_decision(
        lambda r, h, why, who: r.approve(h, reason=why, steward=who),
        spec,
        reason,
        db=db,
        home=home,
        identity=identity,
        site=site,
        steward=steward,
        spec_file=spec_file,
        verb="approved",
        require_review=True,
        report=report,
    )


@approval_app.command("reject")
def approval_reject(
    spec: HashArgument,
    reason: ReasonOption,
    db: DbOption = None,
    home: SiteHomeOption = None,
    identity: IdentityOption = None,
    site: SiteOption = "site",
    steward: StewardOption = None,
    spec_file: SpecFileOption = None,
    report: ReportOption = True,
) -> None:
    """Reject (or revoke the approval of) a study spec by its hash; with --home the orchestrator is told."""
    _steward_decision(
        lambda r, h, why, who: r.reject(h, reason=why, steward=who),
        spec,
        reason,
        db=db,
        home=home,
        identity=identity,
        site=site,
        steward=steward,
        spec_file=spec_file,
        verb="rejected",
        report=report,
    )


@approval_app.command("list")
def approval_list(
    db: DbOption = None,
    home: SiteHomeOption = None,
    status: Annotated[ApprovalStatus | None, typer.Option("--status", help="Only this status.")] = None,
) -> None:
    """List the study specs this site has received or registered, with their status."""
    _one_source(db=db, home=home)
    with _errors_as_messages():
        if home is not None:
            with _site_governance(home) as governance:
                rows = _list_approvals(governance.engine, status)
        else:
            rows = _list_approvals(_engine(db or ""), status)
    if not rows:
        typer.echo("no study specs submitted")
    for line in rows:
        typer.echo(line)


def _list_approvals(engine: Engine, status: ApprovalStatus | None) -> list[str]:
    out = []
    for a in list_study_approvals(engine, status=status):
        decided = f" by {shown(a.decided_by)}: {shown(a.reason)}" if a.decided_by else ""
        signed = "signed" if a.signed else "unsigned"
        owner = shown(a.owner)
        out.append(f"{a.spec_hash}  {a.status.value:<8}  {shown(a.study)} ({signed}, owner {owner}){decided}")
    return out


# --- consent ------------------------------------------------------------------------------------------------


class ConsentFormat(StrEnum):
    AUTO = "auto"
    CSV = "csv"
    FHIR = "fhir"


consent_app = _group("consent", "Patient consent records at this site.")


@contextmanager
def _consent_registry(
    db: str | None, home: Path | None, identity: Path | None, site: str
) -> Iterator[ConsentRegistry]:
    _one_source(db=db, home=home)
    if home is not None:
        with _site_governance(home) as governance:
            yield governance.consent()
        return
    log = _audit_log(db or "", identity, site)
    yield ConsentRegistry(log.engine, log)


@consent_app.command("import")
def consent_import(
    file: Annotated[
        Path, typer.Argument(help="A consent CSV, or FHIR R4 Consent JSON (Bundle or resource).")
    ],
    db: DbOption = None,
    home: SiteHomeOption = None,
    identity: IdentityOption = None,
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
    with _errors_as_messages(), _consent_registry(db, home, identity, site) as registry:
        summary = registry.import_csv(file) if kind is ConsentFormat.CSV else registry.import_fhir(file)
    typer.echo(
        f"imported {file.name}: {summary.added} added, {summary.updated} updated, "
        f"{summary.unchanged} unchanged, {summary.withdrawn} withdrawn, {summary.skipped} skipped"
    )


@consent_app.command("withdraw")
def consent_withdraw(
    patient: Annotated[str, typer.Argument(help="The pseudonymous patient id.")],
    db: DbOption = None,
    home: SiteHomeOption = None,
    identity: IdentityOption = None,
    purpose: Annotated[
        str | None, typer.Option("--purpose", help="Only this purpose (default: all).")
    ] = None,
    site: SiteOption = "site",
    report: Annotated[
        bool,
        typer.Option(
            "--report/--no-report",
            help="With --home: send the notice to the orchestrator, which flags the affected models.",
        ),
    ] = True,
) -> None:
    """Withdraw a patient's consent now; prints the notice for the orchestrator (snapshot hashes, no id)."""
    with _errors_as_messages():
        with _consent_registry(db, home, identity, site) as registry:
            notice = registry.withdraw(patient, purpose)
        typer.echo(json.dumps(notice.to_json(), sort_keys=True))
        if home is not None and report:
            _send_notices(home, [notice])


@consent_app.command("sync")
def consent_sync(home: Annotated[Path, typer.Option("--home", help="The site's home.")]) -> None:
    """Send every withdrawal notice in the site's log to the orchestrator again (it ignores repeats)."""
    from fedhealth.agent import withdrawal_notices

    with _errors_as_messages():
        with _site_governance(home) as governance:
            notices = withdrawal_notices(governance)
        _send_notices(home, notices)


def _send_notices(home: Path, notices: Sequence[WithdrawalNotice]) -> None:
    from fedhealth.agent import SiteHome, report_withdrawals

    if not notices:
        typer.echo("no withdrawal notices to send", err=True)
        return
    flagged = report_withdrawals(SiteHome(home), notices)
    typer.echo(
        f"sent {len(notices)} withdrawal notice(s) to the orchestrator; "
        f"{len(flagged)} model version(s) flagged",
        err=True,
    )


# --- keyed commitments: opening them to an auditor -------------------------------------------------------

commitment_app = _group("commitments", "Open this site's keyed commitments to an auditor.")


@commitment_app.command("reveal-commitment-key")
def reveal_commitment_key(
    study: Annotated[str, typer.Argument(help="The study id whose commitments to open.")],
    to: Annotated[str, typer.Option("--to", help="Who receives the key (written to the site's log).")],
    home: Annotated[Path, typer.Option("--home", help="The site's home.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the key and openings here (mode 0600), not stdout.")
    ] = None,
) -> None:
    """Reveal the study's commitment key with the opening (task, kind, digest) of every commitment this site
    attested for it, so that an auditor can check them (`fedhealth audit verify-commitments FILE`). The
    disclosure is an entry of the site's audit log."""
    from fedhealth.crypto import write_private

    with _errors_as_messages():
        with _site_governance(home) as governance:
            revelation = governance.commitments.reveal(study, to=to)
        text = json.dumps(revelation.to_json(), indent=2, sort_keys=True)
        if out is None:
            typer.echo(text)
        else:
            write_private(out, text.encode())
    typer.echo(
        f"revealed the commitment key of study {shown(study)} to {shown(to)} "
        f"({len(revelation.openings)} opening(s))",
        err=True,
    )


@audit_app.command("verify-commitments")
def audit_verify_commitments(
    file: Annotated[Path, typer.Argument(help="What `fedhealth site reveal-commitment-key` wrote.")],
    commitment: Annotated[
        list[str] | None,
        typer.Option(
            "--commitment", help="An attested commitment (e.g. from provenance) that must be opened here."
        ),
    ] = None,
) -> None:
    """Check every opening of a revealed commitment key; with --commitment, also that each given commitment
    is among them. Exit 1 at the first that fails."""
    from fedhealth.core import CryptoError
    from fedhealth.governance import Revelation

    with _errors_as_messages():
        try:
            body = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:  # not UTF-8, not JSON
            _fail(f"{file}: not JSON ({' '.join(str(exc).split())[:200]})", EXIT_RUNTIME)
        if not isinstance(body, dict):
            _fail(
                f"{file}: not a revelation (`fedhealth site reveal-commitment-key` writes one)", EXIT_RUNTIME
            )
        revelation = Revelation.from_json(body)
    try:
        revelation.verify()
    except CryptoError as exc:
        _fail(str(exc), EXIT_BAD_ENTRY)
    opened = {o.commitment: o for o in revelation.openings}
    for value in commitment or []:
        if value not in opened:
            _fail(f"commitment {value} is not among the openings of study {revelation.study_id}", 1)
        o = opened[value]
        typer.echo(f"{shown(value)}: {o.kind.value} of task {shown(o.task_id)} = {shown(o.digest)}")
    typer.echo(f"{len(revelation.openings)} opening(s) of study {shown(revelation.study_id)} verified")


# --- the demo's closing governance summary ----------------------------------------------------------------


def print_governance_summary(
    console: Console,
    orchestrator: Path,
    sites: Sequence[Path],
    model: str | None,
    card: Path,
) -> bool:
    """Print ``audit verify`` for the orchestrator and every site (each against the other side's anchors) and
    write the model card of ``model``; returns whether every log verified."""
    from rich.table import Table

    table = Table(title="Audit logs: fedhealth audit verify --home ... --peer ...")
    table.add_column("log")
    table.add_column("result")
    results = verify_federation(orchestrator, sites)
    for name, report in results:
        style = "green" if report.ok else "bold red"
        result = shown_cell(report.summary())
        result.stylize(style)
        table.add_row(shown_cell(name), result)
    console.print(table)
    if model is not None:
        digest = write_model_card(orchestrator, model, card)
        console.print(f"model card of {digest[:12]}…: {card}")
    return all(report.ok for _, report in results)
