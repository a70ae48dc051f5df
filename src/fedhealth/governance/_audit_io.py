"""Audit logs as JSON Lines, for auditors and for verification offline.

Line 1 is a header: ``{"format": "fedhealth.audit-log", "version": 1, "log_id": ..., "keys": {fingerprint:
public key hex}}``. Every further line is one entry exactly as stored (``AuditEntry.to_json``), in stored
order, so an export of a tampered database is tampered in the same way and verifies (or fails) the same way.
The header's keys are a convenience: whoever can rewrite the file can rewrite them too, so a verifier that
wants authenticity, not only integrity, pins the writer's key itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from fedhealth.core import CryptoError, InputError, canonical_json, write_private_file
from fedhealth.crypto import PublicIdentity
from fedhealth.governance._audit import (
    DEFAULT_LOG_ID,
    ENTRY_FORMAT_VERSION,
    AuditEntry,
    AuditProblem,
    BadEntry,
    StoredLog,
    stored_keys,
)
from fedhealth.governance._errors import AuditFormatError
from fedhealth.governance._tables import audit_entries

EXPORT_FORMAT = "fedhealth.audit-log"
EXPORT_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditExport:
    """An export file read back: its log id, the keys its header names, and its entries."""

    log_id: str
    header_keys: Mapping[str, PublicIdentity]
    stored: StoredLog


def _header(log_id: str, keys: Mapping[str, PublicIdentity]) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "log_id": log_id,
        "keys": {fp: key.raw.hex() for fp, key in sorted(keys.items())},
    }


def write_jsonl(
    entries: Iterable[AuditEntry], path: Path, *, log_id: str, keys: Mapping[str, PublicIdentity]
) -> int:
    """Write ``entries`` (already parsed) as an export file; returns the number of entries written."""
    lines = [canonical_json(_header(log_id, keys)).decode()]
    lines.extend(canonical_json(e.to_json()).decode() for e in entries)
    _write_export(path, lines)
    return len(lines) - 1


def export_stored_log(engine: Engine, path: Path, *, log_id: str = DEFAULT_LOG_ID) -> int:
    """Copy a log from the database to ``path`` row for row, unreadable rows included; returns the count."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(audit_entries).where(audit_entries.c.log_id == log_id).order_by(audit_entries.c.seq)
        ).all()
    lines = [canonical_json(_header(log_id, stored_keys(engine))).decode()]
    for row in rows:
        record = {
            "v": ENTRY_FORMAT_VERSION,
            "seq": row.seq,
            "time": row.time,
            "actor": row.actor,
            "type": row.type,
            "payload": _payload_as_exported(row.payload),
            "prev_hash": row.prev_hash,
            "signer": row.signer,
            "entry_hash": row.entry_hash,
            "signature": row.signature,
        }
        lines.append(canonical_json(record).decode())
    _write_export(path, lines)
    return len(rows)


def _write_export(path: Path, lines: list[str]) -> None:
    # private (0600) whatever the umask: a log names stewards, consent decisions and salted patient
    # references; through a new file renamed into place, so a link or FIFO planted at ``path`` is replaced
    write_private_file(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _payload_as_exported(stored: str) -> Any:
    # canonical text becomes the object it encodes; anything else stays the exact string (the reader flags it)
    try:
        parsed = json.loads(stored)
    except json.JSONDecodeError:
        return stored
    if isinstance(parsed, dict) and canonical_json(parsed).decode() == stored:
        return parsed
    return stored


def read_jsonl(path: Path) -> AuditExport:
    """Read an export file. A bad header raises :class:`AuditFormatError`; the first unreadable entry line is
    reported in ``stored.malformed`` (named by its seq where readable, else by line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditFormatError(f"cannot read {path}: {exc}") from exc
    lines = text.splitlines()
    if not lines:
        raise AuditFormatError(f"{path} is empty")
    log_id, keys = _parse_header(lines[0], path)
    entries: list[AuditEntry] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        value: Any = None
        try:
            value = json.loads(line)
            entries.append(AuditEntry.from_json(value))
        except (json.JSONDecodeError, InputError) as exc:
            seq = value.get("seq") if isinstance(value, dict) else None
            named = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 1 else None
            bad = BadEntry(
                seq=named if named is not None else (entries[-1].seq + 1 if entries else 1),
                problem=AuditProblem.MALFORMED,
                detail=f"line {number}: {exc}",
            )
            return AuditExport(
                log_id=log_id, header_keys=keys, stored=StoredLog(entries=tuple(entries), malformed=bad)
            )
    return AuditExport(log_id=log_id, header_keys=keys, stored=StoredLog(entries=tuple(entries)))


def _parse_header(line: str, path: Path) -> tuple[str, dict[str, PublicIdentity]]:
    try:
        header = json.loads(line)
    except json.JSONDecodeError as exc:
        raise AuditFormatError(f"{path}: line 1 is not a JSON header") from exc
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        raise AuditFormatError(
            f"{path} is not a fedhealth audit export (line 1 has no format {EXPORT_FORMAT!r})"
        )
    if header.get("version") != EXPORT_VERSION:
        raise AuditFormatError(f"{path}: export version {header.get('version')!r} is not {EXPORT_VERSION}")
    log_id = header.get("log_id")
    raw_keys = header.get("keys")
    if not isinstance(log_id, str) or not isinstance(raw_keys, dict):
        raise AuditFormatError(f"{path}: the header needs a log_id string and a keys object")
    keys: dict[str, PublicIdentity] = {}
    for fingerprint, public_hex in raw_keys.items():
        key = parse_public_key(public_hex) if isinstance(public_hex, str) else None
        if key is None or key.fingerprint != fingerprint:
            raise AuditFormatError(f"{path}: header key {str(fingerprint)[:16]} is not a valid Ed25519 key")
        keys[fingerprint] = key
    return log_id, keys


def parse_public_key(value: str) -> PublicIdentity | None:
    """An Ed25519 public key from 64 hex characters; None if it is not one."""
    try:
        return PublicIdentity(bytes.fromhex(value.strip()))
    except (ValueError, CryptoError):
        return None
