"""The audit log: append-only, typed, hash-chained entries, each signed by its writer.

Every site and the orchestrator keep one. Entry ``n`` holds the sha256 of entry ``n-1`` (``prev_hash``), its
own hash (sha256 of the canonical JSON of everything except the hash and the signature) and an Ed25519
signature of that hash by the writer's identity key. So an edit, a deletion, a reordering or an insertion is
visible to anyone holding the writer's public key, offline (:func:`verify_chain`). What the chain alone cannot
catch is the writer itself rewriting its whole log with its own key; that is what cross-anchoring is for: the
orchestrator's round records hold the sites' log heads and each site logs the orchestrator's round commitment,
and :func:`verify_anchor` names an anchored entry that no longer matches.

Appends are serialized across processes (``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory lock on
PostgreSQL) and the ``(log_id, seq)`` primary key makes a fork impossible even where no lock exists.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time as _time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from fedhealth.core import Clock, CryptoError, InputError, SystemClock, canonical_json, sha256_hex
from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.governance._errors import AuditIntegrityError
from fedhealth.governance._tables import audit_entries, audit_keys
from fedhealth.governance._timefmt import format_instant, parse_instant

GENESIS_HASH = "0" * 64
DEFAULT_LOG_ID = "main"
ENTRY_FORMAT_VERSION = 1
# A site's log holds patient ids (a consent withdrawal) and error texts, and the site hands its log's head (an
# entry's hash) to the orchestrator with every task. With ``salted`` every entry's payload carries 128 random
# bits, so nobody without the log can test a guess of an entry (a patient id, a time) against its hash.
SALT_KEY = "salt"
MAX_PAYLOAD_BYTES = 256 * 1024
_SIGNING_PURPOSE = "fedhealth.audit-entry.v1"
_APPEND_ATTEMPTS = 50


class AuditEventType(StrEnum):
    """What an entry records. The value is what is hashed and stored."""

    ENROLLMENT = "enrollment"
    STUDY_SUBMITTED = "study.submitted"
    STUDY_APPROVED = "study.approved"
    STUDY_REJECTED = "study.rejected"
    STUDY_REVIEWED = "study.reviewed"
    # the key a study owner signs with, pinned at this site (on first use, or by the steward)
    OWNER_KEY_PINNED = (
        "owner_key.pinned"  # the steward displayed the full spec (`fedhealth site approvals show`)
    )
    TASK_RECEIVED = "task.received"
    TASK_REFUSED = "task.refused"
    TASK_COMPLETED = "task.completed"
    UPDATE_SENT = "update.sent"
    MODEL_RELEASED = "model.released"
    MODEL_FLAGGED = "model.flagged"
    CONSENT_IMPORTED = "consent.imported"
    CONSENT_WITHDRAWN = "consent.withdrawn"
    CONSENT_APPLIED = "consent.applied"
    BUDGET_SPENT = "budget.spent"
    CONFIGURATION_CHANGED = "configuration.changed"
    POLICY_DECISION = "policy.decision"
    ROUND_COMMITTED = "round.committed"
    ANCHOR_RECORDED = "anchor.recorded"
    # identity and authorization actions at the orchestrator (who did them is in the payload's "by")
    SITE_CREATED = "site.created"
    SITE_TOKEN_ISSUED = "site.enrollment_token_issued"  # noqa: S105 - an event name, not a secret
    SITE_ROTATED = "site.rotated"
    SITE_REVOKED = "site.revoked"
    USER_CREATED = "user.created"
    USER_KEY_CHANGED = "user.key_changed"
    USER_REVOKED = "user.revoked"
    STUDY_CANCELLED = "study.cancelled"
    COMMITMENT_KEY_REVEALED = "commitment.key_revealed"
    # a collective session's end (its start, participants, outcome and call count; not each call)
    SESSION_ENDED = "session.ended"
    # an operator's action through the dashboard: sign-in (or its refusal), sign-out, each form submitted
    UI_ACTION = "ui.action"
    # feature-distribution drift: a stats study's histograms compared with its reference (level ok/warn/alert)
    DRIFT_CHECKED = "drift.checked"
    # an operator designated a stats study as the drift reference of its dataset
    DRIFT_REFERENCE = "drift.reference"


# Keys an entry of each type must carry, so an auditor can rely on them. Types not listed are free-form.
REQUIRED_PAYLOAD_KEYS: Mapping[AuditEventType, frozenset[str]] = {
    AuditEventType.STUDY_SUBMITTED: frozenset({"spec_hash", "study"}),
    AuditEventType.OWNER_KEY_PINNED: frozenset({"owner", "fingerprint", "by"}),
    AuditEventType.STUDY_APPROVED: frozenset({"spec_hash", "study", "reason", "steward"}),
    AuditEventType.STUDY_REJECTED: frozenset({"spec_hash", "study", "reason", "steward"}),
    AuditEventType.STUDY_REVIEWED: frozenset({"spec_hash", "study", "steward"}),
    AuditEventType.TASK_RECEIVED: frozenset({"task_id", "study_id"}),
    AuditEventType.TASK_REFUSED: frozenset({"task_id", "study_id", "rule", "reason"}),
    AuditEventType.TASK_COMPLETED: frozenset({"task_id", "study_id"}),
    AuditEventType.UPDATE_SENT: frozenset({"task_id", "study_id"}),
    AuditEventType.MODEL_RELEASED: frozenset({"model_digest"}),
    AuditEventType.MODEL_FLAGGED: frozenset({"model_digest", "notice_id", "reason"}),
    AuditEventType.CONSENT_WITHDRAWN: frozenset({"purpose", "withdrawn_at", "affected_snapshots"}),
    AuditEventType.CONSENT_APPLIED: frozenset({"purpose", "date", "snapshot_hash", "counts"}),
    AuditEventType.POLICY_DECISION: frozenset({"allowed", "reason", "rule", "subject"}),
    AuditEventType.ROUND_COMMITTED: frozenset({"study_id", "round", "site_heads"}),
    AuditEventType.ANCHOR_RECORDED: frozenset({"study_id", "round", "orchestrator_head"}),
    AuditEventType.SITE_CREATED: frozenset({"site", "by"}),
    AuditEventType.DRIFT_CHECKED: frozenset(
        {"study_id", "reference_study_id", "dataset", "level", "findings"}
    ),
    AuditEventType.DRIFT_REFERENCE: frozenset({"study_id", "dataset", "by"}),
    AuditEventType.SITE_TOKEN_ISSUED: frozenset({"site", "by", "expires_at"}),
    AuditEventType.SITE_ROTATED: frozenset({"site", "by", "old_key"}),
    AuditEventType.SITE_REVOKED: frozenset({"site", "by"}),
    AuditEventType.USER_CREATED: frozenset({"user", "role", "by"}),
    AuditEventType.USER_KEY_CHANGED: frozenset({"user", "by"}),
    AuditEventType.USER_REVOKED: frozenset({"user", "by"}),
    AuditEventType.STUDY_CANCELLED: frozenset({"study_id", "by", "reason"}),
    AuditEventType.COMMITMENT_KEY_REVEALED: frozenset({"study_id", "to", "key_sha256"}),
    AuditEventType.SESSION_ENDED: frozenset({"study_id", "round", "outcome", "calls", "sites"}),
    AuditEventType.UI_ACTION: frozenset({"action", "by"}),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class LogHead:
    """The position and hash of one entry: what a peer anchors. An empty log's head is (0, GENESIS_HASH)."""

    seq: int
    entry_hash: str
    # The writer's signature of that entry (as the entry holds it): a peer that anchors a head the writer
    # never signed cannot pass it off as the writer's (see :func:`signed_by`). None for the empty log's head.
    signature: bytes | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seq": self.seq, "hash": self.entry_hash}
        if self.signature is not None:
            out["signature"] = self.signature.hex()
        return out

    @classmethod
    def from_json(cls, value: Any) -> LogHead:
        if (
            not isinstance(value, Mapping)
            or not isinstance(value.get("seq"), int)
            or isinstance(value.get("seq"), bool)
            or not _is_hash(value.get("hash"))
        ):
            raise InputError('a log head is {"seq": int, "hash": 64 hex characters}')
        signature = value.get("signature")
        if signature is not None:
            if not isinstance(signature, str) or len(signature) != 128:
                raise InputError("a log head's signature is 128 hex characters")
            try:
                raw = bytes.fromhex(signature)
            except ValueError as exc:
                raise InputError("a log head's signature is 128 hex characters") from exc
            return cls(seq=value["seq"], entry_hash=value["hash"], signature=raw)
        return cls(seq=value["seq"], entry_hash=value["hash"])

    def signed_by(self, key: PublicIdentity) -> bool:
        """Did ``key``'s holder sign the entry this head names (is this head its log's own)?"""
        if self.signature is None:
            return False
        try:
            key.verify(self.signature, _signing_message(self.entry_hash))
        except CryptoError:
            return False
        return True


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def entry_body(
    *, seq: int, time: str, actor: str, type: str, payload: Mapping[str, Any], prev_hash: str, signer: str
) -> dict[str, Any]:
    """Everything an entry's hash covers: all of the entry except the hash and the signature."""
    return {
        "v": ENTRY_FORMAT_VERSION,
        "seq": seq,
        "time": time,
        "actor": actor,
        "type": type,
        "payload": dict(payload),
        "prev_hash": prev_hash,
        "signer": signer,
    }


