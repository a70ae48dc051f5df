"""``fedhealth demo``: a whole federation on this machine, start to finish, with live progress."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedhealth.core import refuse_foreign_folder, write_private_file
from fedhealth.protocol import SecureAggregationSpec, StudyInfo, StudySpec, StudyStatus, TaskKind


class DemoDataset(StrEnum):
    BREAST_CANCER = "breast-cancer"
    HEART_DISEASE = "heart-disease"
    BREASTMNIST = "breastmnist"  # images: the torch recipe's small CNN (the imaging extra)


def demo_federation(
    dataset: DemoDataset, rounds: int | None, site_keys: Mapping[str, str] | None = None
) -> tuple[dict[str, str], StudySpec]:
    """The sites (name -> dataset URI) and the study of the demo, from the learning presets; with secure
    aggregation when the enrolled sites' key fingerprints are given (the spec names them)."""
    from fedhealth.learning import BREAST_CANCER_PRESETS, HEART_DISEASE_PRESETS
    from fedhealth.runtime import preset_study

    if dataset is DemoDataset.BREASTMNIST:
        return _imaging_federation(rounds, site_keys)
    if dataset is DemoDataset.HEART_DISEASE:
        sites = {
            "cleveland": "builtin://heart-disease/0",
            "hungary": "builtin://heart-disease/1",
            "switzerland": "builtin://heart-disease/2",
            "long-beach": "builtin://heart-disease/3",
        }
        preset = HEART_DISEASE_PRESETS["fedyogi"]
    else:
        sites = {f"hospital-{c}": f"builtin://breast-cancer/{i}?sites=4&seed=0" for i, c in enumerate("abcd")}
        preset = BREAST_CANCER_PRESETS["fedavg"]
    spec = preset_study(
        preset,
        name=f"demo-{dataset.value}",
        dataset=dataset.value,
        train_sites=sorted(sites),
        min_sites=3,
        round_deadline_s=120.0,
        seed=0,
        secure_aggregation=SecureAggregationSpec(stage_timeout_s=30.0, site_keys=dict(site_keys))
        if site_keys is not None
        else None,
    )
    if rounds is not None:
        spec = spec.model_copy(update={"rounds": rounds})
    return sites, spec


def _imaging_federation(
    rounds: int | None, site_keys: Mapping[str, str] | None
) -> tuple[dict[str, str], StudySpec]:
    """BreastMNIST split into 4 hospitals with label and size skew, the small CNN trained with FedAvg."""
    from fedhealth.learning import BREASTMNIST_PARAMS, BREASTMNIST_ROUNDS, TORCH_RECIPE
    from fedhealth.runtime import recipe_spec

    sites = {f"hospital-{c}": f"builtin://breastmnist/{i}?sites=4&seed=0" for i, c in enumerate("abcd")}
    spec = StudySpec(
        name="demo-breastmnist",
        dataset=DemoDataset.BREASTMNIST.value,
        recipe=recipe_spec(TORCH_RECIPE, BREASTMNIST_PARAMS),
        rounds=rounds if rounds is not None else BREASTMNIST_ROUNDS,
        train_sites=sorted(sites),
        min_sites=3,
        round_deadline_s=300.0,
        seed=0,
        secure_aggregation=SecureAggregationSpec(stage_timeout_s=60.0, site_keys=dict(site_keys))
        if site_keys is not None
        else None,
    )
    return sites, spec


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _site_table(info: StudyInfo) -> Group:
    secure = info.spec.secure_aggregation is not None
    table = Table(expand=False, title="Sites" + (" (secure aggregation)" if secure else ""))
    columns = ["site", "round", "state"] + ([] if secure else ["train n", "loss", "val. acc", "AUC"])
    for col in columns:
        table.add_column(col, justify="left" if col in ("site", "round", "state") else "right")
    latest: dict[str, tuple[str, str, object]] = {}
    for r in info.rounds:
        for t in r.tasks:
            latest[t.site] = (f"{r.number} {r.kind.value}", t.status.value, t.metrics)
    for site in sorted({*info.spec.train_sites, *info.spec.evaluation_sites}):
        task, state, m = latest.get(site, ("–", "–", None))
        cells = [site, task, state]
        if not secure:
            cells += [
                str(getattr(m, "num_samples", "–") or "–"),
                _fmt(getattr(m, "train_loss", None)),
                _fmt(getattr(m, "accuracy", None)),
                _fmt(getattr(m, "auc", None)),
            ]
        table.add_row(*cells)
    done = [r for r in info.rounds if r.metrics and r.kind is TaskKind.TRAIN]
    if not done:
        return Group(table)
    m = done[-1].metrics or {}
    where = "the secure sum" if secure else "the sites' reports"
    line = (
        f"round {done[-1].number}: {m.get('sites', '?')} sites, train loss {_fmt(m.get('train_loss'))}, "
        f"mean local val. accuracy {_fmt(m.get('accuracy'))} (from {where})"
    )
    return Group(table, line)


def _site_records(home: Path, study_id: str) -> dict[str, Any] | None:
    """The last evaluation a site recorded for itself (its ``results.jsonl``): read here because the demo
    plays every site too; under secure aggregation these figures never reach the orchestrator."""
    path = home / "results.jsonl"
    if not path.exists():
        return None
    found = None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["study_id"] == study_id and record["kind"] == TaskKind.EVALUATE.value:
            found = record["metrics"]
    return found


