"""Study approval bound to the exact spec: its owner signs the spec's hash; each site's steward approves it.

The spec is whatever the caller serializes (the orchestrator passes ``StudySpec.model_dump(mode="json")``;
governance does not import the protocol package). Its hash is the sha256 of its canonical JSON, so any change
to any parameter is a different hash, and the site refuses it until the steward approves the new one.

A study is identified across spec versions by its ``name`` (or ``study_id`` when the spec has no name):
that is how a refusal can say "changed after approval" rather than just "not approved".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from fedhealth.core import ConflictError, CryptoError, InputError, NotFoundError, canonical_json, sha256_hex
from fedhealth.crypto import IdentityKey, PublicIdentity
from fedhealth.governance._audit import AuditEventType, AuditLog, state_and_log
from fedhealth.governance._decision import Decision, Rule
from fedhealth.governance._tables import owner_keys, study_specs

_SPEC_SIGNING_PURPOSE = "fedhealth.study-spec.v1"
_HEX = frozenset("0123456789abcdef")


def spec_hash(spec: Mapping[str, Any]) -> str:
    """sha256 hex of the spec's canonical JSON (sorted keys, no whitespace, UTF-8)."""
    if not isinstance(spec, Mapping):
        raise InputError("a study spec is a mapping")
    try:
        return sha256_hex(canonical_json(dict(spec)))
    except (TypeError, ValueError) as exc:
        raise InputError(f"a study spec must be JSON data: {exc}") from exc


def study_name(spec: Mapping[str, Any]) -> str:
    """What identifies a study across versions of its spec: ``name``, else ``study_id``."""
    name = spec.get("name", spec.get("study_id"))
    if not isinstance(name, str) or not name:
        raise InputError("a study spec needs a 'name' (or 'study_id') string")
    return name


def _check_hash(value: str) -> str:
    if len(value) != 64 or not set(value) <= _HEX:
        raise InputError(f"{value!r} is not a spec hash (64 lowercase hex characters)")
    return value


# the owner names a study spec can carry (fedhealth.protocol's Name; governance does not import protocol)
_OWNER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_FIRST_USE = "first use"


class _AlreadyPinned(Exception):
    """A first-use pin found a key pinned since the caller looked (the transaction is rolled back)."""


def _signing_message(owner: str, digest: str) -> bytes:
    return canonical_json({"purpose": _SPEC_SIGNING_PURPOSE, "owner": owner, "spec_hash": digest})


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedSpec:
    """A study spec signed by its owner's identity key."""

    spec: Mapping[str, Any]
    owner: str
    signature: bytes
    owner_key: PublicIdentity

    @classmethod
    def sign(cls, spec: Mapping[str, Any], *, owner: str, key: IdentityKey) -> SignedSpec:
        clean: dict[str, Any] = json.loads(canonical_json(dict(spec)))
        return cls(
            spec=clean,
            owner=owner,
            signature=key.sign(_signing_message(owner, spec_hash(clean))),
            owner_key=key.public(),
        )

    @property
    def spec_hash(self) -> str:
        return spec_hash(self.spec)

    def verify(self, trusted_owner_keys: Mapping[str, PublicIdentity] | None = None) -> None:
        """Raise :class:`CryptoError` unless the owner's key signed this spec's hash.

        With ``trusted_owner_keys`` (owner name → key), the key must also be the one trusted for that owner;
        without, the check proves integrity under the enclosed key only. A spec whose own ``owner`` field
        names someone else is refused too.
        """
        claimed = self.spec.get("owner")
        if claimed is not None and claimed != self.owner:
            raise CryptoError(f"the spec names owner {claimed!r} but was signed as {self.owner!r}")
        if trusted_owner_keys is not None and trusted_owner_keys.get(self.owner) != self.owner_key:
            raise CryptoError(f"the key that signed this spec is not trusted for owner {self.owner!r}")
        self.owner_key.verify(self.signature, _signing_message(self.owner, self.spec_hash))

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": dict(self.spec),
            "owner": self.owner,
            "signature": self.signature.hex(),
            "owner_key": self.owner_key.raw.hex(),
        }

    @classmethod
    def from_json(cls, value: Any) -> SignedSpec:
        if not isinstance(value, Mapping) or set(value) != {"spec", "owner", "signature", "owner_key"}:
            raise InputError("a signed spec is {spec, owner, signature, owner_key}")
        spec, owner, signature, owner_key = (value[k] for k in ("spec", "owner", "signature", "owner_key"))
        if not isinstance(spec, Mapping) or not isinstance(owner, str):
            raise InputError("a signed spec's spec is an object and its owner a string")
        try:
            return cls(
                spec=dict(spec),
                owner=owner,
                signature=bytes.fromhex(signature),
                owner_key=PublicIdentity(bytes.fromhex(owner_key)),
            )
        except (TypeError, ValueError) as exc:
            raise InputError("a signed spec's signature and owner_key are hex strings") from exc


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyApproval:
    """What the site knows about one spec hash: the spec, and the steward's current decision on it."""

    spec_hash: str
    study: str
    owner: str | None
    spec: Mapping[str, Any]
    status: ApprovalStatus
    submitted_at: datetime
    decided_at: datetime | None = None
    decided_by: str | None = None
    reason: str | None = None
    signed: bool = False
    owner_key_fingerprint: str | None = None  # sha256 of the key that signed it (signed specs)


