"""The datasets registered at a site: ``NAME -> connector URI`` in ``HOME/datasets.json``.

A dataset is checked when it is added, when ``fedhealth site serve`` starts, by ``fedhealth site dataset
check`` and by ``fedhealth site check``: the file is present, the header holds the label column (and the id
column, if one is named), every feature is numeric and there are rows. A failed check is one sentence naming
the dataset and what to do; ``site serve`` refuses to start on one, before any task.

The id column of a CSV file (``?id=COLUMN`` or ``--id COLUMN``) is how consent is matched to patients; it is
never a feature. A text column that is not declared as the id column is refused with a hint to declare it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fedhealth.agent._home import SiteHome
from fedhealth.core import ConfigError, DatasetError, FedHealthError, InputError
from fedhealth.data import DatasetURI, NonNumericColumnError, open_dataset
from fedhealth.protocol import StudySpec

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetSummary:
    """What a check found: no values, only the shape and the column roles."""

    name: str
    uri: str
    rows: int
    train_rows: int
    features: tuple[str, ...]
    label: str | None
    id_column: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uri": self.uri,
            "rows": self.rows,
            "train_rows": self.train_rows,
            "features": list(self.features),
            "label": self.label,
            "id_column": self.id_column,
        }


class DatasetCheckError(DatasetError):
    """A registered (or about to be registered) dataset does not pass its check. ``hint`` says what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message} ({hint})")
        self.hint = hint


def check_name(name: str) -> str:
    """A dataset name as studies refer to it (the spec's ``dataset``): lowercase letters, digits, - _ ."""
    if not name or len(name) > 63 or not set(name) <= _NAME_CHARS or not name[0].isalnum():
        raise InputError(
            f"dataset name {name!r} is not allowed: use lowercase letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return name


def csv_uri(path: Path, *, label: str, id_column: str | None = None) -> str:
    """The ``file://`` URI of a CSV file with its label (and id) column."""
    params = {"label": label}
    if id_column is not None:
        params["id"] = id_column
    return f"file://{quote(str(path.expanduser().resolve()))}?{urlencode(params)}"


def check_dataset(name: str, uri: str, data_dir: Path | None = None) -> DatasetSummary:
    """Open the dataset as the agent would and describe it; raise :class:`DatasetCheckError` if it cannot
    serve a study."""
    try:
        parsed = DatasetURI.parse(uri)
        dataset = open_dataset(uri, data_dir)
    except NonNumericColumnError as exc:
        label = _param(uri, "label")
        if exc.column == label:
            hint = f"the label column {label!r} must hold 0 or 1"
        else:
            hint = (
                f"if {exc.column!r} identifies patients, declare it with --id {exc.column}: the id column is "
                "used for consent and never becomes a feature; otherwise make it numeric"
            )
        raise DatasetCheckError(f"dataset {name!r}: {exc}", hint) from exc
    except (DatasetError, ConfigError) as exc:
        raise DatasetCheckError(f"dataset {name!r}: {exc}", _hint(exc)) from exc
    except (InputError, ValueError) as exc:
        raise DatasetCheckError(f"dataset {name!r}: {exc}", "check the file's content") from exc
    return DatasetSummary(
        name=name,
        uri=uri,
        rows=dataset.num_train + int(dataset.X_test.shape[0]),
        train_rows=dataset.num_train,
        features=tuple(dataset.feature_names),
        label=parsed.params.get("label"),
        id_column=parsed.params.get("id"),
    )


def _param(uri: str, key: str) -> str | None:
    try:
        return DatasetURI.parse(uri).params.get(key)
    except ConfigError:
        return None


def _hint(exc: FedHealthError) -> str:
    text = str(exc)
    if "does not exist" in text:
        return "check the path; a file URI is absolute, like file:///data/cohort.csv"
    if "no connector for scheme" in text or "has no scheme" in text:
        return "use file:///absolute/path.csv?label=COLUMN or builtin://..."
    if "is not in the header" in text:
        return "name the label column with --label (and the id column with --id)"
    if "missing required parameter" in text:
        return "a CSV file needs its label column: --label COLUMN or ?label=COLUMN"
    return "fix the file or the URI, then run `fedhealth site dataset check`"


class SiteDatasets:
    """The registry in ``HOME/datasets.json`` (written atomically; a name maps to a URI)."""

    def __init__(self, home: SiteHome) -> None:
        self.home = home

    @property
    def path(self) -> Path:
        return self.home.root / "datasets.json"

    def all(self) -> dict[str, str]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path} is unreadable ({exc}); fix or remove it") from exc
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("uri"), str)
            for k, v in raw.items()
        ):
            raise ConfigError(f"{self.path} is not a dataset registry ({{name: {{uri: ...}}}})")
        return {name: entry["uri"] for name, entry in sorted(raw.items())}

    def uri(self, name: str) -> str:
        registered = self.all()
        if name not in registered:
            known = ", ".join(registered) or "none"
            raise DatasetCheckError(
                f"no dataset named {name!r} is registered at this site (registered: {known})",
                "add it with `fedhealth site dataset add`",
            )
        return registered[name]

    def add(
        self, name: str, uri: str, *, data_dir: Path | None = None, replace: bool = False
    ) -> DatasetSummary:
        """Check the dataset, then register it (nothing is written if the check fails)."""
        check_name(name)
        registered = self.all()
        if name in registered and not replace:
            raise DatasetCheckError(
                f"a dataset named {name!r} is registered already", "remove it first, or pass --replace"
            )
        summary = check_dataset(name, uri, data_dir)
        self._write({**registered, name: uri})
        return summary

    def remove(self, name: str) -> None:
        registered = self.all()
        if name not in registered:
            raise DatasetCheckError(
                f"no dataset named {name!r} is registered at this site", "see `fedhealth site dataset list`"
            )
        del registered[name]
        self._write(registered)

    def _write(self, registered: Mapping[str, str]) -> None:
        self.home.require()
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {name: {"uri": uri} for name, uri in sorted(registered.items())}
        tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def datasets_for_serve(
    home: SiteHome, overrides: Mapping[str, str], data_dir: Path | None = None
) -> tuple[dict[str, str], list[DatasetSummary]]:
    """The datasets ``site serve`` will use (registered, then ``--dataset`` overrides), each checked now:
    the first that fails raises :class:`DatasetCheckError`, so the agent never starts polling with it."""
    chosen = {**SiteDatasets(home).all(), **overrides}
    summaries = [check_dataset(name, uri, data_dir) for name, uri in sorted(chosen.items())]
    return chosen, summaries


def columns_used(spec: StudySpec, summary: DatasetSummary | None) -> str:
    """A sentence saying which of the site's columns a study would read (for the steward's summary)."""
    if summary is None:
        return (
            f"dataset {spec.dataset!r} is not registered at this site (`fedhealth site dataset add`); unless "
            "`site serve` is given it with --dataset, every task of this study will fail here"
        )
    parts = [f"{len(summary.features)} feature column(s): {', '.join(summary.features)}"]
    if summary.label is not None:
        parts.append(f"label column {summary.label!r}")
    if summary.id_column is not None:
        parts.append(f"id column {summary.id_column!r} (for consent only, never a feature)")
    return f"dataset {spec.dataset!r} ({summary.rows} rows): " + "; ".join(parts)
