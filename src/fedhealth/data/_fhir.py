"""FHIR R4: a feature table from a FHIR server's Patient, Observation, Condition and MedicationRequest
resources, built from a declarative mapping; and the server's Consent resources, for the consent registry.

    fhir+https://fhir.hospital.org/r4?mapping=/etc/fedhealth/heart-fhir.toml&token_env=FHIR_TOKEN
    fhir+http://127.0.0.1:8090/fhir?mapping=/abs/mapping.toml&token=...&consent=true

After ``fhir+`` comes the server's base URL. Parameters: ``mapping=`` (absolute path, required);
``token=`` (kept in the site's 0600 registry) or ``token_env=NAME``: a bearer token; ``ca=/abs/ca.pem`` to
trust a private CA; ``page_size=`` (default 500), ``timeout_s=`` (default 30), ``retries=`` (default 3);
``consent=true`` feeds the site's consent registry from the server's Consent resources (``fedhealth site
dataset sync-consent``; also when the dataset is added and when ``site serve`` starts); and the parameters
every tabular source takes.

A mapping (TOML)::

    index_date = 2020-07-01             # windows are days relative to this date

    [label]                             # 1 if a resource with one of the codes falls in the window
    name = "outcome"
    resource = "Condition"
    codes = ["http://snomed.info/sct|53741008"]
    window = [1, 365]

    [[features]]
    name = "age"
    kind = "age"                        # completed years from Patient.birthDate to the index date

    [[features]]
    name = "sex"
    kind = "gender"                     # Patient.gender, one-hot over the declared codes
    categories = ["female", "male"]
    drop_first = true

    [[features]]
    name = "systolic_bp"
    kind = "latest"                     # the latest valueQuantity in the window (ties: the larger id)
    resource = "Observation"
    codes = ["http://loinc.org|8480-6"] # a bare code means LOINC
    unit = "mm[Hg]"                     # UCUM code; an observation in another unit refuses the dataset
    window = [-365, 0]
    missing = "median"

    [[features]]
    name = "statins"
    kind = "count"                      # resources in the window; "present" gives 0 or 1
    resource = "MedicationRequest"      # Observation | Condition | MedicationRequest
    codes = ["http://www.nlm.nih.gov/research/umls/rxnorm|36567"]
    window = [-365, 0]

Every patient on the server is a row (its logical id is the patient id consent is matched on). The client
pages through ``Patient`` and one search per resource type and code list (``code=sys|c1,sys|c2``), following
the server's ``next`` links only on the same origin (the token never goes elsewhere), and checks every
resource with the ``fhir.resources`` R4 models. Dates: Observation.effective[x] (else issued),
Condition.onset[x] (else recordedDate), MedicationRequest.authoredOn. Connection failures, timeouts and
429/502/503/504 answers are retried with exponential backoff (honouring Retry-After); a server that stays down
is one line naming it. A page over ``MAX_PAGE_BYTES``, a search past ``MAX_PAGES`` pages and a next link back
to a page already read are refused; every message is scrubbed of the token, the server's own text included.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from fedhealth.core import ConfigError, DatasetError
from fedhealth.data._connector import (
    MAX_AGE,
    TABLE_PARAMS,
    DatasetURI,
    TabularConnector,
    load_toml_document,
    table_options,
)
from fedhealth.data._errors import (
    CredentialsRefusedError,
    SchemaError,
    SourceUnavailableError,
    UnitMismatchError,
)
from fedhealth.data._omop import Window
from fedhealth.data._schema import (
    CategoricalColumn,
    ColumnSpec,
    DatasetSchema,
    MissingPolicy,
    NumericColumn,
    UnseenPolicy,
)
from fedhealth.data._table import SourceTable, TableOptions

FHIR_PARAMS = frozenset(
    {"mapping", "token", "token_env", "ca", "page_size", "timeout_s", "retries", "consent"}
)
LOINC = "http://loinc.org"
_ID = "patient_id"
_Frozen = ConfigDict(frozen=True, extra="forbid")
_RETRY_STATUS = frozenset({429, 502, 503, 504})
# a hostile or broken server cannot fill the site's memory or keep a search going forever: a page (its body
# as decoded) is at most 64 MiB, a search at most 100,000 pages (50 million resources at the default size)
MAX_PAGE_BYTES = 64 << 20
MAX_PAGES = 100_000


class Resource(StrEnum):
    OBSERVATION = "Observation"
    CONDITION = "Condition"
    MEDICATION_REQUEST = "MedicationRequest"


class FhirFeatureKind(StrEnum):
    AGE = "age"
    GENDER = "gender"
    LATEST = "latest"
    COUNT = "count"
    PRESENT = "present"


def _token(code: str) -> tuple[str, str]:
    system, bar, value = code.rpartition("|")
    return (system if bar else LOINC), value


class _Codes(BaseModel):
    model_config = _Frozen
    resource: Resource | None = None
    codes: tuple[str, ...] = ()
    window: Window | None = None

    @field_validator("codes")
    @classmethod
    def _tokens(cls, codes: tuple[str, ...]) -> tuple[str, ...]:
        for code in codes:
            if not _token(code)[1]:
                raise ValueError(f"code {code!r} is empty; write system|code (a bare code means LOINC)")
        return codes

    @property
    def tokens(self) -> frozenset[tuple[str, str]]:
        return frozenset(_token(c) for c in self.codes)


class FhirLabel(_Codes):
    name: str = "outcome"

    @model_validator(mode="after")
    def _check(self) -> FhirLabel:
        if self.resource is None or not self.codes or self.window is None:
            raise ValueError("the label needs a resource, codes and a window")
        return self


class FhirFeature(_Codes):
    name: str
    kind: FhirFeatureKind
    unit: str | None = None
    categories: tuple[str, ...] = ()
    drop_first: bool = False
    unseen: UnseenPolicy = UnseenPolicy.REFUSE
    missing: MissingPolicy = MissingPolicy.REFUSE
    fill: float | None = None
    indicator: bool = False

    @model_validator(mode="after")
    def _check(self) -> FhirFeature:
        events = self.kind in (FhirFeatureKind.LATEST, FhirFeatureKind.COUNT, FhirFeatureKind.PRESENT)
        if events and (self.resource is None or not self.codes or self.window is None):
            raise ValueError(f"a {self.kind.value} feature needs a resource, codes and a window")
        if self.kind is FhirFeatureKind.LATEST and self.resource is not Resource.OBSERVATION:
            raise ValueError("a latest feature reads Observation values")
        if self.kind is FhirFeatureKind.GENDER and not self.categories:
            raise ValueError("a gender feature needs its categories (female, male, other, unknown)")
        if self.unit is not None and self.kind is not FhirFeatureKind.LATEST:
            raise ValueError("unit goes with a latest feature")
        return self

    def column(self) -> ColumnSpec:
        if self.kind is FhirFeatureKind.GENDER:
            return CategoricalColumn(
                categories=self.categories,
                drop_first=self.drop_first,
                unseen=self.unseen,
                missing=self.missing,
                indicator=self.indicator,
            )
        return NumericColumn(missing=self.missing, fill=self.fill, indicator=self.indicator)


class FhirMapping(BaseModel):
    """How the feature table is built from the server's resources (see the module docstring)."""

    model_config = _Frozen
    index_date: date
    label: FhirLabel
    features: tuple[FhirFeature, ...]

    @model_validator(mode="after")
    def _check(self) -> FhirMapping:
        if not self.features:
            raise ValueError("a mapping needs at least one feature")
        names = [f.name for f in self.features] + [self.label.name, _ID]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique and differ from the label's and {_ID!r}")
        return self

    def dataset_schema(self) -> DatasetSchema:
        return DatasetSchema(
            id=_ID, label=self.label.name, columns={f.name: f.column() for f in self.features}
        )

    def searches(self) -> dict[Resource, frozenset[tuple[str, str]]]:
        """Each resource type the mapping reads, with every code it needs of it (one search each)."""
        wanted: dict[Resource, set[tuple[str, str]]] = defaultdict(set)
        for item in (self.label, *self.features):
            if item.resource is not None:
                wanted[item.resource] |= item.tokens
        return {r: frozenset(c) for r, c in wanted.items()}