class ApprovalRegistry:
    """A site's register of submitted specs and its steward's approvals, each action in the site's audit log.

    Flow: the agent :meth:`submit` s each spec it receives (the steward sees it pending); the steward
    :meth:`approve` s or :meth:`reject` s it by hash with a reason; at task time :meth:`check` returns the
    decision for the spec the task claims. Only the latest decision on a hash counts (an approval can be
    revoked by a rejection, and the other way round); the history is the audit log.
    """

    def __init__(self, engine: Engine, audit_log: AuditLog) -> None:
        self._engine = engine
        self._log = audit_log

    def submit(
        self,
        spec: Mapping[str, Any] | SignedSpec,
        *,
        trusted_owner_keys: Mapping[str, PublicIdentity] | None = None,
    ) -> StudyApproval:
        """Register a spec for the steward's review (idempotent). A :class:`SignedSpec` is verified first."""
        signed = spec if isinstance(spec, SignedSpec) else None
        if signed is not None:
            signed.verify(trusted_owner_keys)
            self._check_owner_key(signed)
        body: Mapping[str, Any] = signed.spec if signed is not None else spec  # type: ignore[assignment]
        digest = spec_hash(body)
        name = study_name(body)
        owner = signed.owner if signed is not None else body.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise InputError("a study spec's owner is a string")
        existing = self._get(digest)
        if existing is not None:
            return existing
        now = self._log.clock.now()
        try:
            with state_and_log(self._engine, self._log) as (conn, log_conn):
                conn.execute(
                    insert(study_specs).values(
                        spec_hash=digest,
                        study=name,
                        owner=owner,
                        spec=canonical_json(dict(body)).decode(),
                        signature=signed.signature.hex() if signed is not None else None,
                        owner_key=signed.owner_key.raw.hex() if signed is not None else None,
                        status=ApprovalStatus.PENDING.value,
                        submitted_at=now,
                    )
                )
                payload: dict[str, Any] = {
                    "spec_hash": digest,
                    "study": name,
                    "owner": owner,
                    "signed": signed is not None,
                }
                self._log.append(AuditEventType.STUDY_SUBMITTED, payload, connection=log_conn)
        except IntegrityError:  # submitted concurrently by another process: same content by construction
            pass
        return self.get(digest)

    def owner_key(self, owner: str) -> PublicIdentity | None:
        """The key this site trusts for ``owner``'s specs, if it pinned one."""
        with self._engine.connect() as conn:
            raw = conn.execute(
                select(owner_keys.c.public_key).where(owner_keys.c.owner == owner)
            ).scalar_one_or_none()
        return PublicIdentity(bytes.fromhex(raw)) if raw is not None else None

    def trust_key(self, owner: str, key: PublicIdentity, *, steward: str, reason: str) -> None:
        """The steward pins ``key`` for ``owner`` (before the owner's first spec, or after the owner's key
        changed: a spec signed by any other key is refused); logged with the reason."""
        if not reason.strip():
            raise InputError("pinning an owner's key needs a reason")
        if not steward.strip():
            raise InputError("pinning an owner's key needs the steward's name")
        if not _OWNER_NAME.fullmatch(owner):
            # "Alice" or "alice " would pin a name no spec carries: the real owner's specs would still be
            # pinned on first use to whatever key arrives, while the steward believes the key is pinned
            raise InputError(
                f"owner {owner!r} is not an owner name a study spec can carry (lowercase letters, digits, "
                "'.', '_' and '-', starting with a letter or digit, at most 63): give the owner's user name"
            )
        self._pin(owner, key, by=f"steward:{steward}", reason=reason.strip())

    def _check_owner_key(self, signed: SignedSpec) -> None:
        pinned = self.owner_key(signed.owner)
        if pinned is None:
            try:
                self._pin(signed.owner, signed.owner_key, by=_FIRST_USE, reason=None)
            except (IntegrityError, _AlreadyPinned):  # pinned concurrently (the steward, another process)
                pinned = self.owner_key(signed.owner)
        if pinned is not None and pinned != signed.owner_key:
            raise CryptoError(
                f"the spec is signed by key {signed.owner_key.fingerprint[:16]}, but this site trusts key "
                f"{pinned.fingerprint[:16]} for owner {signed.owner!r} (if the owner's key changed, the "
                f"data steward trusts the new one: fedhealth site approvals trust-key {signed.owner} KEY)"
            )

    def _pin(self, owner: str, key: PublicIdentity, *, by: str, reason: str | None) -> None:
        now = self._log.clock.now()
        with state_and_log(self._engine, self._log) as (conn, log_conn):
            previous = conn.execute(
                select(owner_keys.c.public_key).where(owner_keys.c.owner == owner)
            ).scalar_one_or_none()
            if previous is not None and by == _FIRST_USE:
                raise _AlreadyPinned  # first use pins only where nothing is: it never replaces a key
            if previous is None:
                conn.execute(
                    insert(owner_keys).values(
                        owner=owner, public_key=key.raw.hex(), pinned_at=now, pinned_by=by
                    )
                )
            else:
                conn.execute(
                    update(owner_keys)
                    .where(owner_keys.c.owner == owner)
                    .values(public_key=key.raw.hex(), pinned_at=now, pinned_by=by)
                )
            payload: dict[str, Any] = {"owner": owner, "fingerprint": key.fingerprint, "by": by}
            if previous is not None:
                payload["previous_fingerprint"] = PublicIdentity(bytes.fromhex(previous)).fingerprint
            if reason is not None:
                payload["reason"] = reason
            self._log.append(AuditEventType.OWNER_KEY_PINNED, payload, connection=log_conn)

    def approve(self, spec_hash: str, *, reason: str, steward: str) -> StudyApproval:
        """The steward approves this exact spec hash; logged with the reason."""
        return self._decide(spec_hash, ApprovalStatus.APPROVED, reason=reason, steward=steward)

    def reject(self, spec_hash: str, *, reason: str, steward: str) -> StudyApproval:
        """The steward rejects (or revokes approval of) this exact spec hash; logged with the reason."""
        return self._decide(spec_hash, ApprovalStatus.REJECTED, reason=reason, steward=steward)

    def _decide(self, digest: str, status: ApprovalStatus, *, reason: str, steward: str) -> StudyApproval:
        _check_hash(digest)
        if not reason.strip():
            raise InputError("a steward's decision needs a reason")
        if not steward.strip():
            raise InputError("a steward's decision needs the steward's name")
        current = self.get(digest)
        now = self._log.clock.now()
        event = (
            AuditEventType.STUDY_APPROVED
            if status is ApprovalStatus.APPROVED
            else AuditEventType.STUDY_REJECTED
        )
        with state_and_log(self._engine, self._log) as (conn, log_conn):
            self._log.append(
                event,
                {
                    "spec_hash": digest,
                    "study": current.study,
                    "reason": reason.strip(),
                    "steward": steward,
                    "previous_status": current.status.value,
                },
                actor=f"steward:{steward}",
                connection=log_conn,
            )
            conn.execute(
                update(study_specs)
                .where(study_specs.c.spec_hash == digest)
                .values(status=status.value, decided_at=now, decided_by=steward, reason=reason.strip())
            )
        return self.get(digest)

    def check(self, spec: Mapping[str, Any]) -> Decision:
        """May a task of this spec run here? Allowed only if the steward approved exactly this spec's hash."""
        digest = spec_hash(spec)
        short = digest[:12]
        record = self._get(digest)
        if record is not None and record.status is ApprovalStatus.APPROVED:
            return Decision.allow(
                Rule.STUDY_APPROVAL, f"spec {short} approved by {record.decided_by}: {record.reason}"
            )
        if record is not None and record.status is ApprovalStatus.REJECTED:
            return Decision.refuse(
                Rule.STUDY_APPROVAL, f"spec {short} was rejected by the data steward: {record.reason}"
            )
        name = study_name(spec)
        approved = [a for a in self.list(study=name) if a.status is ApprovalStatus.APPROVED]
        if approved:
            others = ", ".join(a.spec_hash[:12] for a in approved)
            return Decision.refuse(
                Rule.STUDY_APPROVAL,
                f"study {name!r} changed after approval: spec {short} is not the approved spec {others}",
            )
        if record is not None:
            return Decision.refuse(
                Rule.STUDY_APPROVAL, f"spec {short} of study {name!r} is not approved yet (pending review)"
            )
        return Decision.refuse(
            Rule.STUDY_APPROVAL, f"spec {short} of study {name!r} is not approved at this site"
        )

    def get(self, spec_hash: str) -> StudyApproval:
        found = self._get(_check_hash(spec_hash))
        if found is None:
            raise NotFoundError(f"no study spec with hash {spec_hash} was submitted to this site")
        return found

    def resolve(self, prefix: str) -> str:
        """The one submitted spec hash starting with ``prefix`` (at least 8 characters)."""
        prefix = prefix.strip().lower()
        if len(prefix) < 8 or not set(prefix) <= _HEX:
            raise InputError("give at least 8 hex characters of the spec hash")
        with self._engine.connect() as conn:
            matches = list(
                conn.execute(
                    select(study_specs.c.spec_hash).where(study_specs.c.spec_hash.startswith(prefix))
                ).scalars()
            )
        if not matches:
            raise NotFoundError(f"no submitted study spec has a hash starting with {prefix}")
        if len(matches) > 1:
            raise ConflictError(f"{len(matches)} spec hashes start with {prefix}; give more characters")
        return str(matches[0])

    def list(self, *, study: str | None = None, status: ApprovalStatus | None = None) -> list[StudyApproval]:
        return list_study_approvals(self._engine, study=study, status=status)

    def _get(self, digest: str) -> StudyApproval | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(study_specs).where(study_specs.c.spec_hash == digest)).first()
        return _from_row(row) if row is not None else None


def list_study_approvals(
    engine: Engine, *, study: str | None = None, status: ApprovalStatus | None = None
) -> list[StudyApproval]:
    """The submitted specs, oldest first (reading needs no signing key)."""
    query = select(study_specs).order_by(study_specs.c.submitted_at, study_specs.c.spec_hash)
    if study is not None:
        query = query.where(study_specs.c.study == study)
    if status is not None:
        query = query.where(study_specs.c.status == status.value)
    with engine.connect() as conn:
        return [_from_row(row) for row in conn.execute(query)]


def _from_row(row: Any) -> StudyApproval:
    return StudyApproval(
        spec_hash=row.spec_hash,
        study=row.study,
        owner=row.owner,
        spec=json.loads(row.spec),
        status=ApprovalStatus(row.status),
        submitted_at=row.submitted_at,
        decided_at=row.decided_at,
        decided_by=row.decided_by,
        reason=row.reason,
        signed=row.signature is not None,
        owner_key_fingerprint=(
            PublicIdentity(bytes.fromhex(row.owner_key)).fingerprint if row.owner_key is not None else None
        ),
    )
