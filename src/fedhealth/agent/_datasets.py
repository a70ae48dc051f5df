"""The datasets registered at a site: ``NAME -> connector URI`` in ``HOME/datasets.json`` (0600).

A dataset is checked when it is added, when ``fedhealth site serve`` starts, by ``fedhealth site dataset
check`` and by ``fedhealth site check``: the source is reachable, its columns fit the dataset's schema, every
value parses, and there are rows. A failed check is one sentence naming the dataset and what to do;
``site serve`` refuses to start on one, before any task.

The schema a dataset was added with (declared with ``schema=``, given by an OMOP or FHIR definition, or
inferred) is pinned: a copy goes to ``HOME/schemas/NAME.json`` (0600) and the agent opens the dataset with
it, so a source whose columns change later is refused (``dataset_invalid``) before a task computes on it,
and a new column never becomes a feature unnoticed. ``--replace`` pins the schema anew.

The id column (``?id=COLUMN`` or ``--id COLUMN``) is how consent is matched to patients; it is never a
feature. A text column that is not declared is refused with a hint to declare it.

A URI may hold a secret (a database password, a bearer token): the registry file is private to the site's
account, and every URI shown (listings, messages, logs) has the secret replaced by ``***``.

A FHIR dataset with ``consent=true`` feeds the site's consent registry from the same server's Consent
resources: when it is added, when ``site serve`` starts, and on ``fedhealth site dataset sync-consent NAME``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from fedhealth.agent._home import SiteHome
from fedhealth.core import ConfigError, DatasetError, FedHealthError, InputError, make_private_dir
from fedhealth.crypto import write_private
from fedhealth.data import (
    DatasetSchema,
    DatasetURI,
    NonNumericColumnError,
    QualityReport,
    SchemaError,
    fetch_consents,
    inspect_dataset,
    redact_uri,
)
from fedhealth.governance import ConsentImportSummary
from fedhealth.protocol import StudySpec

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetSummary:
    """What a check found: the shape, the column roles and the schema, and (for the site's eyes only, never
    sent) the data-quality report. ``uri`` shows secrets as ``***``."""

    name: str
    uri: str
    rows: int
    train_rows: int
    features: tuple[str, ...]
    label: str | None
    id_column: str | None
    schema: DatasetSchema | None = None
    schema_inferred: bool = False
    ignored_columns: tuple[str, ...] = ()
    quality: QualityReport | None = None

    def to_json(self, *, quality: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "uri": self.uri,
            "rows": self.rows,
            "train_rows": self.train_rows,
            "features": list(self.features),
            "label": self.label,
            "id_column": self.id_column,
        }
        if self.schema is not None:
            out["schema"] = self.schema.to_json()
            out["schema_inferred"] = self.schema_inferred
            out["ignored_columns"] = list(self.ignored_columns)
        if quality and self.quality is not None:
            out["quality"] = self.quality.to_json()
        return out


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


def csv_uri(
    path: Path,
    *,
    label: str | None,
    id_column: str | None = None,
    schema: Path | None = None,
    classes: int | None = None,
) -> str:
    """The ``file://`` URI of a CSV or Parquet file with its label (and id) column, schema file and the
    label's classes (when more than two)."""
    params = {}
    if label is not None:
        params["label"] = label
    if id_column is not None:
        params["id"] = id_column
    if schema is not None:
        params["schema"] = str(schema.expanduser().resolve())
    if classes is not None:
        params["classes"] = str(classes)
    return f"file://{quote(str(path.expanduser().resolve()))}?{urlencode(params)}"