def run_demo(
    dataset: DemoDataset = DemoDataset.BREAST_CANCER,
    rounds: int | None = None,
    out: Path = Path("demo-output"),
    console: Console | None = None,
    secure: bool = True,
) -> int:
    from fedhealth.sim import LocalFederation  # the services load slowly: only for this command

    console = console or Console()
    sites, spec = demo_federation(dataset, rounds)  # the secure spec follows once the sites have keys
    # the demo sites' keys and databases go under it: not into a folder another account can reach
    refuse_foreign_folder(out, what="the demo's output folder")
    state = out / "state"
    if state.is_symlink():  # planted: removed, never followed (rmtree refuses a link, silently here)
        state.unlink()
    shutil.rmtree(state, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    console.print(
        f"[bold]fedhealth demo[/]: {len(sites)} sites, dataset [cyan]{dataset.value}[/], "
        f"{spec.rounds} rounds of {spec.strategy.name.value}"
        + (", secure aggregation (SecAgg+)" if secure else "")
    )
    fed = LocalFederation(state, log_level="warning")
    try:
        url = fed.start_orchestrator()
        console.print(f"orchestrator at {url} (logs in {fed.logs})")
        for site, uri in sites.items():
            fed.add_site(site)
            fed.start_agent(site, {spec.dataset: uri})
        with console.status("waiting for the sites to connect"):
            fed.wait_for_sites(list(sites))
        if secure:  # the spec names every site's identity-key fingerprint: the stewards approve those too
            _, spec = demo_federation(dataset, rounds, fed.site_keys(sorted(sites)))
        for site in sites:  # each hospital's data steward approves this exact spec (`fedhealth site approve`)
            digest = fed.approve(site, spec, reason="demo study reviewed by the data steward")
            console.print(f"  {site}: data steward approved spec {digest[:12]}…")
        study = fed.create_study(spec, approve=False)
        progress = Progress(
            TextColumn("[bold blue]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        bar = progress.add_task("rounds", total=spec.rounds)
        with Live(
            Group(progress, _site_table(study)), console=console, refresh_per_second=8, transient=False
        ) as live:

            def show(info: StudyInfo) -> None:
                progress.update(bar, completed=info.completed_rounds)
                live.update(Group(progress, _site_table(info)))

            final = fed.wait_for_study(study.study_id, timeout=600, on_progress=show)
        console.print()
        report = fed.report(study.study_id)
        model_path = out / "model.safetensors"
        # through a new file renamed into place: a link planted in the output folder is replaced
        write_private_file(model_path, fed.model_bytes(study.study_id))
        from fedhealth.orchestrator import report_markdown  # the report's Markdown form

        report_md = out / "report.md"
        write_private_file(report_md, report_markdown(report).encode("utf-8"))
        write_private_file(out / "report.json", json.dumps(report, indent=2).encode("utf-8"))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping the orchestrator and the agents[/]")
        fed.stop_all()
        console.print("all processes stopped")
        return 130
    finally:
        fed.stop_all()
    wall = time.monotonic() - started
    from fedhealth.cli._governance import print_governance_summary

    def governance_summary(model: str | None) -> bool:  # audit verify of every log, and the model card
        homes = [fed.site_home(site).root for site in sites]
        return print_governance_summary(console, fed.home.root, homes, model, out / "model-card.md")

    if final.status is not StudyStatus.COMPLETED:
        from rich.markup import escape

        from fedhealth.cli._common import shown

        console.print(f"[red]study {final.status.value}[/]: {escape(shown(final.reason or ''))}")
        governance_summary(None)
        return 1
    evaluation = report["evaluation"] or {}
    per_site = evaluation.get("per_site") or {}
    title = "Final model, evaluated on each site's held-out data"
    if secure:  # the orchestrator only has the secure sum: per-site rows come from each site's own record
        per_site = {s: m for s in sites if (m := _site_records(fed.site_home(s).root, final.study_id))}
        title += "\n(per site: each site's own record, never sent; mean: from the secure sum)"
    table = Table(title=title)
    for col in ("site", "test n", "accuracy", "AUC"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site, m in sorted(per_site.items()):
        table.add_row(site, str(m["num_eval_samples"]), _fmt(m["accuracy"]), _fmt(m["auc"]))
    table.add_row(
        "[bold]mean", "", f"[bold]{_fmt(evaluation.get('accuracy'))}", f"[bold]{_fmt(evaluation.get('auc'))}"
    )
    console.print(table)
    console.print(
        f"rounds: {final.completed_rounds}   wall time: {wall:.1f} s   "
        f"model: {model_path} (sha256 {(final.model_digest or '?')[:12]}…)   report: {report_md}"
    )
    return 0 if governance_summary(final.model_digest) else 1


def demo(
    dataset: Annotated[
        DemoDataset,
        typer.Option(
            help="breast-cancer (offline, bundled), heart-disease (4 real hospitals) or breastmnist "
            "(ultrasound images, a CNN; needs the imaging extra and the BreastMNIST file)."
        ),
    ] = DemoDataset.BREAST_CANCER,
    rounds: Annotated[
        int | None,
        typer.Option(min=1, max=100_000, help="Training rounds (default: the dataset's preset)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where the model, the report and the logs go.")] = Path(
        "demo-output"
    ),
    secure: Annotated[
        bool, typer.Option(help="Secure aggregation (SecAgg+); --no-secure for plain FedAvg.")
    ] = True,
) -> None:
    """Start an orchestrator and 4 site agents on this machine and train one model together."""
    from fedhealth.cli._services import friendly_errors

    with friendly_errors():  # e.g. an output folder another account owns: one line, no traceback
        code = run_demo(dataset, rounds, out, secure=secure)
    sys.exit(code)
