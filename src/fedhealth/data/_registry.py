"""Connectors behind one interface, chosen by the URI scheme of a dataset.

    builtin://heart-disease/<0-3>                 Fed-Heart-Disease (FLamby protocol, downloads if absent)
    builtin://heart-disease/pooled[?scaling=per-center|global]
    builtin://breast-cancer/<i>?sites=4&seed=0    site i of the offline breast-cancer federation
    file:///abs/path.csv?label=<col>[&id=<col>][&test_fraction=0.3][&seed=0][&standardize=true]

A new source (SQL/OMOP, FHIR, DICOM) is a class with ``open(uri, data_dir) -> TabularDataset``
registered under its scheme with :func:`register_connector`; the site agent only ever calls
:func:`open_dataset`. Every URI is parsed and its parameters checked (unknown ones are refused) before any
data is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from fedhealth.core import ConfigError
from fedhealth.core import data_dir as default_data_dir
from fedhealth.data._breast_cancer import breast_cancer_federation
from fedhealth.data._csv import CsvOptions, read_csv_dataset
from fedhealth.data._dataset import TabularDataset
from fedhealth.data._heart_disease import HEART_DISEASE_CENTERS, PooledScaling, load_heart_disease


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetURI:
    """A parsed dataset URI: ``scheme://host/path?key=value&...`` with unique keys."""

    raw: str
    scheme: str
    host: str
    path: str
    params: Mapping[str, str]

    @classmethod
    def parse(cls, uri: str) -> DatasetURI:
        try:
            parts = urlsplit(uri)
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError as exc:
            raise ConfigError(f"dataset URI {uri!r} is malformed: {exc}") from exc
        if not parts.scheme:
            raise ConfigError(
                f"dataset URI {uri!r} has no scheme (expected e.g. builtin://... or file:///...)"
            )
        if parts.fragment:
            raise ConfigError(f"dataset URI {uri!r}: fragments (#...) are not supported")
        params: dict[str, str] = {}
        for key, value in pairs:
            if key in params:
                raise ConfigError(f"dataset URI {uri!r} repeats the parameter {key!r}")
            params[key] = value
        return cls(
            raw=uri,
            scheme=parts.scheme.lower(),
            host=parts.netloc,
            path=parts.path,
            params=MappingProxyType(params),
        )

    def check_params(self, allowed: AbstractSet[str], required: AbstractSet[str] = frozenset()) -> None:
        unknown = sorted(self.params.keys() - allowed)
        if unknown:
            raise ConfigError(
                f"dataset URI {self.raw!r}: unknown parameter(s) {unknown}; allowed: {sorted(allowed)}"
            )
        missing = sorted(required - self.params.keys())
        if missing:
            raise ConfigError(f"dataset URI {self.raw!r}: missing required parameter(s) {missing}")

    def int_param(self, key: str, default: int, *, low: int, high: int | None = None) -> int:
        text = self.params.get(key)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"dataset URI {self.raw!r}: {key}={text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"dataset URI {self.raw!r}: {key}={value} must be {bound}")
        return value

    def float_param(self, key: str, default: float, *, low: float, high_exclusive: float) -> float:
        text = self.params.get(key)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"dataset URI {self.raw!r}: {key}={text!r} is not a number") from None
        if not low <= value < high_exclusive:
            raise ConfigError(
                f"dataset URI {self.raw!r}: {key}={value} must lie in [{low}, {high_exclusive})"
            )
        return value

    def bool_param(self, key: str, default: bool) -> bool:
        text = self.params.get(key)
        if text is None:
            return default
        lowered = text.lower()
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
        raise ConfigError(f"dataset URI {self.raw!r}: {key}={text!r} is not a boolean (true/false)")


class Connector(Protocol):
    """Opens the datasets of one URI scheme."""

    def open(self, uri: DatasetURI, data_dir: Path) -> TabularDataset: ...


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


class CsvConnector:
    """``file:///absolute/path.csv?label=<col>``: a local CSV file (see :class:`CsvOptions`)."""

    def open(self, uri: DatasetURI, data_dir: Path) -> TabularDataset:
        del data_dir  # the URI carries an absolute path
        if uri.host not in ("", "localhost"):
            raise ConfigError(
                f"dataset URI {uri.raw!r}: file URIs must be absolute, like file:///data/cohort.csv"
            )
        path = Path(unquote(uri.path))
        if not path.is_absolute():
            raise ConfigError(f"dataset URI {uri.raw!r}: the file path must be absolute")
        uri.check_params({"label", "id", "test_fraction", "seed", "standardize"}, {"label"})
        options = CsvOptions(
            label=uri.params["label"],
            id_column=uri.params.get("id"),
            test_fraction=uri.float_param("test_fraction", 0.3, low=0.0, high_exclusive=1.0),
            seed=uri.int_param("seed", 0, low=0, high=2**32 - 1),
            standardize=uri.bool_param("standardize", True),
        )
        return read_csv_dataset(path, options)


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

    def open(self, uri: str, data_dir: Path | str | None = None) -> TabularDataset:
        parsed = DatasetURI.parse(uri)
        connector = self._connectors.get(parsed.scheme)
        if connector is None:
            raise ConfigError(
                f"no connector for scheme {parsed.scheme!r} in {uri!r}; known schemes: {list(self.schemes)}"
            )
        return connector.open(parsed, Path(data_dir) if data_dir is not None else default_data_dir())


BUILTIN_DATASETS = BuiltinConnector()
BUILTIN_DATASETS.add("heart-disease", _open_heart_disease)
BUILTIN_DATASETS.add("breast-cancer", _open_breast_cancer)

DEFAULT_REGISTRY = ConnectorRegistry()
DEFAULT_REGISTRY.register("builtin", BUILTIN_DATASETS)
DEFAULT_REGISTRY.register("file", CsvConnector())


def register_connector(scheme: str, connector: Connector, *, replace: bool = False) -> None:
    """Make :func:`open_dataset` understand ``<scheme>://...`` URIs."""
    DEFAULT_REGISTRY.register(scheme, connector, replace=replace)


def open_dataset(uri: str, data_dir: Path | str | None = None) -> TabularDataset:
    """Open the dataset a URI names (see the module docstring for the URI forms)."""
    return DEFAULT_REGISTRY.open(uri, data_dir)