def _signing_message(entry_hash: str) -> bytes:
    # domain-separated, so an audit signature can never be replayed as another kind of fedhealth signature
    return canonical_json({"purpose": _SIGNING_PURPOSE, "entry_hash": entry_hash})


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One entry of an audit log, as written.

    ``type`` is an :class:`AuditEventType` for every type this version knows; an entry of a newer type read
    from elsewhere keeps its string (it still verifies).
    """

    seq: int
    time: datetime
    actor: str
    type: AuditEventType | str
    payload: Mapping[str, Any]
    prev_hash: str
    entry_hash: str
    signature: bytes
    signer: str

    def body(self) -> dict[str, Any]:
        return entry_body(
            seq=self.seq,
            time=format_instant(self.time),
            actor=self.actor,
            type=str(self.type),
            payload=self.payload,
            prev_hash=self.prev_hash,
            signer=self.signer,
        )

    def computed_hash(self) -> str:
        """sha256 of the canonical JSON of :meth:`body`; ``entry_hash`` unless the entry was altered."""
        return sha256_hex(canonical_json(self.body()))

    @property
    def head(self) -> LogHead:
        return LogHead(seq=self.seq, entry_hash=self.entry_hash, signature=self.signature)

    def to_json(self) -> dict[str, Any]:
        """The entry as one JSON object (an export line)."""
        return {**self.body(), "entry_hash": self.entry_hash, "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, value: Any) -> AuditEntry:
        """Parse :meth:`to_json`'s form; raises :class:`InputError` saying what is wrong."""
        if not isinstance(value, Mapping):
            raise InputError("an audit entry is a JSON object")
        expected = {
            "v",
            "seq",
            "time",
            "actor",
            "type",
            "payload",
            "prev_hash",
            "signer",
            "entry_hash",
            "signature",
        }
        if set(value) != expected:
            missing, extra = sorted(expected - set(value)), sorted(set(value) - expected)
            raise InputError(f"audit entry fields: missing {missing}, unexpected {extra}")
        if value["v"] != ENTRY_FORMAT_VERSION:
            raise InputError(f"audit entry format version {value['v']!r} is not {ENTRY_FORMAT_VERSION}")
        return entry_from_stored(
            seq=value["seq"],
            time=value["time"],
            actor=value["actor"],
            type=value["type"],
            payload=value["payload"],
            prev_hash=value["prev_hash"],
            entry_hash=value["entry_hash"],
            signature=value["signature"],
            signer=value["signer"],
        )