def load_mapping(path: Path) -> FhirMapping:
    return load_toml_document(FhirMapping, path, "FHIR mapping")


# --- the client ---------------------------------------------------------------------------------------------


class FhirClient:
    """A small FHIR R4 REST client: searches followed page by page, bearer-token auth, retries with
    backoff, and errors translated to the data layer's. ``sleep`` is injectable (tests of the backoff)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        verify: str | bool = True,
        timeout_s: float = 30.0,
        retries: int = 3,
        page_size: int = 500,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self._origin = urlsplit(self.base_url)[:2]
        self.retries = retries
        self.page_size = page_size
        self._sleep = sleep
        self._token = token
        headers = {"Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout_s, verify=verify, transport=transport
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def shown(self) -> str:
        return self.base_url.rstrip("/")

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _refusal(
        self, kind: type[SourceUnavailableError], message: str, *, hint: str
    ) -> SourceUnavailableError:
        """Every error the client raises: on one line, scrubbed of the token (a server may echo it back)."""
        return kind(" ".join(self._scrub(message).split()), hint=hint)

    def get(self, url: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """GET a JSON resource, retrying what may pass (see the class docstring)."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                with self.http.stream("GET", url, params=params) as response:
                    if response.status_code not in _RETRY_STATUS or last:
                        return self._json(response, self._body(response))
                    wait = _retry_after(response, delay)
            except httpx.TransportError as exc:
                if last:
                    raise self._refusal(
                        SourceUnavailableError,
                        f"the FHIR server at {self.shown} does not answer "
                        f"({type(exc).__name__}: {str(exc) or 'no reason given'}) "
                        f"after {self.retries + 1} attempts",
                        hint="is the FHIR server running and reachable from this host? check the URL",
                    ) from exc
                wait = delay
            self._sleep(wait)
            delay *= 2
        raise AssertionError("unreachable")  # the loop returns or raises on its last attempt

    def _body(self, response: httpx.Response) -> bytes:
        """The response's body, refused once it passes MAX_PAGE_BYTES (nothing more is read)."""
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > MAX_PAGE_BYTES:
                raise self._refusal(
                    SourceUnavailableError,
                    f"the FHIR server at {self.shown} answered {response.request.url.path} with more than "
                    f"{MAX_PAGE_BYTES >> 20} MiB",
                    hint="a page is read whole: lower page_size= so that each is smaller",
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _json(self, response: httpx.Response, content: bytes) -> dict[str, Any]:
        status, path = response.status_code, response.request.url.path
        if status in (401, 403):
            raise self._refusal(
                CredentialsRefusedError,
                f"the FHIR server at {self.shown} refuses this site's credentials (HTTP {status})",
                hint="check the bearer token (token_env=NAME reads it from the environment)",
            )
        try:
            body = json.loads(content)
        except (ValueError, RecursionError):  # RecursionError: JSON nested past Python's stack
            body = None
        if status >= 400:
            raise self._refusal(
                SourceUnavailableError,
                f"the FHIR server at {self.shown} answered {path} with HTTP {status}"
                f"{_outcome(body, self._scrub)}",
                hint="check the server's URL and that it speaks FHIR R4",
            )
        if not isinstance(body, dict):
            raise self._refusal(
                SourceUnavailableError,
                f"the FHIR server at {self.shown} answered {path} with something "
                "that is not a FHIR JSON resource",
                hint="check the server's URL (the base URL ends before the resource type)",
            )
        return body

    def capability(self) -> dict[str, Any]:
        """The server's CapabilityStatement; refuses a server that is not FHIR R4 (4.0.x)."""
        statement = self.get("metadata")
        version = str(statement.get("fhirVersion", ""))
        if statement.get("resourceType") != "CapabilityStatement" or not version.startswith("4.0"):
            raise self._refusal(
                SourceUnavailableError,
                f"the server at {self.shown} is not a FHIR R4 server (fhirVersion {version or 'missing'})",
                hint="fedhealth reads FHIR R4 (4.0.x)",
            )
        return statement

    def search(self, resource: str, params: Mapping[str, str] | None = None) -> Iterator[dict[str, Any]]:
        """Every resource a search matches, page by page (``_count`` = the page size), up to MAX_PAGES
        pages; a next link back to a page already read is refused."""
        query = {"_count": str(self.page_size), **(params or {})}
        url: str | None = resource
        read: set[str] = set()
        while url is not None:
            bundle = self.get(url, None if read else query)
            read.add(url)
            if bundle.get("resourceType") != "Bundle":
                raise self._refusal(
                    SourceUnavailableError,
                    f"the FHIR server at {self.shown} answered a {resource} search with a "
                    f"{bundle.get('resourceType')!r}, not a Bundle",
                    hint="check the server's URL",
                )
            entries = bundle.get("entry") or []
            if not isinstance(entries, list):
                raise self._refusal(
                    SourceUnavailableError,
                    f"the FHIR server at {self.shown} answered a {resource} search with a Bundle whose "
                    "entry is not a list",
                    hint="check the server's URL and that it speaks FHIR R4",
                )
            for entry in entries:
                if not isinstance(entry, dict):
                    continue
                item, search = entry.get("resource"), entry.get("search") or {}
                # a search element that is not an object has no mode: not a match, so not a row
                mode = search.get("mode", "match") if isinstance(search, dict) else None
                if isinstance(item, dict) and item.get("resourceType") == resource and mode == "match":
                    yield item
            url = self._next(bundle)
            if url is not None and url in read:
                raise self._refusal(
                    SourceUnavailableError,
                    f"the FHIR server at {self.shown} sent a next link back to a page of this {resource} "
                    "search already read",
                    hint="the server's paging is broken: ask its administrators",
                )
            if url is not None and len(read) >= MAX_PAGES:
                raise self._refusal(
                    SourceUnavailableError,
                    f"the FHIR server at {self.shown} sent a next link past {MAX_PAGES} pages of a "
                    f"{resource} search",
                    hint="raise page_size= (the server may cap it), or check the server's paging",
                )

    def _next(self, bundle: Mapping[str, Any]) -> str | None:
        links = bundle.get("link") or []
        if not isinstance(links, list):
            raise self._refusal(
                SourceUnavailableError,
                f"the FHIR server at {self.shown} sent a Bundle whose link is not a list",
                hint="check the server's URL and that it speaks FHIR R4",
            )
        for link in links:
            if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
                target = urljoin(self.base_url, str(link["url"]))
                if urlsplit(target)[:2] != self._origin:
                    # the bearer token goes only to the server the site named
                    raise self._refusal(
                        SourceUnavailableError,
                        f"the FHIR server at {self.shown} sent a next page on another origin",
                        hint="the server's public base URL must match the one in the dataset URI",
                    )
                return target
        return None


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return min(30.0, max(0.0, float(response.headers.get("Retry-After", default))))
    except ValueError:
        return default


def _outcome(body: Any, scrub: Callable[[str], str]) -> str:
    """The first OperationOutcome diagnostic, if the server sent one (local messages only), scrubbed before
    it is cut short (a token cut in two would pass the scrub)."""
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in body.get("issue") or []:
            if not isinstance(issue, dict):
                continue
            details = issue.get("details")
            text = issue.get("diagnostics") or (details.get("text") if isinstance(details, dict) else None)
            if text:
                return f": {scrub(' '.join(str(text).split()))[:200]}"
    return ""


# --- from resources to the feature table --------------------------------------------------------------------


def _parsed(model: Any, raw: dict[str, Any], where: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        at = ".".join(str(p) for p in first["loc"])
        raise DatasetError(
            f"{where}: {raw.get('resourceType')}/{raw.get('id')} is not valid FHIR R4: {at}: {first['msg']}"
        ) from exc


def _day(value: Any) -> date | None:
    """A FHIR date or dateTime as a calendar day (a partial date: its first day)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = str(value)
    parts = text.split("-")
    try:
        if len(parts) == 1:
            return date(int(parts[0]), 1, 1)
        if len(parts) == 2:
            return date(int(parts[0]), int(parts[1]), 1)
        return date.fromisoformat(text[:10])
    except ValueError:
        return None


def _subject(resource: Any) -> str | None:
    ref = getattr(resource, "subject", None)
    text = str(ref.reference) if ref is not None and ref.reference else ""
    parts = text.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


def _codings(concept: Any) -> set[tuple[str, str]]:
    return {(str(c.system or ""), str(c.code)) for c in (getattr(concept, "coding", None) or []) if c.code}


def _when(resource: Any, kind: Resource) -> date | None:
    if kind is Resource.OBSERVATION:
        period = resource.effectivePeriod
        return (
            _day(resource.effectiveDateTime)
            or _day(resource.effectiveInstant)
            or (_day(period.start) if period is not None else None)
            or _day(resource.issued)
        )
    if kind is Resource.CONDITION:
        period = resource.onsetPeriod
        return (
            _day(resource.onsetDateTime)
            or (_day(period.start) if period is not None else None)
            or _day(resource.recordedDate)
        )
    return _day(resource.authoredOn)


def _code_of(resource: Any, kind: Resource) -> Any:
    if kind is Resource.MEDICATION_REQUEST:
        return resource.medicationCodeableConcept
    return resource.code


class _Event:
    __slots__ = ("codes", "day", "rid", "unit", "value")

    def __init__(
        self, rid: str, day: date, codes: set[tuple[str, str]], value: float | None, unit: str | None
    ):
        self.rid, self.day, self.codes, self.value, self.unit = rid, day, codes, value, unit


def _models() -> dict[Resource, Any]:
    # the FHIR models load slowly: only when a FHIR dataset is read
    from fhir.resources.R4B.condition import Condition
    from fhir.resources.R4B.medicationrequest import MedicationRequest
    from fhir.resources.R4B.observation import Observation

    return {
        Resource.OBSERVATION: Observation,
        Resource.CONDITION: Condition,
        Resource.MEDICATION_REQUEST: MedicationRequest,
    }


def read_feature_table(client: FhirClient, mapping: FhirMapping, where: str) -> pd.DataFrame:
    """Patients and their resources, fetched and folded into one row per patient (see the docstring)."""
    from fhir.resources.R4B.patient import Patient

    client.capability()
    patients: dict[str, Any] = {}
    for raw in client.search("Patient"):
        patient = _parsed(Patient, raw, where)
        if patient.id:
            patients[str(patient.id)] = patient
    models = _models()
    events: dict[Resource, dict[str, list[_Event]]] = {}
    for kind, tokens in mapping.searches().items():
        by_patient: dict[str, list[_Event]] = defaultdict(list)
        search = {"code": ",".join(f"{s}|{c}" for s, c in sorted(tokens))}
        seen: set[str] = set()
        for raw in client.search(kind.value, search):
            resource = _parsed(models[kind], raw, where)
            # a resource served on two pages (offset paging over data that changed) is one event, not two:
            # counted twice it would change a count feature
            if resource.id is not None:
                if str(resource.id) in seen:
                    continue
                seen.add(str(resource.id))
            subject, day = _subject(resource), _when(resource, kind)
            if subject is None or day is None:
                continue
            value, unit = None, None
            if kind is Resource.OBSERVATION and resource.valueQuantity is not None:
                quantity = resource.valueQuantity
                value = float(quantity.value) if isinstance(quantity.value, Decimal | int | float) else None
                unit = str(quantity.code or quantity.unit) if (quantity.code or quantity.unit) else None
            by_patient[subject].append(
                _Event(str(resource.id), day, _codings(_code_of(resource, kind)), value, unit)
            )
        events[kind] = by_patient
    rows: list[dict[str, Any]] = []
    for pid in sorted(patients):
        patient = patients[pid]
        row: dict[str, Any] = {_ID: pid}
        for feature in mapping.features:
            row[feature.name] = _feature_value(feature, patient, events, mapping.index_date, where)
        row[mapping.label.name] = _label_value(mapping.label, pid, events, mapping.index_date)
        rows.append(row)
    if not rows:
        raise DatasetError(f"{where}: the server holds no Patient")
    columns = [_ID, *(f.name for f in mapping.features), mapping.label.name]
    return pd.DataFrame.from_records(rows, columns=columns)


def _in_window(
    events: list[_Event], tokens: frozenset[tuple[str, str]], index: date, window: Window
) -> list[_Event]:
    kept = []
    for event in events:
        offset = (event.day - index).days
        if window.start <= offset <= window.end and event.codes & tokens:
            kept.append(event)
    return kept


def _feature_value(
    feature: FhirFeature,
    patient: Any,
    events: dict[Resource, dict[str, list[_Event]]],
    index: date,
    where: str,
) -> Any:
    if feature.kind is FhirFeatureKind.AGE:
        born = _day(patient.birthDate)
        if born is None:
            return None
        age = index.year - born.year - ((index.month, index.day) < (born.month, born.day))
        if not 0 <= age <= MAX_AGE:  # a birth date after the index date, or centuries before it
            raise SchemaError(
                f"{where}: feature {feature.name!r}: a Patient's birthDate gives an age at the index date "
                f"outside 0..{MAX_AGE}",
                hint="check the birth dates the FHIR server holds",
            )
        return float(age)
    if feature.kind is FhirFeatureKind.GENDER:
        return str(patient.gender) if patient.gender else None
    assert feature.resource is not None
    assert feature.window is not None
    found = _in_window(
        events[feature.resource].get(str(patient.id), []), feature.tokens, index, feature.window
    )
    if feature.kind is FhirFeatureKind.COUNT:
        return float(len(found))
    if feature.kind is FhirFeatureKind.PRESENT:
        return 1.0 if found else 0.0
    valued = [e for e in found if e.value is not None]
    if feature.unit is not None:
        for event in valued:
            if event.unit != feature.unit:
                raise UnitMismatchError(
                    f"{where}: Observation/{event.rid} for feature {feature.name!r} has unit "
                    f"{event.unit!r}, not the declared {feature.unit!r}"
                )
    if not valued:
        return None
    return max(valued, key=lambda e: (e.day, e.rid)).value


def _label_value(
    label: FhirLabel, pid: str, events: dict[Resource, dict[str, list[_Event]]], index: date
) -> int:
    assert label.resource is not None
    assert label.window is not None
    return 1 if _in_window(events[label.resource].get(pid, []), label.tokens, index, label.window) else 0


# --- the connector ------------------------------------------------------------------------------------------


def client_for(uri: DatasetURI) -> FhirClient:
    """The client a ``fhir+`` URI describes (its parameters checked)."""
    base = uri.scheme.removeprefix("fhir+")
    if base not in ("http", "https"):
        raise ConfigError(
            f"dataset URI {uri.raw!r}: write fhir+https://server/base (or fhir+http:// on loopback)"
        )
    ca = uri.params.get("ca")
    if ca is not None and not Path(ca).is_absolute():
        raise ConfigError(f"dataset URI {uri.raw!r}: ca= must be an absolute path")
    return FhirClient(
        f"{base}://{uri.host}{uri.path}",
        token=uri.secret("token", env_key="token_env"),
        verify=ca if ca is not None else True,
        timeout_s=float(uri.int_param("timeout_s", 30, low=1, high=600)),
        retries=uri.int_param("retries", 3, low=0, high=10),
        page_size=uri.int_param("page_size", 500, low=1, high=10_000),
    )


class FhirConnector(TabularConnector):
    """``fhir+https://server/base?mapping=/abs/mapping.toml``: see the module docstring."""

    def read(self, uri: DatasetURI, data_dir: Path) -> tuple[SourceTable, TableOptions]:
        del data_dir
        uri.check_params(TABLE_PARAMS | FHIR_PARAMS)
        if "mapping" not in uri.params:
            raise ConfigError(f"dataset URI {uri.raw!r}: missing required parameter(s) ['mapping']")
        path = Path(uri.params["mapping"])
        if not path.is_absolute():
            raise ConfigError(f"dataset URI {uri.raw!r}: mapping= must be an absolute path")
        mapping = load_mapping(path)
        options = table_options(uri)
        uri.bool_param("consent", False)  # checked here; used by the site's consent sync
        if options.id_column not in (None, _ID):
            raise ConfigError(f"dataset URI {uri.raw!r}: a FHIR dataset's id is the Patient's logical id")
        with client_for(uri) as client:
            where = f"the FHIR server at {client.shown}"
            frame = read_feature_table(client, mapping, where)
        source = SourceTable(name=path.stem, where=where, frame=frame, schema=mapping.dataset_schema())
        return source, TableOptions(
            label=options.label,
            id_column=_ID,
            schema=options.schema,
            test_fraction=options.test_fraction,
            seed=options.seed,
            standardize=options.standardize,
        )


def fetch_consents(uri: str | DatasetURI) -> tuple[dict[str, Any], ...]:
    """Every Consent resource on the server a ``fhir+`` dataset URI names (for the consent registry)."""
    parsed = uri if isinstance(uri, DatasetURI) else DatasetURI.parse(uri)
    if not parsed.scheme.startswith("fhir+"):
        raise ConfigError(f"dataset URI {parsed.raw!r} is not a FHIR dataset (fhir+https://...)")
    with client_for(parsed) as client:
        client.capability()
        return tuple(client.search("Consent"))
