"""The connector interface: dataset URIs (with their secrets kept apart), the :class:`Connector` protocol,
and :class:`TabularConnector`, the base of every connector whose source is a table."""

from __future__ import annotations

import os
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, TypeVar
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from pydantic import BaseModel, ValidationError

from fedhealth.core import ConfigError
from fedhealth.data._dataset import TabularDataset
from fedhealth.data._schema import DatasetSchema, load_schema
from fedhealth.data._table import ParsedTable, SourceTable, TableOptions, build_dataset, parse_table

REDACTED = "***"
# years: an age at the index date outside 0..MAX_AGE is a wrong birth date or year of birth, refused by the
# OMOP and FHIR connectors, never read as a patient's age
MAX_AGE = 130
# query parameters whose key holds one of these (in any case: ``password=``, ``db.password=``, ``PASSWORD=``)
# are secrets, kept out of DatasetURI.raw and every message: a secret may come by a driver option or a
# mistyped key. No other parameter a connector documents holds one; ``password_env=`` / ``token_env=`` name
# an environment variable and stay visible
_SECRET_WORDS = ("password", "passwd", "pwd", "token", "secret", "key")


def is_secret_param(key: str) -> bool:
    """Whether the value of the URI parameter ``key`` is shown as ``***`` (see ``_SECRET_WORDS``)."""
    lowered = key.lower()
    if lowered.endswith("_env"):
        return False
    return any(word in lowered for word in _SECRET_WORDS)


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetURI:
    """A parsed dataset URI: ``scheme://host/path?key=value&...`` with unique keys.

    ``raw``, ``host`` and ``params`` show secrets as ``***``; the secrets themselves are only in
    ``password`` (the user part's), :meth:`secret` (``password=``, ``token=``) and :meth:`prefixed` (a secret
    driver option such as ``db.password=``), left out of ``repr``.
    """

    raw: str
    scheme: str
    host: str
    path: str
    params: Mapping[str, str]
    password: str | None = field(default=None, repr=False)
    secrets: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    @classmethod
    def parse(cls, uri: str) -> DatasetURI:
        shown = redact_uri(uri)
        try:
            parts = urlsplit(uri)
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
            password = parts.password
        except ValueError as exc:
            # the message of urllib may quote the URI: say only what was wrong with the redacted one
            raise ConfigError(f"dataset URI {shown!r} is malformed") from exc
        if not parts.scheme:
            raise ConfigError(
                f"dataset URI {shown!r} has no scheme (expected e.g. builtin://... or file:///...)"
            )
        if _user_part_cut(parts):
            raise ConfigError(
                f"dataset URI {shown!r}: the user part is cut short by an unencoded '/', '?', '#' or '@'; "
                "URL-encode them in a password (%2F, %3F, %23, %40)"
            )
        if parts.fragment:
            raise ConfigError(f"dataset URI {shown!r}: fragments (#...) are not supported")
        params: dict[str, str] = {}
        secrets: dict[str, str] = {}
        for key, value in pairs:
            if key in params:
                raise ConfigError(f"dataset URI {shown!r} repeats the parameter {key!r}")
            if is_secret_param(key):
                secrets[key] = value
                value = REDACTED
            params[key] = value
        return cls(
            raw=shown,
            scheme=parts.scheme.lower(),
            host=_redacted_netloc(parts.netloc),
            path=parts.path,
            params=MappingProxyType(params),
            password=unquote(password) if password is not None else None,
            secrets=MappingProxyType(secrets),
        )

    def secret(self, key: str, *, env_key: str) -> str | None:
        """A secret given as ``key=value`` (kept in the site's 0600 registry) or as ``env_key=NAME`` (read
        from that environment variable now); None if neither. Both at once is refused."""
        given, env = self.secrets.get(key), self.params.get(env_key)
        if given is not None and env is not None:
            raise ConfigError(f"dataset URI {self.raw!r}: give {key}= or {env_key}=, not both")
        if env is None:
            return given
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(
                f"dataset URI {self.raw!r}: {env_key}={env} names an environment variable that is not set"
            )
        return value

    def prefixed(self, prefix: str) -> dict[str, str]:
        """The parameters ``prefix + NAME=VALUE`` as ``{NAME: VALUE}``, secret values included."""
        return {
            key.removeprefix(prefix): self.secrets.get(key, value)
            for key, value in self.params.items()
            if key.startswith(prefix)
        }

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