def entry_from_stored(
    *,
    seq: Any,
    time: Any,
    actor: Any,
    type: Any,
    payload: Any,
    prev_hash: Any,
    entry_hash: Any,
    signature: Any,
    signer: Any,
) -> AuditEntry:
    """Build an entry from stored fields (database row or export line), checking only their form.

    ``payload`` may be the stored canonical JSON text (which must be exactly canonical, so that no byte of a
    stored entry can change unnoticed) or an already parsed object. Raises :class:`InputError`.
    """
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise InputError(f"seq must be a positive integer, got {seq!r}")
    if not isinstance(time, str):
        raise InputError("time must be a string")
    try:
        when = parse_instant(time)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if not isinstance(actor, str) or not isinstance(type, str):
        raise InputError("actor and type must be strings")
    if isinstance(payload, str):
        try:
            parsed = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise InputError("payload is not JSON") from exc
        if not isinstance(parsed, dict) or canonical_json(parsed).decode() != payload:
            raise InputError("stored payload is not the canonical JSON of an object")
        payload = parsed
    elif not isinstance(payload, dict):
        raise InputError("payload must be a JSON object")
    for name, value in (("prev_hash", prev_hash), ("entry_hash", entry_hash), ("signer", signer)):
        if not _is_hash(value):
            raise InputError(f"{name} must be 64 lowercase hex characters")
    if not isinstance(signature, str):
        raise InputError("signature must be a hex string")
    try:
        sig = bytes.fromhex(signature)
    except ValueError as exc:
        raise InputError("signature is not hex") from exc
    try:
        event: AuditEventType | str = AuditEventType(type)
    except ValueError:
        event = type
    return AuditEntry(
        seq=seq,
        time=when,
        actor=actor,
        type=event,
        payload=payload,
        prev_hash=prev_hash,
        entry_hash=entry_hash,
        signature=sig,
        signer=signer,
    )


