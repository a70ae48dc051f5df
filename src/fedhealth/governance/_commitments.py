"""Keyed commitments to what a site used: what it attests instead of bare hashes of its data.

A bare sha256 of a training set (or of the sorted ids of the patients whose consent it used) lets anyone who
knows every record but one test a guess about the last one: is patient P in, did P withdraw? So a site never
sends such a hash. It sends ``HMAC-SHA256(key, canonical_json({kind, study, task, digest}))`` under a key of
its own, one per study, drawn at random and kept in its database (``site_commitment_keys``). Without the key
the commitment is a pseudorandom string (it binds the site to ``digest`` but reveals nothing about it); it
names the task, so even two rounds on the same data give unrelated commitments. The site can *open* its
commitments to an auditor: :meth:`CommitmentKeys.reveal` hands over the study's key (the act is an entry of
the site's audit log) with the openings (task, kind, digest) its log recorded, and
:func:`verify_opening` checks each one; the auditor recomputes ``digest`` from the data the site shows it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Column, Engine, LargeBinary, MetaData, String, Table, insert, select

from fedhealth.core import CryptoError, InputError, NotFoundError, canonical_json
from fedhealth.governance._audit import AuditEventType, AuditLog, state_and_log
from fedhealth.governance._tables import UTCDateTime

COMMITMENT_FORMAT = "fedhealth.commitment.v1"
KEY_BYTES = 32

# Site-only state, apart from GOVERNANCE_METADATA (which the orchestrator's migrations also create).
COMMITMENT_METADATA = MetaData()
commitment_keys = Table(
    "site_commitment_keys",
    COMMITMENT_METADATA,
    Column("study_id", String(128), primary_key=True),
    Column("key", LargeBinary(KEY_BYTES), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)
# What the site committed to, so that it can open its commitments later (the digests never leave the site
# unless it reveals them).
commitment_openings = Table(
    "site_commitment_openings",
    COMMITMENT_METADATA,
    Column("commitment", String(64), primary_key=True),
    Column("study_id", String(128), nullable=False, index=True),
    Column("task_id", String(128), nullable=False),
    Column("kind", String(40), nullable=False),
    Column("digest", String(128), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)


class CommitmentKind(StrEnum):
    """What a commitment is to."""

    DATASET_FINGERPRINT = "dataset_fingerprint"  # the rows a task used (TabularDataset.fingerprint)
    CONSENT_SNAPSHOT = "consent_snapshot"  # the patients whose consent it used (consent_snapshot_hash)


def commit(key: bytes, *, kind: CommitmentKind, study_id: str, task_id: str, digest: str) -> str:
    """The commitment (hex) to ``digest`` for one task of one study."""
    if len(key) != KEY_BYTES:
        raise InputError(f"a commitment key is {KEY_BYTES} bytes")
    message = canonical_json(
        {
            "format": COMMITMENT_FORMAT,
            "kind": CommitmentKind(kind).value,
            "study_id": study_id,
            "task_id": task_id,
            "digest": digest,
        }
    )
    return hmac.new(key, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Opening:
    """What an auditor needs, with the key, to check one commitment: the task, the kind, the digest."""

    study_id: str
    task_id: str
    kind: CommitmentKind
    digest: str
    commitment: str

    def to_json(self) -> dict[str, str]:
        return {
            "study_id": self.study_id,
            "task_id": self.task_id,
            "kind": self.kind.value,
            "digest": self.digest,
            "commitment": self.commitment,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Opening:
        try:
            return cls(
                study_id=str(obj["study_id"]),
                task_id=str(obj["task_id"]),
                kind=CommitmentKind(obj["kind"]),
                digest=str(obj["digest"]),
                commitment=str(obj["commitment"]),
            )
        except (KeyError, ValueError) as exc:
            raise InputError(f"not a commitment opening: {exc}") from exc


def verify_opening(key: bytes, opening: Opening) -> None:
    """Check that ``opening.commitment`` commits to ``opening.digest`` under ``key``; raises
    :class:`CryptoError` if not (compared in constant time)."""
    expected = commit(
        key,
        kind=opening.kind,
        study_id=opening.study_id,
        task_id=opening.task_id,
        digest=opening.digest,
    )
    if not hmac.compare_digest(expected, opening.commitment):
        raise CryptoError(
            f"the {opening.kind.value} commitment of task {opening.task_id} does not open to the digest given"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Revelation:
    """A study's commitment key with the openings of everything the site committed to under it."""

    study_id: str
    key: bytes
    openings: tuple[Opening, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": COMMITMENT_FORMAT,
            "study_id": self.study_id,
            "key": self.key.hex(),
            "openings": [o.to_json() for o in self.openings],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Revelation:
        try:
            if obj.get("format") != COMMITMENT_FORMAT:
                raise InputError(f"not a {COMMITMENT_FORMAT} revelation")
            return cls(
                study_id=str(obj["study_id"]),
                key=bytes.fromhex(str(obj["key"])),
                openings=tuple(Opening.from_json(o) for o in obj["openings"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not a commitment revelation: {exc}") from exc

    def verify(self) -> None:
        """Every opening checks under the key (raises :class:`CryptoError` at the first that does not)."""
        for opening in self.openings:
            if opening.study_id != self.study_id:
                raise CryptoError(f"an opening of study {opening.study_id!r} in study {self.study_id!r}'s")
            verify_opening(self.key, opening)


class CommitmentKeys:
    """The site's per-study commitment keys (``site_commitment_keys`` in its database)."""

    def __init__(self, engine: Engine, log: AuditLog) -> None:
        self._engine = engine
        self._log = log
        COMMITMENT_METADATA.create_all(engine)

    def key(self, study_id: str) -> bytes:
        """The study's key, drawn from the OS's CSPRNG the first time it is asked for."""
        existing = self._read(study_id)
        if existing is not None:
            return existing
        # the log's transaction serializes this site's processes: one key per study, whoever draws first
        with state_and_log(self._engine, self._log) as (conn, _):
            c = commitment_keys.c
            if conn.execute(select(c.study_id).where(c.study_id == study_id)).first() is None:
                conn.execute(
                    insert(commitment_keys).values(
                        study_id=study_id, key=os.urandom(KEY_BYTES), created_at=self._log.clock.now()
                    )
                )
        stored = self._read(study_id)
        assert stored is not None
        return stored

    def commit(self, *, kind: CommitmentKind, study_id: str, task_id: str, digest: str) -> str:
        """The commitment to ``digest`` for this task, recorded with its opening."""
        value = commit(self.key(study_id), kind=kind, study_id=study_id, task_id=task_id, digest=digest)
        with state_and_log(self._engine, self._log) as (conn, _):
            c = commitment_openings.c
            if conn.execute(select(c.commitment).where(c.commitment == value)).first() is None:
                conn.execute(
                    insert(commitment_openings).values(
                        commitment=value,
                        study_id=study_id,
                        task_id=task_id,
                        kind=CommitmentKind(kind).value,
                        digest=digest,
                        created_at=self._log.clock.now(),
                    )
                )
        return value

    def openings(self, study_id: str) -> list[Opening]:
        c = commitment_openings.c
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(c.study_id, c.task_id, c.kind, c.digest, c.commitment)
                .where(c.study_id == study_id)
                .order_by(c.created_at, c.commitment)
            ).all()
        return [
            Opening(study_id=r[0], task_id=r[1], kind=CommitmentKind(r[2]), digest=r[3], commitment=r[4])
            for r in rows
        ]

    def reveal(self, study_id: str, *, to: str) -> Revelation:
        """The study's key and every opening, for an auditor; the disclosure is an entry of the site's log
        (to whom, and a hash of the key: never the key itself)."""
        key = self._read(study_id)
        if key is None:
            raise NotFoundError(f"this site has committed to nothing for study {study_id!r}")
        if not to.strip():
            raise InputError("say to whom the key is revealed")
        self._log.append(
            AuditEventType.COMMITMENT_KEY_REVEALED,
            {"study_id": study_id, "to": to, "key_sha256": hashlib.sha256(key).hexdigest()},
        )
        return Revelation(study_id=study_id, key=key, openings=tuple(self.openings(study_id)))

    def _read(self, study_id: str) -> bytes | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(commitment_keys.c.key).where(commitment_keys.c.study_id == study_id)
            ).first()
        return bytes(row[0]) if row is not None else None


def commitments_to(engine: Engine, kind: CommitmentKind, digests: Iterable[str]) -> list[str]:
    """Every commitment the site attested to one of ``digests`` (e.g. the consent snapshots a withdrawn
    patient was in: the orchestrator knows them only by these commitments)."""
    wanted = sorted(set(digests))
    if not wanted:
        return []
    COMMITMENT_METADATA.create_all(engine)
    c = commitment_openings.c
    found: set[str] = set()
    with engine.connect() as conn:
        for i in range(0, len(wanted), 500):
            found.update(
                conn.execute(
                    select(c.commitment).where((c.kind == kind.value) & c.digest.in_(wanted[i : i + 500]))
                ).scalars()
            )
    return sorted(found)
