"""Connectors behind one interface, chosen by the URI scheme of a dataset.

    builtin://heart-disease/<0-3>                 Fed-Heart-Disease (FLamby protocol, downloads if absent)
    builtin://heart-disease/pooled[?scaling=per-center|global]
    builtin://breast-cancer/<i>?sites=4&seed=0    site i of the offline breast-cancer federation
    builtin://breastmnist/<i>|pooled?sites=4&seed=0[&limit=N]   BreastMNIST images (see ``_breastmnist``)
    file:///abs/path.csv?label=<col>[&id=<col>]   a CSV or Parquet file (by extension, or format=csv|parquet)
    sql+<sqlalchemy-url>?table=<t>|query=<q>&...  a table or read-only query of any SQLAlchemy database
    omop+<sqlalchemy-url>?definition=/abs/cohort.toml&...   an OMOP CDM v5.4 cohort (see ``_omop``)
    fhir+https://server/fhir?mapping=/abs/mapping.toml&...  a FHIR R4 server (see ``_fhir``)
    images:///abs/folder?labels=/abs/labels.csv&size=28      PNG/JPEG files with labels (see ``_images``)
    dicom:///abs/folder?labels=/abs/labels.csv&size=28       DICOM files with labels (see ``_dicom``)

Every tabular source also takes ``schema=/abs/schema.toml`` (see ``_schema``), ``test_fraction=0.3``,
``seed=0`` and ``standardize=true``. A scheme ``a+b`` is served by the connector registered for ``a`` when no
connector is registered for ``a+b`` itself.

Secrets never appear in a message: a password in the URI's user part (``postgresql://user:pw@host/db``)
and the values of ``password=`` and ``token=`` are kept apart from :attr:`DatasetURI.raw`, which shows them
as ``***``; ``password_env=NAME`` and ``token_env=NAME`` read them from the environment instead.

A new source (DICOM, ...) is a class with ``open(uri, data_dir) -> TabularDataset`` registered under its
scheme with :func:`register_connector`; the site agent only ever calls :func:`open_dataset`. Every URI is
parsed and its parameters checked (unknown ones are refused) before any data is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from fedhealth.core import ConfigError
from fedhealth.core import data_dir as default_data_dir
from fedhealth.data._breast_cancer import breast_cancer_federation
from fedhealth.data._breastmnist import breastmnist_federation, breastmnist_pooled
from fedhealth.data._connector import (
    TABLE_PARAMS,
    Connector,
    DatasetURI,
    TabularConnector,
    table_options,
)
from fedhealth.data._dataset import TabularDataset
from fedhealth.data._dicom import DicomConnector
from fedhealth.data._fhir import FhirConnector
from fedhealth.data._files import FileFormat, read_file_table
from fedhealth.data._heart_disease import HEART_DISEASE_CENTERS, PooledScaling, load_heart_disease
from fedhealth.data._images import ImageFolderConnector
from fedhealth.data._omop import OmopConnector
from fedhealth.data._quality import QualityReport, dataset_quality, table_quality
from fedhealth.data._schema import DatasetSchema
from fedhealth.data._sql import SqlConnector
from fedhealth.data._table import SourceTable, TableOptions, build_dataset

BuiltinOpener = Callable[[DatasetURI, str, Path], TabularDataset]


class BuiltinConnector:
    """``builtin://<name>/<part>``: datasets fedhealth knows how to build or fetch itself."""

    def __init__(self) -> None:
        self._openers: dict[str, BuiltinOpener] = {}

    def add(self, name: str, opener: BuiltinOpener) -> None:
        if name in self._openers:
            raise ConfigError(f"builtin dataset {name!r} is already registered")
        self._openers[name] = opener

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._openers))

    def open(self, uri: DatasetURI, data_dir: Path) -> TabularDataset:
        opener = self._openers.get(uri.host)
        if opener is None:
            raise ConfigError(
                f"unknown builtin dataset {uri.host!r} in {uri.raw!r}; known: {list(self.names)}"
            )
        return opener(uri, uri.path.strip("/"), data_dir)