# --- verification -----------------------------------------------------------------------------------------


class AuditProblem(StrEnum):
    """Why an entry is bad, most structural first."""

    MALFORMED = "malformed"  # a stored field cannot be read back as it was written
    GAP = "gap"  # one or more entries are missing before this seq
    DUPLICATE = "duplicate"  # the same seq appears twice
    REORDERED = "reordered"  # entries are present but not in the order they were written
    HASH_MISMATCH = "hash_mismatch"  # the content no longer matches its hash: it was edited
    UNKNOWN_SIGNER = "unknown_signer"  # signed by a key that is not trusted for this log
    BAD_SIGNATURE = "bad_signature"  # the signature does not verify under the named key
    BROKEN_LINK = "broken_link"  # prev_hash is not the hash of the previous entry
    ANCHOR_MISSING = "anchor_missing"  # an entry a peer anchored is no longer in the log
    ANCHOR_MISMATCH = "anchor_mismatch"  # an entry a peer anchored has a different hash now
    # a site anchored this entry, signed by the orchestrator, as the commitment of a round it does not commit
    ANCHOR_DISPUTED = "anchor_disputed"


@dataclass(frozen=True, slots=True, kw_only=True)
class BadEntry:
    """The first bad entry found: its seq, the problem, and a sentence for people."""

    seq: int
    problem: AuditProblem
    detail: str

    def describe(self) -> str:
        return f"entry {self.seq}: {self.problem.value}: {self.detail}"


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationReport:
    """The result of a verification. ``first_bad`` is None exactly when the log verified."""

    checked: int
    head: LogHead
    first_bad: BadEntry | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    def raise_if_bad(self) -> None:
        """Raise :class:`AuditIntegrityError` naming the first bad entry, if any."""
        if self.first_bad is not None:
            raise AuditIntegrityError(self.first_bad)

    def summary(self) -> str:
        if self.first_bad is not None:
            return f"bad {self.first_bad.describe()}"
        return f"ok: {self.checked} entries verified, head {self.head.seq} {self.head.entry_hash[:16]}"


def verify_chain(
    entries: Iterable[AuditEntry],
    trusted_keys: Mapping[str, PublicIdentity],
    *,
    after: LogHead | None = None,
) -> VerificationReport:
    """Check order, hashes, links and signatures of ``entries`` (in stored order) and name the first bad one.

    ``trusted_keys`` maps key fingerprints to the public keys allowed to write this log. ``after`` verifies a
    segment that continues from a head already verified (default: the log from its first entry). The
    checks per entry, in this order: seq continuity (gap, duplicate, out of order), a link to an entry that
    comes later (reordering), the hash of the content, a trusted signer, the signature, the link to the
    previous entry.
    """
    items = list(entries)
    expected_seq = after.seq + 1 if after is not None else 1
    prev_hash = after.entry_hash if after is not None else GENESIS_HASH
    position_of_hash = {e.entry_hash: i for i, e in enumerate(items)}
    seqs_after: dict[int, int] = {}
    for i, e in enumerate(items):
        seqs_after.setdefault(e.seq, i)
    seen: set[int] = set()
    for i, entry in enumerate(items):
        bad = _check_position(entry, i, expected_seq, seen, seqs_after)
        if bad is None:
            bad = _check_content(entry, i, prev_hash, position_of_hash, items, trusted_keys)
        if bad is not None:
            head = LogHead(seq=expected_seq - 1, entry_hash=prev_hash)
            return VerificationReport(checked=i, head=head, first_bad=bad)
        seen.add(entry.seq)
        expected_seq = entry.seq + 1
        prev_hash = entry.entry_hash
    return VerificationReport(checked=len(items), head=LogHead(seq=expected_seq - 1, entry_hash=prev_hash))


def _check_position(
    entry: AuditEntry, index: int, expected: int, seen: set[int], first_index_of_seq: Mapping[int, int]
) -> BadEntry | None:
    if entry.seq == expected:
        return None
    if entry.seq in seen:
        return BadEntry(
            seq=entry.seq, problem=AuditProblem.DUPLICATE, detail=f"entry {entry.seq} appears twice"
        )
    if entry.seq > expected and first_index_of_seq.get(expected, -1) > index:
        return BadEntry(
            seq=entry.seq,
            problem=AuditProblem.REORDERED,
            detail=f"entry {entry.seq} comes before entry {expected}",
        )
    if entry.seq > expected:
        missing = f"{expected}" if entry.seq == expected + 1 else f"{expected} to {entry.seq - 1}"
        return BadEntry(
            seq=expected,
            problem=AuditProblem.GAP,
            detail=f"entry {missing} missing: entry {entry.seq} follows entry {expected - 1}",
        )
    return BadEntry(
        seq=entry.seq,
        problem=AuditProblem.REORDERED,
        detail=f"entry {entry.seq} comes after entry {expected - 1}",
    )


