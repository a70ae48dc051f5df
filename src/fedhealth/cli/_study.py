"""``fedhealth study ...``: write a spec, hash it for the stewards, submit it signed, watch it, fetch results.

    study init --recipe logreg --dataset D --site A --site B [--features N] > or --out study.toml
    study hash study.toml                 the hash each site's data steward approves
    study submit study.toml               signed with the owner's key; prints the study id
    study list | status ID [--watch] | cancel ID | download ID --model FILE [--report FILE]

A submitted study waits in ``awaiting_approval`` until every site it names has approved its spec hash
(``fedhealth site approvals show HASH`` then ``fedhealth site approve HASH`` at each site), then runs. It
fails if a site rejects it or its approval deadline (``--approval-wait``, default 7 days) passes first.
Exit codes: 0 success (``status --watch``: the study completed); 1 a failure (``status --watch``: the study
failed or was cancelled); 2 a usage error.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedhealth.cli._common import (
    CredentialOption,
    JsonOption,
    UrlOption,
    operator_client,
    parse_duration,
    print_json,
    shown,
    shown_cell,
)
from fedhealth.cli._errors import fail, usage
from fedhealth.protocol import ApprovalState, StudyInfo, StudyStatus, TaskStatus

if TYPE_CHECKING:
    from fedhealth.client import OperatorClient

study_app = typer.Typer(help="Write, submit and follow studies.", no_args_is_help=True)
SpecArgument = Annotated[Path, typer.Argument(dir_okay=False, help="The study spec file (TOML, or .json).")]
IdArgument = Annotated[str, typer.Argument(help="The study id (`study submit` printed it).")]
_ENDED = (StudyStatus.COMPLETED, StudyStatus.FAILED, StudyStatus.CANCELLED)


@study_app.command("init")
def study_init(
    recipe: Annotated[str, typer.Option(help="What each site trains: an installed recipe (e.g. logreg).")],
    dataset: Annotated[str, typer.Option(help="The dataset name the sites registered.")],
    site: Annotated[list[str] | None, typer.Option("--site", help="A training site (repeatable).")] = None,
    features: Annotated[
        str | None,
        typer.Option(
            help="logreg: the dataset's feature columns, in order (age,sbp,chol: a model package selects "
            "them by name), or only their number."
        ),
    ] = None,
    name: Annotated[str, typer.Option(help="The study's name.")] = "my-study",
    owner: Annotated[str, typer.Option(help="Your operator account (the spec's owner).")] = "admin",
    rounds: Annotated[int, typer.Option(min=1, help="Training rounds.")] = 5,
    out: Annotated[Path, typer.Option(help="File to write ('-': standard output).")] = Path("study.toml"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented study spec template to edit before `study hash` and `study submit`."""
    from fedhealth.client import spec_template
    from fedhealth.core import InputError
    from fedhealth.learning import UnknownRecipeError

    width, names = _features(features)
    try:
        text = spec_template(
            recipe=recipe,
            dataset=dataset,
            sites=sorted(site or []),
            name=name,
            owner=owner,
            features=width,
            rounds=rounds,
            feature_names=names,
        )
    except UnknownRecipeError as exc:
        fail(str(exc), "install the package that provides it, or pick one of the installed recipes")
    except InputError as exc:
        fail(str(exc), "see `fedhealth study init --help`")
    _check_given_fields(text)
    if str(out) == "-":
        typer.echo(text, nl=False)
        return
    _write_output(out, text.encode("utf-8"), force=force)
    typer.echo(f"wrote {out}; edit it, then `fedhealth study hash {out}`", err=True)


def _check_given_fields(text: str) -> None:
    """Refuse, before anything is written, a template whose fields from the command line (--name, --owner,
    --dataset, --site, --rounds) the spec would not accept: each named with its rule in words. The recipe's
    own lines are left to the editor (a plug-in's template may need editing)."""
    import tomllib

    from pydantic import ValidationError

    from fedhealth.client import field_errors
    from fedhealth.protocol import StudySpec

    try:
        StudySpec.model_validate(tomllib.loads(text))
    except ValidationError as exc:
        given = ("name", "owner", "dataset", "train_sites", "rounds", "min_sites")
        bad = [e for e in exc.errors() if e["loc"] and e["loc"][0] in given]
        if bad:
            fail(field_errors(bad), "see `fedhealth study init --help`")
    except tomllib.TOMLDecodeError as exc:  # a value the template cannot spell
        fail(f"the template cannot be written: {exc}", "see `fedhealth study init --help`")