def check_dataset(
    name: str, uri: str, data_dir: Path | None = None, *, pinned: bool = False
) -> DatasetSummary:
    """Open the dataset as the agent would and describe it; raise :class:`DatasetCheckError` if it cannot
    serve a study. ``pinned``: the URI carries the schema the site pinned when the dataset was added."""
    shown = redact_uri(uri)
    try:
        DatasetURI.parse(uri)
        inspection = inspect_dataset(uri, data_dir)
    except NonNumericColumnError as exc:
        label = _param(uri, "label")
        if exc.column == label:
            hint = f"the label column {label!r} must hold 0 or 1"
        else:
            hint = (
                f"if {exc.column!r} identifies patients, declare it with --id {exc.column}: the id column is "
                "used for consent and never becomes a feature; if it holds categories or dates, declare it "
                "in a schema file (schema=...); otherwise make it numeric"
            )
        raise DatasetCheckError(f"dataset {name!r}: {exc}", hint) from exc
    except (DatasetError, ConfigError) as exc:
        raise DatasetCheckError(f"dataset {name!r}: {exc}", _hint(exc, pinned=pinned)) from exc
    except (InputError, ValueError) as exc:
        raise DatasetCheckError(f"dataset {name!r}: {exc}", "check the source's content") from exc
    dataset, schema = inspection.dataset, inspection.schema
    return DatasetSummary(
        name=name,
        uri=shown,
        rows=dataset.num_train + dataset.num_test,
        train_rows=dataset.num_train,
        features=tuple(dataset.feature_names),
        label=schema.label if schema is not None else _param(uri, "label"),
        id_column=schema.id if schema is not None else _param(uri, "id"),
        schema=schema,
        schema_inferred=inspection.schema_inferred,
        ignored_columns=inspection.ignored_columns,
        quality=inspection.quality,
    )


def _param(uri: str, key: str) -> str | None:
    try:
        return DatasetURI.parse(uri).params.get(key)
    except ConfigError:
        return None


def _hint(exc: FedHealthError, *, pinned: bool = False) -> str:
    text = str(exc)
    hint = getattr(exc, "hint", None)
    if isinstance(hint, str):  # the connector knows best (an unreachable server, refused credentials)
        return hint
    if pinned and isinstance(exc, SchemaError) and "of the dataset's schema are not among" in text:
        return (
            "the source's columns changed since the dataset was added: restore them, or add the dataset "
            "again with --replace to pin its new schema"
        )
    if "does not exist" in text:
        return "check the path; a file URI is absolute, like file:///data/cohort.csv"
    if "no connector for scheme" in text or "has no scheme" in text:
        return "use file:///absolute/path.csv?label=COLUMN or builtin://..."
    if "is not in the header" in text:
        return "name the label column with --label (and the id column with --id)"
    if "missing required parameter" in text:
        return "a CSV file needs its label column: --label COLUMN or ?label=COLUMN"
    return "fix the file or the URI, then run `fedhealth site dataset check`"


def with_schema(uri: str, schema_path: Path) -> str:
    """``uri`` with its ``schema=`` parameter (if any) replaced by ``schema_path``."""
    parts = urlsplit(uri)
    kept = [p for p in parts.query.split("&") if p and p.split("=", 1)[0] != "schema"]
    kept.append(f"schema={quote(str(schema_path), safe='/')}")
    return urlunsplit(parts._replace(query="&".join(kept)))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Entry:
    uri: str
    schema: str | None  # the pinned schema's file name under HOME/schemas/