def _user_part_cut(parts: SplitResult) -> bool:
    """Whether an unencoded "/", "?", "#" or "@" in a password left an "@" after the host (in the path, the
    fragment or a parameter's name), where the password's pieces would be read as a host, a database name or
    a parameter and shown. An "@" in a parameter's value (``param.email=a@b``) is a value, not this."""
    if ":" not in parts.netloc:
        return False
    names = (piece.partition("=")[0] for piece in parts.query.split("&"))
    return "@" in parts.path or "@" in parts.fragment or any("@" in name for name in names)


def _redacted_netloc(netloc: str) -> str:
    userinfo, at, hostport = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return netloc
    return f"{userinfo.split(':', 1)[0]}:{REDACTED}@{hostport}"


def redact_uri(uri: str) -> str:
    """``uri`` with the user part's password and secret parameters' values shown as ``***`` (for every
    message, listing and log line that shows a dataset URI)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<a malformed URI>"
    scheme = f"{parts.scheme}://" if parts.scheme else ""
    no_user = "@" not in parts.netloc and ":" in parts.netloc and "@" in uri.partition(parts.netloc)[2]
    if _user_part_cut(parts) or no_user:
        # an unencoded "/", "?" or "#" in a password ends the user part early (u:pa/ss@host reads as host
        # "u", port "pa", path "/ss@host"): everything up to the last "@" may hold a piece of it, so it is
        # hidden (host:port/db?param.e=a@b too: shown less rather than a secret shown)
        return f"{scheme}{REDACTED}@{uri.rpartition('@')[2]}"
    netloc = _redacted_netloc(parts.netloc)
    query = parts.query
    if query:
        pieces = []
        for piece in query.split("&"):
            key = unquote(piece.split("=", 1)[0].replace("+", " "))
            pieces.append(f"{piece.split('=', 1)[0]}={REDACTED}" if is_secret_param(key) else piece)
        query = "&".join(pieces)
    # a fragment is refused, but it may be the tail of a secret holding an unencoded "#" (token=ab#cd)
    tail = (f"?{query}" if query else "") + (f"#{REDACTED}" if parts.fragment else "")
    return f"{scheme}{netloc}{parts.path}{tail}"


class Connector(Protocol):
    """Opens the datasets of one URI scheme."""

    def open(self, uri: DatasetURI, data_dir: Path) -> TabularDataset: ...


_Document = TypeVar("_Document", bound=BaseModel)


def load_toml_document(model: type[_Document], path: Path, what: str) -> _Document:
    """The TOML file ``path`` validated as ``model`` (a connector's mapping or definition, ``what`` naming
    it: "FHIR mapping"): an unreadable file or the first bad key becomes one :class:`ConfigError`."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read as TOML ({exc})") from exc
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        at = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{what} {path}: {at}: {message}" if at else f"{path}: {message}") from exc


# the parameters every tabular connector takes, beside its own
TABLE_PARAMS = frozenset({"label", "id", "time", "schema", "test_fraction", "seed", "standardize", "classes"})


def table_options(uri: DatasetURI, *, label_required: bool = False) -> TableOptions:
    """The shared parameters of a tabular source: roles, a declared schema, the split and scaling."""
    schema: DatasetSchema | None = None
    schema_path = uri.params.get("schema")
    if schema_path is not None:
        path = Path(schema_path)
        if not path.is_absolute():
            raise ConfigError(f"dataset URI {uri.raw!r}: schema={schema_path!r} must be an absolute path")
        schema = load_schema(path)
    if label_required and "label" not in uri.params and schema is None:
        raise ConfigError(f"dataset URI {uri.raw!r}: missing required parameter(s) ['label']")
    return TableOptions(
        label=uri.params.get("label"),
        id_column=uri.params.get("id"),
        time=uri.params.get("time"),
        schema=schema,
        test_fraction=uri.float_param("test_fraction", 0.3, low=0.0, high_exclusive=1.0),
        seed=uri.int_param("seed", 0, low=0, high=2**32 - 1),
        standardize=uri.bool_param("standardize", True),
        classes=uri.int_param("classes", 2, low=2, high=256),
    )


class TabularConnector(ABC):
    """A connector whose source is a table: it reads a :class:`SourceTable`; parsing, ordering, splitting,
    filling, encoding and scaling are shared (``_table``), and so is the quality report."""

    @abstractmethod
    def read(self, uri: DatasetURI, data_dir: Path) -> tuple[SourceTable, TableOptions]:
        """Check the URI's parameters, then read the source's table."""

    def parse(self, uri: DatasetURI, data_dir: Path) -> tuple[ParsedTable, TableOptions]:
        source, options = self.read(uri, data_dir)
        return parse_table(source, options), options

    def open(self, uri: DatasetURI, data_dir: Path) -> TabularDataset:
        parsed, options = self.parse(uri, data_dir)
        return build_dataset(parsed, options)
