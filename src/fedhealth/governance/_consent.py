"""Patient consent at a site: records imported from CSV or FHIR R4 Consent resources; the task-time filter.

Which record decides. For one patient and one study purpose at one instant, the records *in force* are
those whose purpose is that purpose or ``*`` (any purpose), whose validity period contains the instant
(``valid_from`` inclusive, ``valid_until`` exclusive) and that were not withdrawn by then. Among them the
most recent statement wins (latest ``valid_from``; a record without one is the oldest); at equal start a
purpose-specific record beats ``*``; at a remaining tie ``deny`` beats ``permit``. So a later opt-out
overrides an earlier consent, and a FHIR Consent's nested exception (same start, specific purpose)
overrides its base rule.

Another spelling of a patient's id. Feeds spell one patient differently (``P0003`` / ``p0003``, an integer
column's ``1001`` / a text export's ``01001`` or ``1001.0``, full-width digits, a decomposed accent, a
zero-width space left in a cell). A permit counts only for the exact id (a permit cannot widen a cohort by
resemblance), but a deny, or a withdrawal, decides for every dataset id that is the same under
:func:`id_match_key`: a row is left out when any spelling of its id is denied, whatever the exact spelling's
records say. Two real patients whose ids differ only so lose a row each time one of them denies; that is the
price of never training on a patient who said no under a spelling the dataset does not use. The purpose
likewise: a deny under another spelling of the study's purpose (``Research`` for ``research``) speaks for it,
a permit only under the exact purpose (or ``*``).

Patients with no record in force follow the registry's :class:`ConsentModel`: ``OPT_IN`` (the default: no
record, no use) or ``OPT_OUT`` (no record, used). Each filter stores its *snapshot* (the set of patients it
kept, with purpose and date) under the snapshot's hash, so that a later withdrawal can name the snapshots it
affects without naming the patient (:class:`WithdrawalNotice`).

CSV format (UTF-8, header row required, one record per row)::

    patient_id,purpose,decision,valid_from,valid_until,withdrawn_at
    p-0001,HRESCH,permit,2025-01-01,,
    p-0002,*,deny,2024-06-30T12:00:00Z,,

``patient_id``, ``purpose`` (a code, or ``*`` for every purpose) and ``decision`` (``permit`` or ``deny``) are
required; the three dates are optional (empty: unbounded / not withdrawn) and are a date or an ISO 8601
datetime with a UTC offset. A date as ``valid_until`` includes that whole day. Any bad row stops the import
before anything is stored, with the line number in the message.
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from fedhealth.core import InputError, canonical_json, new_id, sha256_hex
from fedhealth.governance._audit import AuditEventType, AuditLog, state_and_log
from fedhealth.governance._errors import ConsentImportError
from fedhealth.governance._tables import consent_records, consent_snapshot_members, consent_snapshots
from fedhealth.governance._timefmt import as_instant, format_instant, parse_bound, require_aware

ANY_PURPOSE = "*"
SUPPRESSION_THRESHOLD = 5
MAX_ID_LENGTH = 200
_CSV_COLUMNS = ("patient_id", "purpose", "decision", "valid_from", "valid_until", "withdrawn_at")
_CSV_REQUIRED = frozenset({"patient_id", "purpose", "decision"})
_CHUNK = 500
_SNAPSHOT_KIND = "fedhealth.consent-snapshot.v1"


class ConsentDecision(StrEnum):
    PERMIT = "permit"
    DENY = "deny"


class ConsentModel(StrEnum):
    """What happens to a patient with no consent record in force."""

    OPT_IN = "opt-in"  # excluded: only an explicit permit lets data be used
    OPT_OUT = "opt-out"  # included unless a record denies


_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.0*)?")


def id_match_key(patient_id: str) -> str:
    """The form under which two spellings of one id are the same patient for a deny (module docstring):
    NFKC, case-folded, without whitespace, control or format characters; a plain number without leading
    zeros or a zero fraction (``01001``, ``1001.0`` and ``1001`` are one)."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", patient_id).casefold())
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] not in "CZ")
    if _PLAIN_NUMBER.fullmatch(text):
        text = text.split(".", 1)[0].lstrip("0") or "0"
    return text