class SiteDatasets:
    """The registry in ``HOME/datasets.json`` (0600, written atomically): a name maps to a URI and the
    schema pinned for it (``HOME/schemas/``)."""

    def __init__(self, home: SiteHome) -> None:
        self.home = home

    @property
    def path(self) -> Path:
        return self.home.root / "datasets.json"

    @property
    def schema_dir(self) -> Path:
        return self.home.root / "schemas"

    def _entries(self) -> dict[str, _Entry]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path} is unreadable ({exc}); fix or remove it") from exc
        if not isinstance(raw, dict) or not all(
            isinstance(k, str)
            and isinstance(v, dict)
            and isinstance(v.get("uri"), str)
            and isinstance(v.get("schema", ""), str)
            for k, v in raw.items()
        ):
            raise ConfigError(f"{self.path} is not a dataset registry ({{name: {{uri: ...}}}})")
        return {name: _Entry(uri=e["uri"], schema=e.get("schema")) for name, e in sorted(raw.items())}

    def all(self) -> dict[str, str]:
        """Each dataset's URI as the agent opens it: with its pinned schema, if it has one."""
        return {name: self._effective(entry) for name, entry in self._entries().items()}

    def pinned(self, name: str) -> bool:
        entry = self._entries().get(name)
        return entry is not None and entry.schema is not None

    def _effective(self, entry: _Entry) -> str:
        if entry.schema is None:
            return entry.uri
        return with_schema(entry.uri, self.schema_dir / entry.schema)

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
        entries = {**self._entries(), name: _Entry(uri=uri, schema=None)}
        if summary.schema is not None:
            # Pin the schema the check read the source with: the agent opens the dataset with this copy
            make_private_dir(self.schema_dir)
            pinned = f"{name}.json"
            write_private(
                self.schema_dir / pinned, (json.dumps(summary.schema.to_json(), indent=2) + "\n").encode()
            )
            entries[name] = _Entry(uri=uri, schema=pinned)
        self._write(entries)
        return summary

    def remove(self, name: str) -> None:
        entries = self._entries()
        if name not in entries:
            raise DatasetCheckError(
                f"no dataset named {name!r} is registered at this site", "see `fedhealth site dataset list`"
            )
        removed = entries.pop(name)
        self._write(entries)
        if removed.schema is not None:
            (self.schema_dir / removed.schema).unlink(missing_ok=True)

    def _write(self, entries: Mapping[str, _Entry]) -> None:
        self.home.require()
        body: dict[str, dict[str, str]] = {}
        for name, entry in sorted(entries.items()):
            body[name] = {"uri": entry.uri}
            if entry.schema is not None:
                body[name]["schema"] = entry.schema
        write_private(self.path, (json.dumps(body, indent=2) + "\n").encode())


def feeds_consent(uri: str) -> bool:
    """Whether a dataset URI asks for its server's Consent resources to feed the consent registry."""
    try:
        parsed = DatasetURI.parse(uri)
    except ConfigError:
        return False
    return parsed.scheme.startswith("fhir+") and parsed.bool_param("consent", False)


def sync_consent(home: SiteHome, name: str, uri: str | None = None) -> ConsentImportSummary:
    """Import the Consent resources of a FHIR dataset's server into the site's consent registry (an
    audited import; records the server no longer holds as active are withdrawn by their status)."""
    from fedhealth.agent._governance import SiteGovernance  # the governance state: only when needed

    uri = uri if uri is not None else SiteDatasets(home).uri(name)
    if not uri.startswith("fhir+"):
        raise DatasetCheckError(
            f"dataset {name!r} is not a FHIR dataset", "consent is read from FHIR servers (fhir+https://...)"
        )
    try:
        resources = fetch_consents(uri)
    except (DatasetError, ConfigError) as exc:
        raise DatasetCheckError(f"dataset {name!r}: {exc}", _hint(exc)) from exc
    with SiteGovernance(home) as governance:
        return governance.consent().import_fhir(list(resources))


def datasets_for_serve(
    home: SiteHome, overrides: Mapping[str, str], data_dir: Path | None = None
) -> tuple[dict[str, str], list[DatasetSummary]]:
    """The datasets ``site serve`` will use (registered, then ``--dataset`` overrides), each checked now:
    the first that fails raises :class:`DatasetCheckError`, so the agent never starts polling with it."""
    registry = SiteDatasets(home)
    chosen = {**registry.all(), **overrides}
    summaries = [
        check_dataset(name, uri, data_dir, pinned=name not in overrides and registry.pinned(name))
        for name, uri in sorted(chosen.items())
    ]
    for name, uri in sorted(chosen.items()):
        if feeds_consent(uri):
            sync_consent(home, name, uri)
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
