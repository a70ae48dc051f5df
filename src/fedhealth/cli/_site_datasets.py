"""``fedhealth site dataset ...``: the datasets a site offers to studies, registered once in its home.

    site dataset add NAME FILE.csv|FILE.parquet --label COLUMN [--id COLUMN] [--schema FILE.toml]
                     [--classes K] --home HOME
    site dataset add NAME URI --home HOME          (file:///...?label=...&id=..., sql+postgresql://...,
                                                    omop+postgresql://..., fhir+https://..., builtin://...)
    site dataset list | check [NAME] | remove NAME --home HOME
    site dataset sync-consent NAME --home HOME     (FHIR: the server's Consent resources -> consent registry)

Each dataset is checked when it is added (nothing is registered if the check fails; its schema is pinned)
and again when ``fedhealth site serve`` starts. The id column is used for consent and never becomes a
feature. ``check`` prints each dataset's data-quality report (missing values, ranges, far-out values,
category counts): it stays on this screen, nothing of it is sent. URIs are shown with secrets as ``***``.
docs/connectors.md has a worked example per source.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedhealth.cli._common import JsonOption, print_json, shown
from fedhealth.cli._errors import usage

if TYPE_CHECKING:
    from fedhealth.agent import DatasetSummary, SiteDatasets
    from fedhealth.governance import ConsentImportSummary

dataset_app = typer.Typer(help="The datasets this site offers to studies.", no_args_is_help=True)
SiteHomeOption = Annotated[Path, typer.Option("--home", help="The site's home (from `site enroll`).")]
DataDirOption = Annotated[
    Path | None, typer.Option(help="Folder of downloaded builtin datasets (default $FEDHEALTH_DATA_DIR).")
]


def _registry(home: Path) -> SiteDatasets:
    from fedhealth.agent import SiteDatasets, SiteHome

    site = SiteHome(home)
    site.require()
    return SiteDatasets(site)


def _uri(
    source: str, label: str | None, id_column: str | None, schema: Path | None, classes: int | None = None
) -> str:
    from fedhealth.agent import csv_uri

    if "://" in source:
        if label is not None or id_column is not None or schema is not None or classes is not None:
            usage(
                "--label, --id, --schema and --classes go with a file path, not a URI",
                "put them in the URI: ?label=...&id=...&schema=/abs/schema.toml&classes=K",
            )
        return source
    if label is None and schema is None:
        usage(f"{source} is a file path: name its label column with --label COLUMN (or give --schema)")
    return csv_uri(Path(source), label=label, id_column=id_column, schema=schema, classes=classes)


@dataset_app.command("add")
def dataset_add(
    name: Annotated[str, typer.Argument(help="The name studies use (the spec's `dataset`).")],
    source: Annotated[str, typer.Argument(help="A CSV file path, or a dataset URI.")],
    home: SiteHomeOption,
    label: Annotated[str | None, typer.Option(help="CSV: the label column (0 or 1; see --classes).")] = None,
    id_column: Annotated[
        str | None,
        typer.Option("--id", help="File: the patient id column (for consent; never a feature)."),
    ] = None,
    schema: Annotated[
        Path | None,
        typer.Option(help="File: a schema (TOML) declaring categories, dates and missing-value policies."),
    ] = None,
    classes: Annotated[
        int | None,
        typer.Option(min=2, max=256, help="File: the label's classes when more than two (labels 0 to K-1)."),
    ] = None,
    replace: Annotated[bool, typer.Option(help="Replace a dataset of the same name.")] = False,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a dataset and register it under NAME (its schema is pinned: see `site dataset check`)."""
    from fedhealth.agent import feeds_consent, sync_consent

    uri = _uri(source, label, id_column, schema, classes)
    registry = _registry(home)
    summary = registry.add(name, uri, data_dir=data_dir, replace=replace)
    imported = sync_consent(registry.home, name, uri) if feeds_consent(uri) else None
    if as_json:
        out = summary.to_json()
        if imported is not None:
            out["consent"] = imported.to_json()
        print_json(out)
        return
    typer.echo(_line(summary))
    if imported is not None:
        typer.echo(_consent_line(imported))