def _check_content(
    entry: AuditEntry,
    index: int,
    prev_hash: str,
    position_of_hash: Mapping[str, int],
    items: Sequence[AuditEntry],
    trusted_keys: Mapping[str, PublicIdentity],
) -> BadEntry | None:
    seq = entry.seq
    if entry.prev_hash != prev_hash and position_of_hash.get(entry.prev_hash, -1) > index:
        later = items[position_of_hash[entry.prev_hash]].seq
        return BadEntry(
            seq=seq,
            problem=AuditProblem.REORDERED,
            detail=f"it links to entry {later}, which comes after it: entries were reordered",
        )
    if entry.computed_hash() != entry.entry_hash:
        return BadEntry(
            seq=seq, problem=AuditProblem.HASH_MISMATCH, detail="content does not match its hash (edited)"
        )
    key = trusted_keys.get(entry.signer)
    if key is None:
        return BadEntry(
            seq=seq,
            problem=AuditProblem.UNKNOWN_SIGNER,
            detail=f"signed by key {entry.signer[:16]}, which is not trusted for this log",
        )
    try:
        key.verify(entry.signature, _signing_message(entry.entry_hash))
    except CryptoError:
        return BadEntry(
            seq=seq,
            problem=AuditProblem.BAD_SIGNATURE,
            detail=f"signature does not verify ({entry.signer[:16]})",
        )
    if entry.prev_hash != prev_hash:
        where = position_of_hash.get(entry.prev_hash)
        hint = (
            f"it links to entry {items[where].seq}"
            if where is not None
            else "it links to no entry in this log"
        )
        return BadEntry(
            seq=seq,
            problem=AuditProblem.BROKEN_LINK,
            detail=f"prev_hash is not the hash of the entry before it: {hint}",
        )
    return None


def verify_anchor(entries: Iterable[AuditEntry], anchored_heads: Iterable[LogHead]) -> VerificationReport:
    """Check that every head a peer anchored is still in the log, unchanged; name the lowest that is not.

    Run this together with :func:`verify_chain`: a writer that re-signs a rewritten history produces a valid
    chain, and only the anchors held by its peers expose it.
    """
    by_seq = {e.seq: e for e in entries}
    seq_of_hash = {e.entry_hash: e.seq for e in by_seq.values()}
    anchors = sorted(set(anchored_heads), key=lambda h: h.seq)
    last_good: LogHead | None = None
    for anchor in anchors:
        if anchor.seq == 0:
            continue  # an empty log's head anchors nothing
        if seq_of_hash.get(anchor.entry_hash, anchor.seq) != anchor.seq:
            # the writer signs an entry's hash, which covers its seq; the seq beside it is the peer's word.
            # The entry is in the log, unchanged, under its own number: a renumbered head proves nothing
            continue
        entry = by_seq.get(anchor.seq)
        since = f"between entries {last_good.seq + 1} and {anchor.seq}" if last_good else "at or before it"
        if entry is None:
            end = max(by_seq, default=0)
            return VerificationReport(
                checked=len(by_seq),
                head=_head_of(by_seq),
                first_bad=BadEntry(
                    seq=anchor.seq,
                    problem=AuditProblem.ANCHOR_MISSING,
                    detail=f"a peer anchored entry {anchor.seq}, but the log ends at {end}: it was truncated",
                ),
            )
        if entry.entry_hash != anchor.entry_hash:
            return VerificationReport(
                checked=len(by_seq),
                head=_head_of(by_seq),
                first_bad=BadEntry(
                    seq=anchor.seq,
                    problem=AuditProblem.ANCHOR_MISMATCH,
                    detail=f"it no longer matches the head a peer anchored: the log was rewritten {since}",
                ),
            )
        last_good = anchor
    return VerificationReport(checked=len(by_seq), head=_head_of(by_seq))


def _head_of(by_seq: Mapping[int, AuditEntry]) -> LogHead:
    if not by_seq:
        return LogHead(seq=0, entry_hash=GENESIS_HASH)
    return by_seq[max(by_seq)].head