def _open_heart_disease(uri: DatasetURI, part: str, data_dir: Path) -> TabularDataset:
    if part == "pooled":
        uri.check_params({"scaling"})
        text = uri.params.get("scaling", PooledScaling.PER_CENTER.value)
        try:
            scaling = PooledScaling(text)
        except ValueError:
            allowed = [s.value for s in PooledScaling]
            raise ConfigError(f"dataset URI {uri.raw!r}: scaling={text!r} is not one of {allowed}") from None
        return load_heart_disease("pooled", data_dir, pooled_scaling=scaling)
    uri.check_params(set())
    if part not in {str(c.index) for c in HEART_DISEASE_CENTERS}:
        raise ConfigError(
            f"dataset URI {uri.raw!r}: heart-disease part must be 0, 1, 2, 3 or pooled, got {part!r}"
        )
    return load_heart_disease(int(part), data_dir)


def _open_breast_cancer(uri: DatasetURI, part: str, data_dir: Path) -> TabularDataset:
    del data_dir  # bundled with scikit-learn
    uri.check_params({"sites", "seed"})
    n_sites = uri.int_param("sites", 4, low=2)
    seed = uri.int_param("seed", 0, low=0, high=2**32 - 1)
    if not part.isdigit():
        raise ConfigError(f"dataset URI {uri.raw!r}: breast-cancer part must be a site index, got {part!r}")
    site = int(part)
    if site >= n_sites:
        raise ConfigError(f"dataset URI {uri.raw!r}: site {site} does not exist in a federation of {n_sites}")
    return breast_cancer_federation(n_sites, seed)[site]


def _open_breastmnist(uri: DatasetURI, part: str, data_dir: Path) -> TabularDataset:
    uri.check_params({"sites", "seed", "limit"})
    limit = uri.int_param("limit", 0, low=0)
    if part == "pooled":
        dataset = breastmnist_pooled(data_dir)
    else:
        n_sites = uri.int_param("sites", 4, low=2, high=20)
        if not part.isdigit() or int(part) >= n_sites:
            raise ConfigError(
                f"dataset URI {uri.raw!r}: breastmnist part must be 'pooled' or a site index below "
                f"{n_sites}, got {part!r}"
            )
        seed = uri.int_param("seed", 0, low=0, high=2**32 - 1)
        dataset = breastmnist_federation(n_sites, seed, data_dir)[int(part)]
    if limit:  # the first images of each part: a quick run (tests, a smoke demo)
        train = np.arange(dataset.num_train) < limit
        dataset = dataset.select(train, np.arange(dataset.num_test) < limit)
    return dataset


class FileConnector(TabularConnector):
    """``file:///absolute/path.csv?label=<col>``: a local CSV or Parquet file, by its extension or
    ``format=csv|parquet``. The label comes from ``label=`` or the declared schema."""

    def read(self, uri: DatasetURI, data_dir: Path) -> tuple[SourceTable, TableOptions]:
        del data_dir  # the URI carries an absolute path
        if uri.host not in ("", "localhost"):
            raise ConfigError(
                f"dataset URI {uri.raw!r}: file URIs must be absolute, like file:///data/cohort.csv"
            )
        path = Path(unquote(uri.path))
        if not path.is_absolute():
            raise ConfigError(f"dataset URI {uri.raw!r}: the file path must be absolute")
        uri.check_params(TABLE_PARAMS | {"format"})
        options = table_options(uri, label_required=True)
        text = uri.params.get("format")
        if text is not None:
            try:
                fmt: FileFormat | None = FileFormat(text)
            except ValueError:
                allowed = [f.value for f in FileFormat]
                raise ConfigError(
                    f"dataset URI {uri.raw!r}: format={text!r} is not one of {allowed}"
                ) from None
        else:
            fmt = FileFormat.of(path) or FileFormat.CSV
        assert fmt is not None
        return read_file_table(path, fmt), options


CsvConnector = FileConnector  # the name before Parquet files were read too