def _consent_line(summary: ConsentImportSummary) -> str:
    return (
        f"consent from the FHIR server: {summary.added} added, {summary.updated} updated, "
        f"{summary.unchanged} unchanged, {summary.withdrawn} withdrawn, {summary.skipped} skipped"
    )


def _line(summary: DatasetSummary) -> str:
    roles = []
    if summary.label is not None:
        roles.append(f"label {shown(summary.label)}")
    if summary.id_column is not None:
        roles.append(f"id {shown(summary.id_column)}")
    extra = f", {', '.join(roles)}" if roles else ""
    return (
        f"{shown(summary.name)}\t{summary.rows} rows, {len(summary.features)} features{extra}\t"
        f"{shown(summary.uri)}"
    )


@dataset_app.command("list")
def dataset_list(home: SiteHomeOption, data_dir: DataDirOption = None, as_json: JsonOption = False) -> None:
    """List the registered datasets, each checked now (rows, features, label and id columns)."""
    from fedhealth.agent import DatasetCheckError, check_dataset
    from fedhealth.data import redact_uri

    registry = _registry(home)
    registered = registry.all()
    rows: list[dict[str, object]] = []
    for name, uri in registered.items():
        try:
            summary = check_dataset(name, uri, data_dir, pinned=registry.pinned(name))
            rows.append({**summary.to_json(), "ok": True})
        except DatasetCheckError as exc:
            rows.append({"name": name, "uri": redact_uri(uri), "ok": False, "error": str(exc)})
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no datasets registered (add one with `fedhealth site dataset add`)", err=True)
    for row in rows:
        if row["ok"]:
            features = row["features"]
            assert isinstance(features, list)
            label = f", label {shown(row['label'])}" if row.get("label") else ""
            id_column = f", id {shown(row['id_column'])}" if row.get("id_column") else ""
            typer.echo(
                f"{shown(row['name'])}\t{row['rows']} rows, {len(features)} features{label}{id_column}\t"
                f"{shown(row['uri'])}"
            )
        else:
            typer.echo(f"{shown(row['name'])}\tBROKEN: {shown(row['error'])}\t{shown(row['uri'])}")


@dataset_app.command("check")
def dataset_check(
    home: SiteHomeOption,
    name: Annotated[str | None, typer.Argument(help="One dataset (default: every one).")] = None,
    data_dir: DataDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check registered datasets as `site serve` will and print each one's data-quality report (for this
    screen only); exit 1 at the first that fails."""
    from fedhealth.agent import check_dataset

    registry = _registry(home)
    names = [name] if name is not None else list(registry.all())
    summaries = [check_dataset(n, registry.uri(n), data_dir, pinned=registry.pinned(n)) for n in names]
    if as_json:
        print_json([s.to_json(quality=True) for s in summaries])
        return
    for summary in summaries:
        typer.echo(f"ok: {_line(summary)}")
        if summary.schema is not None:
            how = "inferred from the source" if summary.schema_inferred else "declared"
            typer.echo(f"  schema ({how}): features {shown(', '.join(summary.features))}")
        if summary.quality is not None:
            for line in summary.quality.lines():
                typer.echo(f"  {shown(line)}")


@dataset_app.command("remove")
def dataset_remove(
    name: Annotated[str, typer.Argument(help="The dataset to unregister (its file is left alone).")],
    home: SiteHomeOption,
) -> None:
    """Unregister a dataset."""
    _registry(home).remove(name)
    typer.echo(f"dataset {name} removed")


@dataset_app.command("sync-consent")
def dataset_sync_consent(
    name: Annotated[str, typer.Argument(help="A FHIR dataset (fhir+https://...).")],
    home: SiteHomeOption,
    as_json: JsonOption = False,
) -> None:
    """Import the Consent resources of a FHIR dataset's server into this site's consent registry."""
    from fedhealth.agent import sync_consent

    registry = _registry(home)
    summary = sync_consent(registry.home, name)
    if as_json:
        print_json(summary.to_json())
        return
    typer.echo(_consent_line(summary))