def _check_id(value: str, what: str) -> str:
    if (
        not isinstance(value, str)
        or not value.strip()
        or value != value.strip()
        or len(value) > MAX_ID_LENGTH
    ):
        raise InputError(f"{what} must be 1 to {MAX_ID_LENGTH} characters without surrounding spaces")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentRecord:
    """One patient's permit or deny for one purpose over a period; ``valid_until`` is exclusive."""

    patient_id: str
    purpose: str
    decision: ConsentDecision
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    withdrawn_at: datetime | None = None
    source: str = "api"

    def __post_init__(self) -> None:
        _check_id(self.patient_id, "patient_id")
        _check_id(self.purpose, "purpose")
        if not isinstance(self.decision, ConsentDecision):
            raise InputError(f"decision must be a ConsentDecision, got {self.decision!r}")
        for name in ("valid_from", "valid_until", "withdrawn_at"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, require_aware(value, name))
        if self.valid_from and self.valid_until and self.valid_until <= self.valid_from:
            raise InputError("valid_until must be after valid_from")

    def in_force(self, at: datetime) -> bool:
        """Does this record speak for its patient at instant ``at``?"""
        if self.valid_from is not None and at < self.valid_from:
            return False
        if self.valid_until is not None and at >= self.valid_until:
            return False
        return self.withdrawn_at is None or at < self.withdrawn_at

    def applies_to(self, purpose: str) -> bool:
        return self.purpose in (purpose, ANY_PURPOSE)

    def identity(self) -> dict[str, Any]:
        """What makes two imports the same record (withdrawal time excluded: it may be added later)."""
        return {
            "patient_id": self.patient_id,
            "purpose": self.purpose,
            "decision": self.decision.value,
            "valid_from": _fmt(self.valid_from),
            "valid_until": _fmt(self.valid_until),
            "source": self.source,
        }


def _fmt(value: datetime | None) -> str | None:
    return format_instant(value) if value is not None else None


_BEGINNING = datetime.min.replace(tzinfo=UTC)


def _precedence(record: ConsentRecord) -> tuple[datetime, int, int]:
    start = record.valid_from or _BEGINNING
    return (start, int(record.purpose != ANY_PURPOSE), int(record.decision is ConsentDecision.DENY))


def _speaks_for(record: ConsentRecord, purpose: str) -> bool:
    """Whether ``record`` speaks for ``purpose``: its own purpose or ``*``, or (a deny only) another spelling
    of the purpose under :func:`id_match_key` (``Research`` for ``research``): a permit never widens by
    resemblance, a deny is never lost to a spelling."""
    if record.applies_to(purpose):
        return True
    return record.decision is ConsentDecision.DENY and id_match_key(record.purpose) == id_match_key(purpose)


def decide(records: Iterable[ConsentRecord], purpose: str, at: datetime) -> ConsentDecision | None:
    """The decision of the records in force for ``purpose`` at ``at`` (module docstring); None if none is."""
    in_force = [r for r in records if _speaks_for(r, purpose) and r.in_force(at)]
    if not in_force:
        return None
    return max(in_force, key=_precedence).decision


def consent_snapshot_hash(patient_ids: Iterable[str], purpose: str, on_date: date) -> str:
    """sha256 of the canonical JSON of the sorted distinct patient ids kept, the purpose and the date."""
    body = {
        "kind": _SNAPSHOT_KIND,
        "purpose": purpose,
        "date": on_date.isoformat(),
        "patients": sorted(set(patient_ids)),
    }
    return sha256_hex(canonical_json(body))


