"""``fedhealth model predict`` (a downloaded model on the rows of a raw CSV file) and ``fedhealth model
export`` (a study's final model as a model package: docs/model-packages.md).

    fedhealth model export STUDY --out DIR [--force]
    fedhealth model scaling STATS-REPORT.json [--features a,b,c]
    fedhealth model predict --package DIR --csv new-patients.csv --id patient_id [--label target]

    fedhealth study download ID --model model.safetensors
    fedhealth model predict --model model.safetensors --csv new-patients.csv --id patient_id [--label target]

The CSV's columns other than the label and id columns are the features, in the order the study trained on
them. By default the file's features are standardized with its own mean and standard deviation, as each site
standardized its own data before training (``--scaling none`` for a file that is standardized already).
Prints one line per row (id, probability, prediction), or writes them with ``--out``; with ``--label`` it also
prints the accuracy and AUC on the file. With ``--package`` (a model package) the columns are selected by
name and preprocessed as the study declared; ``--scaling`` does not apply. In the ``--out`` file an id (or
the id column's name) that a spreadsheet would read as a formula is written as text
(:meth:`fedhealth.client.Predictions.to_csv`).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fedhealth.cli._common import CredentialOption, JsonOption, UrlOption, operator_client, print_json, shown
from fedhealth.cli._errors import fail, usage


class ScalingChoice(StrEnum):  # fedhealth.client.Scaling, without importing numpy for `--help`
    OWN = "own"
    NONE = "none"


def model_predict(
    csv: Annotated[Path, typer.Option(help="A CSV file with a header row and the study's feature columns.")],
    model: Annotated[
        Path | None, typer.Option(help="The model file (`fedhealth study download ID --model FILE`).")
    ] = None,
    label: Annotated[
        str | None, typer.Option(help="The label column, if the file has one (then accuracy and AUC).")
    ] = None,
    id_column: Annotated[
        str | None, typer.Option("--id", help="The id column naming each row (never a feature).")
    ] = None,
    scaling: Annotated[
        ScalingChoice, typer.Option(help="own: standardize with the file's own mean and std; none: as is.")
    ] = ScalingChoice.OWN,
    out: Annotated[Path | None, typer.Option(help="Write id,probability,prediction rows here.")] = None,
    package: Annotated[
        Path | None, typer.Option(help="A model package (`fedhealth model export`), instead of --model.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Predict with a downloaded model or a model package on each row of a CSV file."""
    from fedhealth.client import Scaling, load_model, predict_csv, predict_csv_with_package

    if (model is None) == (package is None):
        usage("give exactly one of --model FILE and --package DIR")
    if package is not None:
        digest, result = predict_csv_with_package(package, csv, label=label, id_column=id_column)
    else:
        assert model is not None
        loaded = load_model(model)
        digest = loaded.digest
        result = predict_csv(loaded, csv, label=label, id_column=id_column, scaling=Scaling(scaling.value))
    if out is not None:
        result.to_csv(out, id_column or "row")
    if as_json:
        print_json(
            {
                "model_digest": digest,
                "rows": len(result.row_ids),
                "accuracy": result.accuracy,
                "auc": result.auc,
                "predictions": [
                    {"id": rid, "probability": float(p), "prediction": int(p > 0.5)}
                    for rid, p in zip(result.row_ids, result.probabilities, strict=True)
                ],
            }
        )
        return
    if out is None:
        for rid, p in zip(result.row_ids, result.probabilities, strict=True):
            typer.echo(f"{rid}\t{p:.4f}\t{int(p > 0.5)}")
    summary = f"{len(result.row_ids)} rows predicted with model {digest[:12]}"
    if result.accuracy is not None:
        auc = f", AUC {result.auc:.3f}" if result.auc is not None else ""
        summary += f"; accuracy {result.accuracy:.3f}{auc} against {label!r}"
    if out is not None:
        summary += f"; written to {out}"
    typer.echo(summary, err=out is None)


def model_export(
    study_id: Annotated[str, typer.Argument(help="The study whose final model to package.")],
    out: Annotated[Path, typer.Option("--out", help="The package folder to write (new or empty).")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace the package files in a folder that is not empty.")
    ] = False,
    credential: CredentialOption = Path("admin.credential"),
    orchestrator: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a completed study's model as a package: weights, metadata and, where the recipe can, ONNX
    (federated boosting: the session's result and the library's own model file)."""
    from fedhealth.client import export_package

    with operator_client(credential, orchestrator) as client:
        metadata = export_package(client, study_id, out, force=force)
    if as_json:
        print_json(metadata)
        return
    files = ", ".join(sorted(metadata["files"]))
    typer.echo(
        f"model {shown(metadata['model_digest'][:16])}… of study {shown(study_id)} packaged in {out} "
        f"({shown(files)})"
    )


def model_scaling(
    report: Annotated[Path, typer.Argument(help="A federated statistics report (`stats run --out`).")],
    features: Annotated[
        str | None,
        typer.Option(help="Comma-separated features in the model's order (default: the report's)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print the `[recipe.params.preprocessing]` section of a study spec (standardize = "given") with the
    federation-wide mean and scale of a federated statistics report. (standardize = "federated" does both
    steps inside the study, without DP: docs/statistics.md.)"""
    import json

    from fedhealth.learning import scaling_from_statistics

    try:
        body = json.loads(report.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{report}: no such report file")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        fail(f"{report}: cannot be read as JSON ({exc})")
    chosen = [f.strip() for f in features.split(",") if f.strip()] if features is not None else None
    names, mean, scale = scaling_from_statistics(body, chosen)
    if as_json:
        print_json({"feature_names": names, "mean": mean, "scale": scale})
        return
    noise = body.get("noise")
    # a comment line of TOML: a newline in a site's name would start a line of the spec the user pastes
    typer.echo(f"# federation-wide statistics of sites {shown(', '.join(map(str, body.get('sites', []))))}")
    typer.echo(f"# noise: {json.dumps(noise)}; features in this order: {json.dumps(names)}")
    typer.echo("[recipe.params.preprocessing]")
    typer.echo('standardize = "given"')
    typer.echo(f"mean = [{', '.join(repr(v) for v in mean)}]")
    typer.echo(f"scale = [{', '.join(repr(v) for v in scale)}]")