# --- storage ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredLog:
    """A log as read back: the readable entries, and the first row that could not be read, if any."""

    entries: tuple[AuditEntry, ...]
    malformed: BadEntry | None = None


def read_stored_log(engine: Engine, *, log_id: str = DEFAULT_LOG_ID) -> StoredLog:
    """Read a log in seq order, stopping at the first row that cannot be parsed (named in ``malformed``)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(audit_entries).where(audit_entries.c.log_id == log_id).order_by(audit_entries.c.seq)
        ).all()
    out: list[AuditEntry] = []
    for row in rows:
        try:
            out.append(
                entry_from_stored(
                    seq=row.seq,
                    time=row.time,
                    actor=row.actor,
                    type=row.type,
                    payload=row.payload,
                    prev_hash=row.prev_hash,
                    entry_hash=row.entry_hash,
                    signature=row.signature,
                    signer=row.signer,
                )
            )
        except InputError as exc:
            return StoredLog(
                entries=tuple(out),
                malformed=BadEntry(seq=int(row.seq), problem=AuditProblem.MALFORMED, detail=str(exc)),
            )
    return StoredLog(entries=tuple(out))


def stored_keys(engine: Engine) -> dict[str, PublicIdentity]:
    """The writer keys registered in this database (integrity only: whoever can edit rows can edit these)."""
    with engine.connect() as conn:
        rows = conn.execute(select(audit_keys.c.fingerprint, audit_keys.c.public_key)).all()
    keys: dict[str, PublicIdentity] = {}
    for fingerprint, public_hex in rows:
        try:
            key = PublicIdentity(bytes.fromhex(public_hex))
        except (ValueError, CryptoError):
            continue  # an unreadable key trusts nothing; the entries it signed will fail as unknown signer
        if key.fingerprint == fingerprint:
            keys[fingerprint] = key
    return keys


def stored_log_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(audit_entries.c.log_id).distinct()).scalars())


def verify_stored_log(
    engine: Engine,
    trusted_keys: Mapping[str, PublicIdentity],
    *,
    log_id: str = DEFAULT_LOG_ID,
    anchored_heads: Iterable[LogHead] = (),
) -> VerificationReport:
    """Verify a log straight from the database: rows, chain, signatures, then any anchors."""
    return verify_loaded(read_stored_log(engine, log_id=log_id), trusted_keys, anchored_heads=anchored_heads)


def verify_loaded(
    stored: StoredLog, trusted_keys: Mapping[str, PublicIdentity], *, anchored_heads: Iterable[LogHead] = ()
) -> VerificationReport:
    """Verify what :func:`read_stored_log` (or an export reader) returned; the lowest bad seq wins."""
    report = verify_chain(stored.entries, trusted_keys)
    if not report.ok:
        return report
    if stored.malformed is not None:
        return VerificationReport(checked=report.checked, head=report.head, first_bad=stored.malformed)
    anchored = verify_anchor(stored.entries, anchored_heads)
    return anchored if not anchored.ok else report


def _lock_key(log_id: str) -> int:
    return int.from_bytes(
        hashlib.sha256(f"fedhealth.audit:{log_id}".encode()).digest()[:8], "big", signed=True
    )


def _begin_serialized(conn: Connection, log_id: str) -> None:
    """Start a transaction that holds this log's write lock until commit."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        # take the write lock up front: a deferred transaction that reads first and then writes can deadlock
        # with another writer, and SQLite then fails at once instead of waiting
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif dialect == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(log_id)})
    # elsewhere the (log_id, seq) primary key still forbids a fork: the losing writer retries


def _is_retryable(exc: Exception) -> bool:
    if isinstance(exc, IntegrityError):
        return True  # another writer took this seq first
    message = str(exc).lower()
    return "locked" in message or "busy" in message


# Built once: the statement objects (and SQLAlchemy's cache keys for them) are reused by every append.
_HEAD_QUERY = (
    select(audit_entries.c.seq, audit_entries.c.entry_hash, audit_entries.c.signature)
    .where(audit_entries.c.log_id == bindparam("log_id"))
    .order_by(audit_entries.c.seq.desc())
    .limit(1)
)
_INSERT_ENTRY = insert(audit_entries)