def suppress(count: int, threshold: int = SUPPRESSION_THRESHOLD) -> int | str:
    """A count as it may leave the site: ``"<threshold"`` for 1 to threshold-1, else the count."""
    return f"<{threshold}" if 0 < count < threshold else count


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentFilterResult:
    """Which rows of a task's cohort consent permits, and the counts (over distinct patients)."""

    purpose: str
    on_date: date
    consent_model: ConsentModel
    kept_indices: tuple[int, ...]
    kept_patient_ids: tuple[str, ...]
    total_count: int
    permitted_count: int
    denied_count: int
    no_record_count: int
    snapshot_hash: str

    @property
    def kept_count(self) -> int:
        """Distinct patients kept: the permitted, plus under opt-out those without a record."""
        return len(self.kept_patient_ids)

    def reported_counts(self, threshold: int = SUPPRESSION_THRESHOLD) -> dict[str, int | str]:
        """Counts for anything that leaves the registry (audit log, reports), small ones suppressed.

        The total is left out: with it, one suppressed count could be recovered from the others.
        """
        return {
            "kept": suppress(self.kept_count, threshold),
            "permitted": suppress(self.permitted_count, threshold),
            "denied": suppress(self.denied_count, threshold),
            "no_record": suppress(self.no_record_count, threshold),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentImportSummary:
    """What an import did. ``skipped`` counts resources or provisions that grant nothing (see import_fhir)."""

    source: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    withdrawn: int = 0
    skipped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "withdrawn": self.withdrawn,
            "skipped": self.skipped,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class WithdrawalNotice:
    """What a site tells the orchestrator about a withdrawal: the snapshot hashes that included the patient.

    No patient id travels: the orchestrator learns only that someone in those snapshots withdrew, which is
    exactly what it needs to flag the model versions trained on them (``ProvenanceStore.flag_withdrawal``).
    """

    notice_id: str
    purpose: str
    withdrawn_at: datetime
    snapshot_hashes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "notice_id": self.notice_id,
            "purpose": self.purpose,
            "withdrawn_at": format_instant(self.withdrawn_at),
            "snapshot_hashes": list(self.snapshot_hashes),
        }


# --- parsing ----------------------------------------------------------------------------------------------


