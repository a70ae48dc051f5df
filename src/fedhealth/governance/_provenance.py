"""Provenance of model versions at the orchestrator: what each version was trained from; consent flags.

Each version records its parent, round, the sites that contributed, each site's dataset fingerprint and
consent snapshot hash, the study spec hash, the software version, the DP parameters and the epsilon each
site has spent on the study so far. When a site reports a withdrawal (a :class:`WithdrawalNotice`: snapshot
hashes, no patient id), :meth:`ProvenanceStore.flag_withdrawal` flags every version trained on one of those
snapshots at that site, and every version derived from a flagged one (its parameters carry the withdrawn
patient's contribution through the parent).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.exc import IntegrityError

from fedhealth.core import (
    Clock,
    ConflictError,
    InputError,
    NotFoundError,
    SystemClock,
    canonical_json,
)
from fedhealth.governance._audit import AuditEventType, AuditLog, state_and_log
from fedhealth.governance._consent import ConsentModel
from fedhealth.governance._tables import model_flags, model_metrics, model_snapshots, model_versions
from fedhealth.governance._timefmt import format_instant, parse_instant, require_aware

_HEX = frozenset("0123456789abcdef")
CONSENT_MODELS = frozenset(m.value for m in ConsentModel)


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelProvenance:
    """Where one model version came from.

    ``dataset_fingerprints`` and ``consent_snapshots`` are keyed by the sites whose updates were aggregated
    into this version (``n_sites`` of them): the keyed commitments each site attested (see
    ``governance._commitments``), never bare hashes of its data. ``epsilon_spent`` is, per site, the
    cumulative record-level epsilon of this study at that site up to and including this version, as the
    site's accountant reports it (composition is not a sum, so it is recorded, not added up), and it holds
    at ``dp_params["epsilon_delta"]`` (else ``dp_params["delta"]``): whoever records it states it at that
    delta. ``dp_params`` holds the rest (mode, delta, clipping, noise, ``level`` of ``epsilon_spent``, a
    site-level figure in site modes).
    """

    model_digest: str
    parent_digest: str | None
    study_id: str
    round: int
    n_sites: int
    dataset_fingerprints: Mapping[str, str]
    consent_snapshots: Mapping[str, str]
    spec_hash: str
    software_version: str
    dp_params: Mapping[str, Any] = field(default_factory=dict)
    epsilon_spent: Mapping[str, float] = field(default_factory=dict)
    # the consent model each site stated it applied (``opt-in``, ``opt-out``); a site that stated none is not
    # named (an agent of an older release)
    consent_models: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime

    def __post_init__(self) -> None:
        if not _is_hash(self.model_digest):
            raise InputError("model_digest must be a sha256 hex digest")
        if self.parent_digest is not None and (
            not _is_hash(self.parent_digest) or self.parent_digest == self.model_digest
        ):
            raise InputError("parent_digest must be another model's sha256 hex digest")
        if not _is_hash(self.spec_hash):
            raise InputError("spec_hash must be a sha256 hex digest")
        if not self.study_id or not self.software_version:
            raise InputError("study_id and software_version are required")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise InputError("round must be an integer >= 0")
        sites = set(self.dataset_fingerprints)
        if self.n_sites != len(sites):
            raise InputError(f"n_sites={self.n_sites} but {len(sites)} sites have dataset fingerprints")
        if set(self.consent_snapshots) != sites:
            raise InputError(
                "every contributing site needs exactly one consent snapshot hash, and only those"
            )
        if not all(_is_hash(h) for h in self.consent_snapshots.values()):
            raise InputError("consent snapshot hashes must be sha256 hex digests")
        if not all(isinstance(f, str) and f for f in self.dataset_fingerprints.values()):
            raise InputError("dataset fingerprints must be non-empty strings")
        if not set(self.consent_models) <= sites:
            raise InputError("consent_models names a site that did not contribute")
        if not all(m in CONSENT_MODELS for m in self.consent_models.values()):
            raise InputError(f"a site's consent model must be one of {sorted(CONSENT_MODELS)}")
        if not set(self.epsilon_spent) <= sites:
            raise InputError("epsilon_spent names a site that did not contribute")
        for site, eps in self.epsilon_spent.items():
            if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps < 0:
                raise InputError(f"epsilon spent at {site!r} must be a finite number >= 0")
        try:
            canonical_json(dict(self.dp_params))
            object.__setattr__(self, "created_at", require_aware(self.created_at, "created_at"))
        except (TypeError, ValueError) as exc:
            raise InputError(f"provenance is not storable: {exc}") from exc

    @property
    def sites(self) -> list[str]:
        return sorted(self.dataset_fingerprints)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_digest": self.model_digest,
            "parent_digest": self.parent_digest,
            "study_id": self.study_id,
            "round": self.round,
            "n_sites": self.n_sites,
            "dataset_fingerprints": dict(sorted(self.dataset_fingerprints.items())),
            "consent_snapshots": dict(sorted(self.consent_snapshots.items())),
            "spec_hash": self.spec_hash,
            "software_version": self.software_version,
            "dp_params": dict(self.dp_params),
            "epsilon_spent": {k: float(v) for k, v in sorted(self.epsilon_spent.items())},
            "created_at": format_instant(self.created_at),
        }
        if self.consent_models:  # absent when none was stated: a record made before the field reads the same
            out["consent_models"] = dict(sorted(self.consent_models.items()))
        return out

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> ModelProvenance:
        try:
            return cls(**{**value, "created_at": parse_instant(value["created_at"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not a model provenance record: {exc}") from exc


class FlagReason(StrEnum):
    TRAINED_ON_WITHDRAWN = "trained_on_withdrawn_consent"  # a snapshot it was trained on included the patient
    DERIVED_FROM_FLAGGED = "derived_from_flagged_model"  # an ancestor was trained on such a snapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class WithdrawalFlag:
    """A model version affected by a consent withdrawal reported in notice ``notice_id`` by ``site``."""

    model_digest: str
    notice_id: str
    site: str
    reason: FlagReason
    snapshot_hash: str | None  # for TRAINED_ON_WITHDRAWN: the snapshot that included the patient
    via_digest: str | None  # for DERIVED_FROM_FLAGGED: the directly affected ancestor
    flagged_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "model_digest": self.model_digest,
            "notice_id": self.notice_id,
            "site": self.site,
            "reason": self.reason.value,
            "snapshot_hash": self.snapshot_hash,
            "via_digest": self.via_digest,
            "flagged_at": format_instant(self.flagged_at),
        }


@contextmanager
def _plain_transaction(engine: Engine) -> Iterator[tuple[Connection, None]]:
    with engine.begin() as conn:
        yield conn, None


class ProvenanceStore:
    """Model-version provenance in the orchestrator's database: lineage, metrics and consent flags."""

    def __init__(
        self, engine: Engine, *, audit_log: AuditLog | None = None, clock: Clock | None = None
    ) -> None:
        self._engine = engine
        self._log = audit_log
        self._clock: Clock = clock or (audit_log.clock if audit_log is not None else SystemClock())

    def record(self, provenance: ModelProvenance) -> None:
        """Store a version's provenance. Its parent must be recorded first. Recording the same twice is a
        no-op; a different provenance for a known digest is a :class:`ConflictError`."""
        body = canonical_json(provenance.to_json()).decode()
        known = self._body(provenance.model_digest)
        if known is not None:
            if known != body:
                raise ConflictError(
                    f"model {provenance.model_digest[:16]} already has a different provenance"
                )
            return
        if provenance.parent_digest is not None and self._body(provenance.parent_digest) is None:
            raise NotFoundError(f"parent model {provenance.parent_digest[:16]} has no provenance recorded")
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(model_versions).values(
                        model_digest=provenance.model_digest,
                        parent_digest=provenance.parent_digest,
                        study_id=provenance.study_id,
                        round=provenance.round,
                        body=body,
                        created_at=provenance.created_at,
                    )
                )
                rows = [
                    {"model_digest": provenance.model_digest, "site": site, "snapshot_hash": snapshot}
                    for site, snapshot in sorted(provenance.consent_snapshots.items())
                ]
                if rows:
                    conn.execute(insert(model_snapshots), rows)
        except IntegrityError as exc:
            if self._body(provenance.model_digest) != body:
                raise ConflictError(
                    f"model {provenance.model_digest[:16]} was recorded concurrently"
                ) from exc

    def _body(self, digest: str) -> str | None:
        with self._engine.connect() as conn:
            value = conn.execute(
                select(model_versions.c.body).where(model_versions.c.model_digest == digest)
            ).scalar_one_or_none()
        return None if value is None else str(value)

    def get(self, digest: str) -> ModelProvenance:
        body = self._body(digest)
        if body is None:
            raise NotFoundError(f"no provenance recorded for model {digest[:16]}")
        return ModelProvenance.from_json(json.loads(body))

    def resolve(self, prefix: str) -> str:
        """The one recorded model digest starting with ``prefix`` (at least 8 hex characters)."""
        prefix = prefix.strip().lower()
        if len(prefix) < 8 or not set(prefix) <= _HEX:
            raise InputError("give at least 8 hex characters of the model digest")
        with self._engine.connect() as conn:
            found = list(
                conn.execute(
                    select(model_versions.c.model_digest).where(
                        model_versions.c.model_digest.startswith(prefix)
                    )
                ).scalars()
            )
        if not found:
            raise NotFoundError(f"no recorded model digest starts with {prefix}")
        if len(found) > 1:
            raise ConflictError(f"{len(found)} model digests start with {prefix}; give more characters")
        return str(found[0])

    def lineage(self, digest: str) -> list[ModelProvenance]:
        """The version and its ancestors, newest first, back to the root (a version without parent)."""
        chain: list[ModelProvenance] = []
        seen: set[str] = set()
        current: str | None = digest
        while current is not None:
            if current in seen:
                raise ConflictError(f"the lineage of {digest[:16]} has a cycle at {current[:16]}")
            seen.add(current)
            provenance = self.get(current)
            chain.append(provenance)
            current = provenance.parent_digest
        return chain

    def children(self, digests: Iterable[str]) -> dict[str, list[str]]:
        wanted = list(set(digests))
        out: dict[str, list[str]] = {d: [] for d in wanted}
        with self._engine.connect() as conn:
            for i in range(0, len(wanted), 500):
                rows = conn.execute(
                    select(model_versions.c.model_digest, model_versions.c.parent_digest).where(
                        model_versions.c.parent_digest.in_(wanted[i : i + 500])
                    )
                )
                for child, parent in rows:
                    out[parent].append(child)
        return {k: sorted(v) for k, v in out.items()}

    def record_metrics(self, digest: str, site: str, metrics: Mapping[str, float]) -> None:
        """Store (or replace) one site's evaluation metrics for a version."""
        self.get(digest)
        try:
            text = canonical_json({k: float(v) for k, v in metrics.items()}).decode()
        except (TypeError, ValueError) as exc:
            raise InputError(f"metrics must be finite numbers: {exc}") from exc
        with self._engine.begin() as conn:
            conn.execute(
                model_metrics.delete().where(
                    (model_metrics.c.model_digest == digest) & (model_metrics.c.site == site)
                )
            )
            conn.execute(insert(model_metrics).values(model_digest=digest, site=site, metrics=text))

    def metrics(self, digest: str) -> dict[str, dict[str, float]]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(model_metrics.c.site, model_metrics.c.metrics)
                .where(model_metrics.c.model_digest == digest)
                .order_by(model_metrics.c.site)
            )
            return {site: json.loads(text) for site, text in rows}

    def flag_withdrawal(
        self,
        snapshot_hashes: Iterable[str],
        *,
        site: str,
        notice_id: str,
        at: datetime | None = None,
    ) -> list[WithdrawalFlag]:
        """Flag the versions trained on any of ``snapshot_hashes`` at ``site``, and every version derived from
        them. Idempotent per notice. Returns this notice's flags, ordered by model digest."""
        hashes = sorted(set(snapshot_hashes))
        if not all(_is_hash(h) for h in hashes):
            raise InputError("snapshot hashes must be sha256 hex digests")
        if not site or not notice_id:
            raise InputError("a withdrawal flag needs the reporting site and the notice id")
        when = require_aware(at, "the flag time") if at is not None else self._clock.now()
        direct: dict[str, str] = {}
        with self._engine.connect() as conn:
            for i in range(0, len(hashes), 500):
                rows = conn.execute(
                    select(model_snapshots.c.model_digest, model_snapshots.c.snapshot_hash).where(
                        (model_snapshots.c.site == site)
                        & model_snapshots.c.snapshot_hash.in_(hashes[i : i + 500])
                    )
                )
                for digest, snapshot in rows:
                    direct[digest] = snapshot
        flags = {
            d: WithdrawalFlag(
                model_digest=d,
                notice_id=notice_id,
                site=site,
                reason=FlagReason.TRAINED_ON_WITHDRAWN,
                snapshot_hash=s,
                via_digest=None,
                flagged_at=when,
            )
            for d, s in direct.items()
        }
        # walk down from every directly affected version; the first (nearest) affected ancestor is the "via"
        frontier = {d: d for d in sorted(direct)}
        while frontier:
            kids = self.children(frontier)
            nxt: dict[str, str] = {}
            for parent, children in kids.items():
                for child in children:
                    if child not in flags and child not in nxt:
                        nxt[child] = frontier[parent]
            for child, via in nxt.items():
                flags[child] = WithdrawalFlag(
                    model_digest=child,
                    notice_id=notice_id,
                    site=site,
                    reason=FlagReason.DERIVED_FROM_FLAGGED,
                    snapshot_hash=None,
                    via_digest=via,
                    flagged_at=when,
                )
            frontier = nxt
        self._store_flags(sorted(flags.values(), key=lambda f: f.model_digest))
        return self.flags_of_notice(notice_id)

    def _store_flags(self, flags: list[WithdrawalFlag]) -> None:
        """Insert the flags this notice has not yet made, each with its audit entry, in one transaction."""
        writing = (
            state_and_log(self._engine, self._log)
            if self._log is not None
            else _plain_transaction(self._engine)
        )
        with writing as (conn, log_conn):
            for flag in flags:
                known = conn.execute(
                    select(model_flags.c.model_digest).where(
                        (model_flags.c.model_digest == flag.model_digest)
                        & (model_flags.c.notice_id == flag.notice_id)
                    )
                ).first()
                if known is not None:
                    continue  # this notice already flagged this version: re-delivery
                conn.execute(
                    insert(model_flags).values(
                        model_digest=flag.model_digest,
                        notice_id=flag.notice_id,
                        site=flag.site,
                        reason=flag.reason.value,
                        snapshot_hash=flag.snapshot_hash,
                        via_digest=flag.via_digest,
                        flagged_at=flag.flagged_at,
                    )
                )
                if self._log is not None:
                    self._log.append(AuditEventType.MODEL_FLAGGED, flag.to_json(), connection=log_conn)

    def flags(self, digest: str) -> list[WithdrawalFlag]:
        """The withdrawal flags on one version (empty: no reported withdrawal affects it)."""
        return self._flags(model_flags.c.model_digest == digest)

    def flags_of_notice(self, notice_id: str) -> list[WithdrawalFlag]:
        return self._flags(model_flags.c.notice_id == notice_id)

    def _flags(self, where: Any) -> list[WithdrawalFlag]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(model_flags).where(where).order_by(model_flags.c.model_digest, model_flags.c.notice_id)
            )
            return [
                WithdrawalFlag(
                    model_digest=row.model_digest,
                    notice_id=row.notice_id,
                    site=row.site,
                    reason=FlagReason(row.reason),
                    snapshot_hash=row.snapshot_hash,
                    via_digest=row.via_digest,
                    flagged_at=row.flagged_at,
                )
                for row in rows
            ]