class AuditLog:
    """One party's audit log in a database: append, read, verify.

    ``signer`` signs every entry; ``actor`` is the default actor recorded (a site, the orchestrator; a
    steward's action names its own in ``append``). ``log_id`` lets one database hold several logs.
    """

    def __init__(
        self,
        engine: Engine,
        signer: IdentityKey,
        actor: str,
        clock: Clock | None = None,
        *,
        log_id: str = DEFAULT_LOG_ID,
        salted: bool = False,
    ) -> None:
        if not actor:
            raise InputError("an audit log needs an actor name")
        if not log_id or len(log_id) > 64:
            raise InputError("log_id must be 1 to 64 characters")
        self._engine = engine
        self._signer = signer
        self._public = signer.public()
        self._actor = actor
        self._clock: Clock = clock or SystemClock()
        self._log_id = log_id
        self._key_registered = False
        self._batch: Connection | None = None
        self._batch_head: LogHead | None = None
        self._salted = salted

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def actor(self) -> str:
        return self._actor

    @property
    def public_key(self) -> PublicIdentity:
        return self._public

    @property
    def clock(self) -> Clock:
        return self._clock

    def append(
        self,
        type: AuditEventType,
        payload: Mapping[str, Any],
        *,
        actor: str | None = None,
        connection: Connection | None = None,
    ) -> AuditEntry:
        """Sign and append one entry after the current head; returns it. Safe across processes.

        With ``connection`` (from :meth:`transaction`), the entry commits or rolls back together with the
        caller's own changes on that connection.
        """
        event = AuditEventType(type)
        clean = _clean_payload(event, payload)
        if self._salted and SALT_KEY not in clean:
            clean = {**clean, SALT_KEY: secrets.token_hex(16)}
        who = actor or self._actor
        if connection is None and self._batch is not None:
            return self._append_on(self._batch, event, clean, who)
        if connection is not None:
            self._register_key(connection)
            return self._append_on(connection, event, clean, who)
        last_error: Exception | None = None
        for attempt in range(_APPEND_ATTEMPTS):
            try:
                with self._engine.connect() as conn:
                    _begin_serialized(conn, self._log_id)
                    if not self._key_registered:
                        self._register_key(conn)
                    entry = self._append_on(conn, event, clean, who)
                    conn.commit()
                    self._key_registered = True
                    return entry
            except (IntegrityError, OperationalError) as exc:
                if not _is_retryable(exc):
                    raise
                last_error = exc
                _time.sleep(min(0.002 * (attempt + 1), 0.05))
        raise InputError(f"could not append to audit log {self._log_id!r}: it stays locked") from last_error

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A transaction on the log's database that holds the log's write lock until it commits.

        Pass it to :meth:`append` as ``connection`` and make state changes on it too: the state and its audit
        entries then commit together or not at all (a governance action is never half-applied).
        """
        if self._batch is not None:
            # Inside batch(): commit what the batch wrote so far, run this transaction on its own (so the
            # state it changes is visible to other connections once it ends), then take the lock again.
            conn = self._batch
            conn.commit()
            self._batch_head = None
            _begin_serialized(conn, self._log_id)
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            else:
                conn.commit()
            finally:
                _begin_serialized(conn, self._log_id)
            return
        with self._engine.connect() as conn:
            _begin_serialized(conn, self._log_id)
            yield conn
            conn.commit()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Write the entries appended in the block in one serialized transaction: one commit instead of one
        per entry. A :meth:`transaction` opened in the block commits on its own, as outside a batch.

        The entries are committed when the block ends even if it ends with an exception: a refusal that is
        logged and then raised stays logged. Do not write to this database through other connections inside
        the block (the log holds its write lock).
        """
        if self._batch is not None:
            yield
            return
        with self._engine.connect() as conn:
            _begin_serialized(conn, self._log_id)
            if not self._key_registered:
                self._register_key(conn)
            self._batch = conn
            try:
                yield
            finally:
                self._batch = None
                self._batch_head = None
                try:
                    conn.commit()
                    self._key_registered = True
                except Exception:
                    conn.rollback()
                    raise

    def shares_database(self, engine: Engine) -> bool:
        """Whether ``engine`` is this log's database, so that changes on it can share :meth:`transaction`."""
        if engine is self._engine:
            return True
        mine, theirs = self._engine.url, engine.url
        return (
            mine.get_backend_name() == theirs.get_backend_name() == "sqlite"
            and mine.database == theirs.database
        )

    def _append_on(
        self, conn: Connection, event: AuditEventType, payload: dict[str, Any], actor: str
    ) -> AuditEntry:
        head = self._batch_head if conn is self._batch and self._batch_head is not None else self._head(conn)
        entry = self._make_entry(head, event, payload, actor)
        conn.execute(
            _INSERT_ENTRY,
            {
                "log_id": self._log_id,
                "seq": entry.seq,
                "time": format_instant(entry.time),
                "actor": entry.actor,
                "type": str(entry.type),
                "payload": canonical_json(entry.payload).decode(),
                "prev_hash": entry.prev_hash,
                "entry_hash": entry.entry_hash,
                "signature": entry.signature.hex(),
                "signer": entry.signer,
            },
        )
        if conn is self._batch:  # the batch holds the log's lock: nobody else can move the head
            self._batch_head = LogHead(seq=entry.seq, entry_hash=entry.entry_hash)
        return entry

    def _register_key(self, conn: Connection) -> None:
        fingerprint = self._public.fingerprint
        exists = conn.execute(
            select(audit_keys.c.fingerprint).where(audit_keys.c.fingerprint == fingerprint)
        ).first()
        if exists is None:
            conn.execute(
                insert(audit_keys).values(
                    fingerprint=fingerprint, public_key=self._public.raw.hex(), added_at=self._clock.now()
                )
            )

    def _head(self, conn: Connection) -> LogHead:
        row = conn.execute(_HEAD_QUERY, {"log_id": self._log_id}).first()
        if row is None:
            return LogHead(seq=0, entry_hash=GENESIS_HASH)
        return LogHead(
            seq=int(row.seq), entry_hash=str(row.entry_hash), signature=bytes.fromhex(row.signature)
        )

    def _make_entry(
        self, head: LogHead, event: AuditEventType, payload: Mapping[str, Any], actor: str
    ) -> AuditEntry:
        when = parse_instant(format_instant(self._clock.now()))  # microsecond precision, as stored
        body = entry_body(
            seq=head.seq + 1,
            time=format_instant(when),
            actor=actor,
            type=event.value,
            payload=payload,
            prev_hash=head.entry_hash,
            signer=self._public.fingerprint,
        )
        entry_hash = sha256_hex(canonical_json(body))
        return AuditEntry(
            seq=head.seq + 1,
            time=when,
            actor=actor,
            type=event,
            payload=payload,
            prev_hash=head.entry_hash,
            entry_hash=entry_hash,
            signature=self._signer.sign(_signing_message(entry_hash)),
            signer=self._public.fingerprint,
        )

    def head(self) -> LogHead:
        """The last entry's (seq, hash); ``(0, GENESIS_HASH)`` for an empty log."""
        if self._batch is not None:
            return self._head(self._batch)
        with self._engine.connect() as conn:
            return self._head(conn)

    def entries(self) -> list[AuditEntry]:
        """Every entry in seq order; raises :class:`AuditIntegrityError` if a row cannot be read."""
        stored = read_stored_log(self._engine, log_id=self._log_id)
        if stored.malformed is not None:
            raise AuditIntegrityError(stored.malformed)
        return list(stored.entries)

    def verify(
        self,
        trusted_keys: Mapping[str, PublicIdentity] | None = None,
        *,
        anchored_heads: Iterable[LogHead] = (),
    ) -> VerificationReport:
        """Verify this log; by default trusting only this writer's own key."""
        keys = trusted_keys if trusted_keys is not None else {self._public.fingerprint: self._public}
        return verify_stored_log(self._engine, keys, log_id=self._log_id, anchored_heads=anchored_heads)