def parse_consent_csv(path: Path) -> list[ConsentRecord]:
    """Read and validate a consent CSV (module docstring); :class:`ConsentImportError` names the line."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ConsentImportError(f"cannot read {path}: {exc.strerror}") from exc
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise ConsentImportError(f"{path.name}: empty file, expected a header row") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ConsentImportError(f"{path.name} line 1: {exc}") from exc
        columns = [h.strip().lower() for h in header]
        unknown = [c for c in columns if c not in _CSV_COLUMNS]
        missing = sorted(_CSV_REQUIRED - set(columns))
        if unknown or missing or len(set(columns)) != len(columns):
            raise ConsentImportError(
                f"{path.name} line 1: header must name columns from {list(_CSV_COLUMNS)}, each once "
                f"(unknown {unknown}, missing {missing})"
            )
        records: list[ConsentRecord] = []
        try:
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                records.append(_record_from_row(path.name, reader.line_num, columns, row))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ConsentImportError(f"{path.name} line {reader.line_num}: {exc}") from exc
    return records


def _record_from_row(name: str, line: int, columns: Sequence[str], row: Sequence[str]) -> ConsentRecord:
    where = f"{name} line {line}"
    if len(row) != len(columns):
        raise ConsentImportError(f"{where}: {len(row)} fields, the header has {len(columns)}")
    cells = {c: v.strip() for c, v in zip(columns, row, strict=True)}
    decision_text = cells["decision"].lower()
    if decision_text not in (ConsentDecision.PERMIT.value, ConsentDecision.DENY.value):
        raise ConsentImportError(f"{where}: decision must be 'permit' or 'deny', got {cells['decision']!r}")
    dates: dict[str, datetime | None] = {}
    for column in ("valid_from", "valid_until", "withdrawn_at"):
        text = cells.get(column, "")
        try:
            dates[column] = parse_bound(text, end=column == "valid_until") if text else None
        except ValueError as exc:
            raise ConsentImportError(f"{where}: {column}: {exc}") from exc
    try:
        return ConsentRecord(
            patient_id=cells["patient_id"],
            purpose=cells["purpose"],
            decision=ConsentDecision(decision_text),
            valid_from=dates["valid_from"],
            valid_until=dates["valid_until"],
            withdrawn_at=dates["withdrawn_at"],
            source="csv",
        )
    except InputError as exc:
        raise ConsentImportError(f"{where}: {exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class _FhirRecords:
    records: tuple[ConsentRecord, ...]
    withdrawals: tuple[str, ...]  # sources (Consent/<id>) that are no longer active
    skipped: int


_INACTIVE = frozenset({"inactive", "rejected", "entered-in-error"})
_RESTRICTIONS = ("actor", "data", "class_fhir", "code", "dataPeriod", "securityLabel", "action")


def parse_fhir_consents(document: Any, *, origin: str = "fhir") -> _FhirRecords:
    """Map R4 Consent resources (a Bundle, one Consent, or a list) to records, parsed with ``fhir.resources``.

    - ``status`` active: one record per purpose code of each provision (no purpose: ``*``; a nested provision
      without purpose inherits its parent's). inactive / rejected / entered-in-error: the records earlier
      imported from the same resource id are withdrawn (as of the import). draft / proposed: skipped. A new
      version of an active resource replaces the old: records only the old version had are withdrawn.
    - patient: ``Patient/<id>`` reference, else ``patient.identifier.value``.
    - period: ``provision.period`` (nested provisions inherit their parent's), else from ``dateTime`` on.
    - A provision limited to some actors, data, classes, codes, actions or security labels cannot be
      honoured partially: a limited ``deny`` is applied as a full deny; a limited ``permit`` is skipped
      (it grants nothing).
    """
    from fhir.resources.R4B.consent import Consent  # lazy: the FHIR models are slow to import
    from pydantic import ValidationError

    resources = _fhir_resources(document)
    records: list[ConsentRecord] = []
    withdrawals: list[str] = []
    skipped = 0
    for index, raw in enumerate(resources):
        label = f"{origin} resource {index + 1}"
        if isinstance(raw, Mapping) and isinstance(raw.get("id"), str):
            label += f" (Consent/{raw['id']})"
        if not isinstance(raw, Mapping) or raw.get("resourceType") != "Consent":
            skipped += 1
            continue
        try:
            consent = Consent.model_validate(dict(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            at = ".".join(str(p) for p in first["loc"])
            raise ConsentImportError(f"{label}: not a valid FHIR R4 Consent: {at}: {first['msg']}") from exc
        source = f"fhir:Consent/{consent.id}" if consent.id else f"{origin}#{index + 1}"
        status = str(consent.status)
        given = _fhir_instant(consent.dateTime, end=False, label=label) if consent.dateTime else None
        if status in _INACTIVE:
            withdrawals.append(source)
            continue
        if status != "active":
            skipped += 1
            continue
        patient = _fhir_patient(consent, label)
        if consent.provision is None:
            raise ConsentImportError(f"{label}: an active Consent needs a provision saying permit or deny")
        made, skipped_here = _fhir_provision_records(
            consent.provision,
            patient=patient,
            source=source,
            path="provision",
            label=label,
            purposes=None,
            start=given,
            end=None,
        )
        records.extend(made)
        skipped += skipped_here
    return _FhirRecords(records=tuple(records), withdrawals=tuple(withdrawals), skipped=skipped)


def _fhir_resources(document: Any) -> list[Any]:
    if isinstance(document, Mapping) and document.get("resourceType") == "Bundle":
        entries = document.get("entry") or []
        if not isinstance(entries, list):
            raise ConsentImportError("Bundle.entry must be a list")
        return [e.get("resource") if isinstance(e, Mapping) else None for e in entries]
    if isinstance(document, Mapping):
        return [document]
    if isinstance(document, list):
        return list(document)
    raise ConsentImportError("expected a FHIR Bundle, a Consent resource, or a list of resources")


def _fhir_patient(consent: Any, label: str) -> str:
    ref = consent.patient
    if ref is not None and ref.reference:
        parts = str(ref.reference).rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
            return parts[-1]
    if ref is not None and ref.identifier is not None and ref.identifier.value:
        return str(ref.identifier.value)
    raise ConsentImportError(
        f"{label}: patient must be a Patient/<id> reference or carry an identifier value"
    )


def _fhir_instant(value: Any, *, end: bool, label: str) -> datetime:
    try:
        if isinstance(value, date):  # a datetime too: the same rules as a CSV cell (offset, open end)
            return parse_bound(value.isoformat(), end=end)
        return parse_bound(str(value), end=end)
    except (ValueError, InputError) as exc:
        raise ConsentImportError(f"{label}: {exc}") from exc


def _fhir_provision_records(
    provision: Any,
    *,
    patient: str,
    source: str,
    path: str,
    label: str,
    purposes: tuple[str, ...] | None,
    start: datetime | None,
    end: datetime | None,
) -> tuple[list[ConsentRecord], int]:
    kind = provision.type
    if kind not in (ConsentDecision.PERMIT.value, ConsentDecision.DENY.value):
        raise ConsentImportError(f"{label}: {path}.type must be 'permit' or 'deny', got {kind!r}")
    decision = ConsentDecision(kind)
    if provision.period is not None:
        start = (
            _fhir_instant(provision.period.start, end=False, label=label) if provision.period.start else start
        )
        end = _fhir_instant(provision.period.end, end=True, label=label) if provision.period.end else end
    codes = tuple(str(c.code) for c in provision.purpose or [] if c.code) or purposes or (ANY_PURPOSE,)
    limited = any(getattr(provision, name, None) for name in _RESTRICTIONS)
    made: list[ConsentRecord] = []
    skipped = 0
    if limited and decision is ConsentDecision.PERMIT:
        skipped += 1
    else:
        for code in codes:
            try:
                made.append(
                    ConsentRecord(
                        patient_id=patient,
                        purpose=code,
                        decision=decision,
                        valid_from=start,
                        valid_until=end,
                        source=f"{source}#{path}",
                    )
                )
            except InputError as exc:
                raise ConsentImportError(f"{label}: {path}: {exc}") from exc
    for i, nested in enumerate(provision.provision or []):
        more, more_skipped = _fhir_provision_records(
            nested,
            patient=patient,
            source=source,
            path=f"{path}.provision[{i}]",
            label=label,
            purposes=codes if codes != (ANY_PURPOSE,) else None,
            start=start,
            end=end,
        )
        made.extend(more)
        skipped += more_skipped
    return made, skipped


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConsentImportError(f"cannot read {path}: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConsentImportError(f"{path.name} is not JSON: {exc}") from exc


# --- the registry -----------------------------------------------------------------------------------------


def _record_id(record: ConsentRecord) -> str:
    return sha256_hex(canonical_json(record.identity()))


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class ConsentRegistry:
    """A site's consent records, the task-time filter and withdrawals; each change in the site's audit log."""

    def __init__(
        self,
        engine: Engine,
        audit_log: AuditLog,
        *,
        model: ConsentModel = ConsentModel.OPT_IN,
        suppression_threshold: int = SUPPRESSION_THRESHOLD,
    ) -> None:
        if suppression_threshold < 1:
            raise InputError("the suppression threshold must be at least 1")
        self._engine = engine
        self._log = audit_log
        self._model = model
        self._threshold = suppression_threshold

    @property
    def model(self) -> ConsentModel:
        return self._model

    # imports

    def import_csv(self, path: Path) -> ConsentImportSummary:
        """Import a consent CSV (module docstring). All rows are validated before any is stored."""
        return self.add(parse_consent_csv(path), source=f"csv:{path.name}")

    def import_fhir(
        self, document: Path | Mapping[str, Any] | Sequence[Mapping[str, Any]]
    ) -> ConsentImportSummary:
        """Import FHIR R4 Consent resources: a JSON file or parsed JSON (Bundle, Consent, or list)."""
        origin = document.name if isinstance(document, Path) else "fhir"
        parsed = _load_json(document) if isinstance(document, Path) else document
        found = parse_fhir_consents(parsed, origin=origin)
        now = self._log.clock.now()
        # a new version of a Consent resource replaces the old: records only the old version had are withdrawn
        current: dict[str, set[str]] = {}
        for record in found.records:
            resource = record.source.split("#", 1)[0]
            if resource.startswith("fhir:Consent/"):
                current.setdefault(resource, set()).add(_record_id(record))
        with state_and_log(self._engine, self._log) as (conn, log_conn):
            added, updated, unchanged = self._store(conn, found.records)
            withdrawn = sum(self._withdraw_source(conn, r, now, keep=keep) for r, keep in current.items())
            withdrawn += sum(self._withdraw_source(conn, source, now) for source in found.withdrawals)
            summary = ConsentImportSummary(
                source=f"fhir:{origin}",
                added=added,
                updated=updated,
                unchanged=unchanged,
                withdrawn=withdrawn,
                skipped=found.skipped,
            )
            self._log.append(AuditEventType.CONSENT_IMPORTED, summary.to_json(), connection=log_conn)
        return summary

    def add(self, records: Iterable[ConsentRecord], *, source: str = "api") -> ConsentImportSummary:
        """Store records (idempotent: a record already stored is unchanged, or gains a withdrawal time)."""
        with state_and_log(self._engine, self._log) as (conn, log_conn):
            added, updated, unchanged = self._store(conn, records)
            summary = ConsentImportSummary(source=source, added=added, updated=updated, unchanged=unchanged)
            self._log.append(AuditEventType.CONSENT_IMPORTED, summary.to_json(), connection=log_conn)
        return summary

    def _store(self, conn: Connection, records: Iterable[ConsentRecord]) -> tuple[int, int, int]:
        """Upsert on ``conn``; returns (added, updated, unchanged)."""
        incoming: dict[str, ConsentRecord] = {}
        for record in records:
            key = _record_id(record)
            prior = incoming.get(key)
            if prior is not None and prior.withdrawn_at is not None:
                record = replace(record, withdrawn_at=_earliest(prior.withdrawn_at, record.withdrawn_at))
            incoming[key] = record
        now = self._log.clock.now()
        added = updated = unchanged = 0
        existing: dict[str, datetime | None] = {}
        for chunk in _chunks(list(incoming)):
            rows = conn.execute(
                select(consent_records.c.record_id, consent_records.c.withdrawn_at).where(
                    consent_records.c.record_id.in_(chunk)
                )
            )
            existing.update({row.record_id: row.withdrawn_at for row in rows})
        new_rows = []
        for key, record in incoming.items():
            if key not in existing:
                new_rows.append(_row(key, record, now))
                added += 1
                continue
            # a withdrawal is never undone by re-importing the record without one
            merged = _earliest(existing[key], record.withdrawn_at)
            if merged != existing[key]:
                conn.execute(
                    update(consent_records)
                    .where(consent_records.c.record_id == key)
                    .values(withdrawn_at=merged)
                )
                updated += 1
            else:
                unchanged += 1
        if new_rows:
            conn.execute(insert(consent_records), new_rows)
        return added, updated, unchanged

    def _withdraw_source(
        self, conn: Connection, source: str, when: datetime, *, keep: Iterable[str] = ()
    ) -> int:
        prefix = f"{source}#"
        kept = set(keep)
        rows = conn.execute(
            select(consent_records.c.record_id, consent_records.c.withdrawn_at).where(
                consent_records.c.source.startswith(prefix, autoescape=True)
            )
        ).all()
        changed = 0
        for row in rows:
            if row.record_id in kept:
                continue
            merged = _earliest(row.withdrawn_at, when)
            if merged != row.withdrawn_at:
                conn.execute(
                    update(consent_records)
                    .where(consent_records.c.record_id == row.record_id)
                    .values(withdrawn_at=merged)
                )
                changed += 1
        return changed

    # reading

    def records(self, patient_id: str | None = None) -> list[ConsentRecord]:
        query = select(consent_records).order_by(consent_records.c.patient_id, consent_records.c.record_id)
        if patient_id is not None:
            query = query.where(consent_records.c.patient_id == patient_id)
        with self._engine.connect() as conn:
            return [_record_from_db(row) for row in conn.execute(query)]

    # task time

    def filter(
        self,
        patient_ids: Sequence[str],
        purpose: str,
        on: date | datetime,
        *,
        task_id: str | None = None,
        study_id: str | None = None,
    ) -> ConsentFilterResult:
        """Keep the rows whose patient's consent permits ``purpose`` at ``on``; store and log the snapshot.

        ``patient_ids`` has one entry per data row (a patient may have several rows); ``kept_indices`` are row
        positions, the counts are over distinct patients. A ``date`` means the start of that day (UTC).
        """
        _check_id(purpose, "purpose")
        if purpose == ANY_PURPOSE:
            raise InputError("a study states its purpose; '*' is only for consent records")
        for i, pid in enumerate(patient_ids):
            if not isinstance(pid, str) or not pid:
                raise InputError(f"patient id at row {i} is not a non-empty string")
        at = as_instant(on)
        distinct = set(patient_ids)
        match_keys = {pid: id_match_key(pid) for pid in distinct}
        wanted = set(match_keys.values())
        # the winning record's precedence key per patient (as _precedence): plain tuples, because this loop
        # sees every record of the purpose and a ConsentRecord each would dominate the cost. Records of other
        # spellings of a dataset id are decided too (``best`` holds them): their deny excludes the row.
        best: dict[str, tuple[datetime, int, int]] = {}
        c = consent_records.c
        columns = (c.patient_id, c.purpose, c.decision, c.valid_from, c.valid_until, c.withdrawn_at)
        with self._engine.connect() as conn:
            # the purpose's other spellings too: a deny under one excludes the patient (``_speaks_for``)
            purposes = [purpose, ANY_PURPOSE, *_other_spellings(conn, consent_records.c.purpose, purpose)]
            rows = conn.execute(select(*columns).where(c.purpose.in_(purposes)))
            for pid, record_purpose, decision, valid_from, valid_until, withdrawn_at in rows:
                if record_purpose not in (purpose, ANY_PURPOSE) and decision != ConsentDecision.DENY.value:
                    continue  # a permit under another spelling grants nothing
                if pid not in distinct:
                    if pid not in match_keys:
                        match_keys[pid] = id_match_key(pid)
                    if match_keys[pid] not in wanted:
                        continue
                if (
                    (valid_from is not None and at < valid_from)
                    or (valid_until is not None and at >= valid_until)
                    or (withdrawn_at is not None and at >= withdrawn_at)
                ):
                    continue
                key = (
                    valid_from or _BEGINNING,
                    int(record_purpose != ANY_PURPOSE),
                    int(decision == ConsentDecision.DENY.value),
                )
                if pid not in best or key > best[pid]:
                    best[pid] = key
        denied_keys = {match_keys[pid] for pid, key in best.items() if key[2]}
        denied_ids = {pid for pid in distinct if match_keys[pid] in denied_keys}
        permitted = {pid for pid, key in best.items() if not key[2] and pid in distinct} - denied_ids
        unrecorded = distinct - best.keys() - denied_ids
        denied = len(denied_ids)
        kept = permitted | unrecorded if self._model is ConsentModel.OPT_OUT else permitted
        day = at.date()
        result = ConsentFilterResult(
            purpose=purpose,
            on_date=day,
            consent_model=self._model,
            kept_indices=tuple(i for i, pid in enumerate(patient_ids) if pid in kept),
            kept_patient_ids=tuple(sorted(kept)),
            total_count=len(distinct),
            permitted_count=len(permitted),
            denied_count=denied,
            no_record_count=len(unrecorded),
            snapshot_hash=consent_snapshot_hash(kept, purpose, day),
        )
        payload: dict[str, Any] = {
            "purpose": purpose,
            "date": day.isoformat(),
            "snapshot_hash": result.snapshot_hash,
            "consent_model": self._model.value,
            "counts": result.reported_counts(self._threshold),
        }
        if task_id is not None:
            payload["task_id"] = task_id
        if study_id is not None:
            payload["study_id"] = study_id
        with state_and_log(self._engine, self._log) as (conn, log_conn):
            self._store_snapshot(conn, result)
            self._log.append(AuditEventType.CONSENT_APPLIED, payload, connection=log_conn)
        return result

    def _store_snapshot(self, conn: Connection, result: ConsentFilterResult) -> None:
        known = conn.execute(
            select(consent_snapshots.c.snapshot_hash).where(
                consent_snapshots.c.snapshot_hash == result.snapshot_hash
            )
        ).first()
        if known is not None:
            return
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(consent_snapshots).values(
                        snapshot_hash=result.snapshot_hash,
                        purpose=result.purpose,
                        on_date=result.on_date.isoformat(),
                        n_patients=result.kept_count,
                        created_at=self._log.clock.now(),
                    )
                )
                members = [
                    {"snapshot_hash": result.snapshot_hash, "patient_id": p} for p in result.kept_patient_ids
                ]
                for i in range(0, len(members), 5000):
                    conn.execute(insert(consent_snapshot_members), members[i : i + 5000])
        except IntegrityError:
            pass  # stored concurrently by another task: same hash, same content

    def snapshots_including(self, patient_id: str, purpose: str | None = None) -> list[str]:
        """The stored snapshot hashes that included ``patient_id`` (for ``purpose``, or any purpose)."""
        with self._engine.connect() as conn:
            return _snapshots_including(conn, patient_id, purpose)

    # withdrawal

    def withdraw(
        self, patient_id: str, purpose: str | None = None, when: datetime | None = None
    ) -> WithdrawalNotice:
        """Withdraw a patient's consent for ``purpose`` (None: every purpose) from ``when`` (default: now).

        Marks the patient's matching records withdrawn and adds a deny record from ``when`` (so a broader
        permit, e.g. for ``*``, no longer covers the purpose), and one from the start of each ``*`` permit
        that starts later (said before the withdrawal, it must not outrank it when it starts). Returns the
        notice for the orchestrator: the snapshot hashes that included the patient for that purpose, and
        nothing that identifies the patient.
        """
        _check_id(patient_id, "patient_id")
        scope = purpose if purpose is not None else ANY_PURPOSE
        _check_id(scope, "purpose")
        at = require_aware(when, "the withdrawal time") if when is not None else self._log.clock.now()
        deny = ConsentRecord(
            patient_id=patient_id,
            purpose=scope,
            decision=ConsentDecision.DENY,
            valid_from=at,
            source="withdrawal",
        )
        with state_and_log(self._engine, self._log) as (conn, log_conn):
            query = select(consent_records.c.record_id, consent_records.c.withdrawn_at).where(
                consent_records.c.patient_id == patient_id
            )
            if scope != ANY_PURPOSE:
                spellings = [scope, *_other_spellings(conn, consent_records.c.purpose, scope)]
                query = query.where(consent_records.c.purpose.in_(spellings))
            for row in conn.execute(query).all():
                merged = _earliest(row.withdrawn_at, at)
                if merged != row.withdrawn_at:
                    conn.execute(
                        update(consent_records)
                        .where(consent_records.c.record_id == row.record_id)
                        .values(withdrawn_at=merged)
                    )
            denies = [deny]
            if scope != ANY_PURPOSE:
                # A permit for every purpose that starts after the withdrawal would be the later statement
                # once it starts, and win: the withdrawal was said after it, so a deny for this purpose
                # starts with it too (at equal start the purpose's own record beats ``*``).
                later = select(consent_records.c.valid_from).where(
                    (consent_records.c.patient_id == patient_id)
                    & (consent_records.c.purpose == ANY_PURPOSE)
                    & (consent_records.c.decision == ConsentDecision.PERMIT.value)
                    & (consent_records.c.valid_from > at)
                )
                for start in sorted(set(conn.execute(later).scalars())):
                    denies.append(replace(deny, valid_from=start))
            self._store(conn, denies)
            notice = WithdrawalNotice(
                notice_id=new_id("wd"),
                purpose=scope,
                withdrawn_at=at,
                snapshot_hashes=tuple(_snapshots_including(conn, patient_id, purpose)),
            )
            self._log.append(
                AuditEventType.CONSENT_WITHDRAWN,
                {
                    "patient_id": patient_id,
                    "purpose": scope,
                    "withdrawn_at": format_instant(at),
                    "notice_id": notice.notice_id,
                    "affected_snapshots": list(notice.snapshot_hashes),
                },
                connection=log_conn,
            )
        return notice


def _snapshots_including(conn: Connection, patient_id: str, purpose: str | None) -> list[str]:
    """The snapshots that kept ``patient_id`` under any of its spellings (``id_match_key``): a withdrawal
    said as ``P0003`` must flag the models trained on the dataset's ``p0003``."""
    key = id_match_key(patient_id)
    members = consent_snapshot_members.c
    spellings = [
        p for p in conn.execute(select(members.patient_id).distinct()).scalars() if id_match_key(p) == key
    ]
    query = (
        select(consent_snapshots.c.snapshot_hash)
        .join(
            consent_snapshot_members,
            members.snapshot_hash == consent_snapshots.c.snapshot_hash,
        )
        .where(members.patient_id.in_([patient_id, *spellings]))
    )
    if purpose is not None and purpose != ANY_PURPOSE:
        # a withdrawal said as ``Research`` names the snapshots of the studies for ``research``
        spellings = [purpose, *_other_spellings(conn, consent_snapshots.c.purpose, purpose)]
        query = query.where(consent_snapshots.c.purpose.in_(spellings))
    return sorted(set(conn.execute(query).scalars()))


def _other_spellings(conn: Connection, column: Any, purpose: str) -> list[str]:
    """The purposes stored in ``column`` that are ``purpose`` under another spelling (:func:`id_match_key`),
    ``*`` aside."""
    key = id_match_key(purpose)
    return [
        p
        for p in conn.execute(select(column).distinct()).scalars()
        if p not in (purpose, ANY_PURPOSE) and id_match_key(p) == key
    ]


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _row(key: str, record: ConsentRecord, now: datetime) -> dict[str, Any]:
    return {
        "record_id": key,
        "patient_id": record.patient_id,
        "purpose": record.purpose,
        "decision": record.decision.value,
        "valid_from": record.valid_from,
        "valid_until": record.valid_until,
        "withdrawn_at": record.withdrawn_at,
        "source": record.source,
        "imported_at": now,
    }


def _record_from_db(row: Any) -> ConsentRecord:
    return ConsentRecord(
        patient_id=row.patient_id,
        purpose=row.purpose,
        decision=ConsentDecision(row.decision),
        valid_from=row.valid_from,
        valid_until=row.valid_until,
        withdrawn_at=row.withdrawn_at,
        source=row.source,
    )