class ConnectorRegistry:
    """Connectors by URI scheme."""

    def __init__(self) -> None:
        self._connectors: dict[str, Connector] = {}

    def register(self, scheme: str, connector: Connector, *, replace: bool = False) -> None:
        key = scheme.lower()
        if key in self._connectors and not replace:
            raise ConfigError(f"a connector for scheme {key!r} is already registered")
        self._connectors[key] = connector

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(sorted(self._connectors))

    def connector(self, parsed: DatasetURI) -> Connector:
        """The connector for ``a+b``: the one registered for ``a+b``, else for ``a``."""
        connector = self._connectors.get(parsed.scheme) or self._connectors.get(
            parsed.scheme.split("+", 1)[0]
        )
        if connector is None:
            raise ConfigError(
                f"no connector for scheme {parsed.scheme!r} in {parsed.raw!r}; "
                f"known schemes: {list(self.schemes)}"
            )
        return connector

    def open(self, uri: str, data_dir: Path | str | None = None) -> TabularDataset:
        parsed = DatasetURI.parse(uri)
        return self.connector(parsed).open(parsed, _folder(data_dir))

    def inspect(self, uri: str, data_dir: Path | str | None = None) -> DatasetInspection:
        """Open a dataset and describe it for its site: the dataset, its schema and a quality report."""
        parsed = DatasetURI.parse(uri)
        connector = self.connector(parsed)
        if isinstance(connector, TabularConnector):
            table, options = connector.parse(parsed, _folder(data_dir))
            return DatasetInspection(
                dataset=build_dataset(table, options),
                schema=table.schema,
                schema_inferred=table.inferred,
                ignored_columns=table.ignored,
                quality=table_quality(table),
            )
        inspect = getattr(connector, "inspect", None)  # a connector with findings of its own (DICOM tags)
        if inspect is not None:
            dataset, quality = inspect(parsed, _folder(data_dir))
            return DatasetInspection(dataset=dataset, schema=None, quality=quality)
        dataset = connector.open(parsed, _folder(data_dir))
        report = getattr(connector, "quality", dataset_quality)  # e.g. image folders: one pixel summary
        return DatasetInspection(dataset=dataset, schema=None, quality=report(dataset))


def _folder(data_dir: Path | str | None) -> Path:
    return Path(data_dir) if data_dir is not None else default_data_dir()


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetInspection:
    """What a site learns about one of its datasets when it checks it (never sent anywhere): the dataset,
    the schema it was read with (None for a builtin dataset), whether that schema was inferred, the source's
    columns no feature reads, and the data-quality report."""

    dataset: TabularDataset
    schema: DatasetSchema | None
    quality: QualityReport
    schema_inferred: bool = False
    ignored_columns: tuple[str, ...] = ()


BUILTIN_DATASETS = BuiltinConnector()
BUILTIN_DATASETS.add("heart-disease", _open_heart_disease)
BUILTIN_DATASETS.add("breast-cancer", _open_breast_cancer)
BUILTIN_DATASETS.add("breastmnist", _open_breastmnist)

DEFAULT_REGISTRY = ConnectorRegistry()
DEFAULT_REGISTRY.register("builtin", BUILTIN_DATASETS)
DEFAULT_REGISTRY.register("file", FileConnector())
DEFAULT_REGISTRY.register("sql", SqlConnector())
DEFAULT_REGISTRY.register("omop", OmopConnector())
DEFAULT_REGISTRY.register("fhir", FhirConnector())
DEFAULT_REGISTRY.register("images", ImageFolderConnector())
DEFAULT_REGISTRY.register("dicom", DicomConnector())


def register_connector(scheme: str, connector: Connector, *, replace: bool = False) -> None:
    """Make :func:`open_dataset` understand ``<scheme>://...`` URIs."""
    DEFAULT_REGISTRY.register(scheme, connector, replace=replace)


def open_dataset(uri: str, data_dir: Path | str | None = None) -> TabularDataset:
    """Open the dataset a URI names (see the module docstring for the URI forms)."""
    return DEFAULT_REGISTRY.open(uri, data_dir)


def inspect_dataset(uri: str, data_dir: Path | str | None = None) -> DatasetInspection:
    """Open the dataset a URI names with its schema and quality report (for the site's own eyes)."""
    return DEFAULT_REGISTRY.inspect(uri, data_dir)