def _clean_payload(event: AuditEventType, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload as plain JSON data (what will be read back), after checking its form and required keys."""
    if not isinstance(payload, Mapping):
        raise InputError("an audit payload is a mapping")
    try:
        encoded = canonical_json(dict(payload))
    except (TypeError, ValueError) as exc:
        raise InputError(f"audit payload is not JSON data: {exc}") from exc
    if len(encoded) > MAX_PAYLOAD_BYTES:
        raise InputError(f"audit payload is {len(encoded)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    missing = sorted(REQUIRED_PAYLOAD_KEYS.get(event, frozenset()) - payload.keys())
    if missing:
        raise InputError(f"a {event.value} entry needs payload keys {missing}")
    clean: dict[str, Any] = json.loads(encoded)
    return clean


@contextmanager
def state_and_log(engine: Engine, log: AuditLog) -> Iterator[tuple[Connection, Connection | None]]:
    """A transaction for a governance change and its audit entries: ``(state connection, log connection)``.

    When ``engine`` is the log's database, both are the same connection and everything commits at once.
    When it is another database the log connection is None: entries are appended (and committed) as the
    change proceeds and the change commits last, so a failure leaves an entry for a change that did not
    happen, never a change without its entry.
    """
    if log.shares_database(engine):
        with log.transaction() as conn:
            yield conn, conn
    else:
        with engine.begin() as conn:
            yield conn, None