def _features(value: str | None) -> tuple[int | None, list[str] | None]:
    """``--features``: a number of columns, or their names separated by commas."""
    if value is None:
        return None, None
    text = value.strip()
    if text.isdigit() and not text.isascii():  # '²' or '３': a number, but not one int() reads as meant
        fail(f"--features {value!r}: write the number with the digits 0-9", "or give the column names")
    if text.isdigit():
        if int(text) < 1:
            fail("--features must be at least 1", "give the number of feature columns, or their names")
        return int(text), None
    names = [n.strip() for n in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        fail(
            f"--features {value!r} is not a list of distinct column names",
            "separate the names with commas, e.g. --features age,sbp,chol",
        )
    return len(names), names


@study_app.command("hash")
def study_hash(spec: SpecArgument, as_json: JsonOption = False) -> None:
    """Print the spec hash each site's data steward approves (of the spec as the sites will receive it)."""
    from fedhealth.client import load_spec, study_spec_hash

    loaded = load_spec(spec)
    digest = study_spec_hash(loaded)
    if as_json:
        sites = sorted({*loaded.train_sites, *loaded.evaluation_sites})
        print_json({"spec_hash": digest, "name": loaded.name, "sites": sites})
        return
    typer.echo(digest)


@study_app.command("submit")
def study_submit(
    spec: SpecArgument,
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    signing_key: Annotated[
        Path | None,
        typer.Option(
            help="Your Ed25519 spec-signing key (default: beside the credential; made on first use)."
        ),
    ] = None,
    approval_wait: Annotated[
        str | None,
        typer.Option(
            help="How long the study waits for the sites' approvals (e.g. 90s, 12h, 7d; default 7d)."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a study signed with your key; print its id. It runs once every named site approved it."""
    from fedhealth.client import load_signing_key, load_spec, signing_key_path

    wait = parse_duration(approval_wait, "--approval-wait") if approval_wait is not None else None
    loaded = load_spec(spec)
    with operator_client(credential, orchestrator) as client:  # a bad credential or URL: no key made
        key = load_signing_key(signing_key or signing_key_path(credential))
        if loaded.owner != client.user:
            fail(
                f"the spec's owner is {loaded.owner!r} but the credential is {client.user!r}'s",
                f"set owner = {client.user!r} in {spec}",
            )
        info = client.submit_study(loaded, key, approval_wait_s=wait)
    if as_json:
        print_json(info)
        return
    typer.echo(shown(info.study_id))
    typer.echo(_state_line(info), err=True)


def _state_line(info: StudyInfo) -> str:
    if info.status is StudyStatus.AWAITING_APPROVAL:
        waiting = [s for s, state in info.approvals.items() if state is not ApprovalState.APPROVED]
        return shown(
            f"study {info.study_id} awaits the approval of {', '.join(waiting)} "
            f"(spec {info.spec_hash}); each steward runs `fedhealth site approvals show {info.spec_hash}`"
        )
    return shown(
        f"study {info.study_id} is {info.status.value}" + (f": {info.reason}" if info.reason else "")
    )


@study_app.command("list")
def study_list(
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    status: Annotated[StudyStatus | None, typer.Option(help="Only studies in this state.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List the studies, oldest first."""
    with operator_client(credential, orchestrator) as client:
        studies = client.studies(status)
    if as_json:
        print_json(studies)
        return
    if not studies:
        typer.echo("no studies", err=True)
    for s in studies:
        progress = f"{s.completed_rounds}/{s.spec.rounds} rounds"
        typer.echo(
            f"{shown(s.study_id)}\t{shown(s.spec.name)}\t{s.status.value}\t{progress}\t"
            f"{s.created_at:%Y-%m-%d %H:%M}"
        )


@study_app.command("status")
def study_status(
    study_id: IdArgument,
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    watch: Annotated[
        bool, typer.Option(help="Refresh until the study ends; exit 1 unless it completed.")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes with --watch.")] = 2.0,
    timeout: Annotated[
        float | None, typer.Option(min=1, help="With --watch: give up after this many seconds.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a study: its state, the approvals outstanding, each round and each site's task, the metrics."""
    from rich.console import Console
    from rich.live import Live

    with operator_client(credential, orchestrator) as client:
        info = client.study(study_id)
        if watch and not as_json:
            console = Console()
            started = time.monotonic()
            with Live(_status_view(info), console=console, auto_refresh=False, transient=False) as live:
                while info.status not in _ENDED:
                    if timeout is not None and time.monotonic() - started > timeout:
                        fail(f"study {study_id} is still {info.status.value} after {timeout:g} s")
                    info = _refreshed(client, info, interval, started, timeout)
                    live.update(_status_view(info), refresh=True)
        elif watch:
            started = time.monotonic()
            while info.status not in _ENDED:
                if timeout is not None and time.monotonic() - started > timeout:
                    fail(f"study {study_id} is still {info.status.value} after {timeout:g} s")
                info = _refreshed(client, info, interval, started, timeout)
    if as_json:
        print_json(info)
    elif not watch:
        from rich.console import Console

        Console().print(_status_view(info))
    if watch and info.status is not StudyStatus.COMPLETED:
        fail(f"study {study_id} {info.status.value}" + (f": {info.reason}" if info.reason else ""))


def _refreshed(
    client: OperatorClient, info: StudyInfo, interval: float, started: float, timeout: float | None
) -> StudyInfo:
    """The study's state after ``interval``. A 429 (the orchestrator's rate limit) is waited out, as
    ``OperatorClient.wait_for_study`` does: its Retry-After lengthens the pause up to
    ``OperatorClient.MAX_PAUSE_S``, never past ``timeout`` (then the last state seen: the caller gives up)."""
    from fedhealth.client import ClientError, OperatorClient

    pause = interval
    while True:
        time.sleep(pause)
        try:
            return client.study(info.study_id)
        except ClientError as exc:
            if exc.status != 429:
                raise
            asked = (exc.retry_after or "").strip()
            wanted = float(asked) if asked.replace(".", "", 1).isdigit() else 0.0  # a date, garbage: 0
            pause = min(OperatorClient.MAX_PAUSE_S, max(interval, wanted))  # float("9" * 400) is inf
            if timeout is not None:
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    return info
                pause = min(pause, left)


def _status_view(info: StudyInfo) -> object:
    from rich.console import Group
    from rich.table import Table

    head = shown_cell(
        f"study {info.study_id} ({info.spec.name}): {info.status.value}, "
        f"{info.completed_rounds}/{info.spec.rounds} training rounds done"
    )
    parts: list[object] = [head]
    if info.reason:
        parts.append(shown_cell(f"reason: {info.reason}"))
    outstanding = {s: st for s, st in info.approvals.items() if st is not ApprovalState.APPROVED}
    if info.status is StudyStatus.AWAITING_APPROVAL:
        deadline = (
            f" (deadline {info.approval_deadline:%Y-%m-%d %H:%M} UTC)" if info.approval_deadline else ""
        )
        waiting = ", ".join(f"{s}: {st.value}" for s, st in outstanding.items())
        parts.append(shown_cell(f"approvals outstanding: {waiting}{deadline}; spec {info.spec_hash}"))
    sites = sorted({t.site for r in info.rounds for t in r.tasks})
    if info.rounds:
        table = Table(show_edge=False)
        table.add_column("round", justify="right")
        table.add_column("kind")
        table.add_column("status")
        for site in sites:
            table.add_column(shown_cell(site))  # a Text header: rich reads no markup in a site's name
        table.add_column("metrics")
        for r in info.rounds:
            states = {t.site: _task_state(t.status) for t in r.tasks}
            table.add_row(
                str(r.number),
                r.kind.value,
                r.status.value,
                *[states.get(site, "") for site in sites],
                _metrics(r.metrics),
            )
        parts.append(table)
    return Group(*parts)  # type: ignore[arg-type]


def _task_state(status: TaskStatus) -> str:
    return status.value.replace("_", " ")


def _metrics(metrics: dict[str, object] | None) -> str:
    if not metrics:
        return ""
    shown = []
    for key in ("train_loss", "eval_loss", "accuracy", "auc"):
        value = metrics.get(key)
        if isinstance(value, int | float):
            shown.append(f"{key} {value:.4g}")
    return ", ".join(shown)


@study_app.command("cancel")
def study_cancel(
    study_id: IdArgument,
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
) -> None:
    """Cancel a study that is awaiting approval or running."""
    with operator_client(credential, orchestrator) as client:
        info = client.cancel_study(study_id)
    typer.echo(f"study {shown(info.study_id)} is {info.status.value}")


@study_app.command("download")
def study_download(
    study_id: IdArgument,
    model: Annotated[Path | None, typer.Option(help="Write the model (safetensors) here.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the study report (JSON) here.")] = None,
    force: Annotated[bool, typer.Option(help="Replace files that exist already.")] = False,
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
) -> None:
    """Download a study's model and/or its report (each written 0600; an existing file only with --force)."""
    import hashlib

    if model is None and report is None:
        usage("nothing to download", "give --model FILE and/or --report FILE")
    for out in (model, report):
        if out is not None and not force and os.path.lexists(out):  # before anything is downloaded
            fail(f"{out} exists already", "pass --force to replace it, or give another file")
    with operator_client(credential, orchestrator) as client:
        if model is not None:
            info = client.study(study_id)
            if info.status is not StudyStatus.COMPLETED:
                typer.echo(
                    f"warning: study {shown(study_id)} is {info.status.value}; its latest model is saved",
                    err=True,
                )
            blob = client.model_bytes(study_id)
            _write_output(model, blob, force=force)
            typer.echo(f"model {hashlib.sha256(blob).hexdigest()[:16]}… written to {model}")
        if report is not None:
            text = json.dumps(client.report(study_id), indent=2, sort_keys=True)
            _write_output(report, text.encode("utf-8"), force=force)
            typer.echo(f"report written to {report}")


def _write_output(path: Path, data: bytes, *, force: bool) -> None:
    """Write a file the operator asked for: 0600 (a model and a report stay with whoever downloaded them),
    atomically, through a new file beside it, so a symbolic link another account planted at ``path`` is
    replaced, never written through; a file already there (a link too) only with ``--force``."""
    from fedhealth.core import write_private_file

    try:
        write_private_file(path, data, overwrite=force)
    except FileExistsError:
        fail(f"{path} exists already", "pass --force to replace it, or give another file")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}")
