"""The governance tables, all on one :data:`GOVERNANCE_METADATA`.

The orchestrator's Alembic migrations and a site's SQLite file create the same tables from this metadata
(``create_governance_tables(engine)`` for the latter). Every table name starts with ``gov_``. Columns are
portable between SQLite and PostgreSQL: hashes, signatures and the audit entries' hashed fields are stored as
text exactly as they were hashed, so what the verifier reads back is byte-for-byte what was signed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Engine,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

GOVERNANCE_METADATA = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite has no time zones: it stores naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("governance stores timezone-aware datetimes only")
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


HASH = 64  # hex sha256
NAME = 200

audit_entries = Table(
    "gov_audit_entries",
    GOVERNANCE_METADATA,
    Column("log_id", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("time", String(40), nullable=False),
    Column("actor", String(NAME), nullable=False),
    Column("type", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("prev_hash", String(HASH), nullable=False),
    Column("entry_hash", String(HASH), nullable=False),
    Column("signature", String(256), nullable=False),
    Column("signer", String(HASH), nullable=False),
    # one entry per (log, seq): two writers can never both append seq n, so the chain cannot fork
    PrimaryKeyConstraint("log_id", "seq"),
)

audit_keys = Table(
    "gov_audit_keys",
    GOVERNANCE_METADATA,
    Column("fingerprint", String(HASH), primary_key=True),
    Column("public_key", String(HASH), nullable=False),
    Column("added_at", UTCDateTime, nullable=False),
)

study_specs = Table(
    "gov_study_specs",
    GOVERNANCE_METADATA,
    Column("spec_hash", String(HASH), primary_key=True),
    Column("study", String(NAME), nullable=False, index=True),
    Column("owner", String(NAME), nullable=True),
    Column("spec", Text, nullable=False),
    Column("signature", String(256), nullable=True),
    Column("owner_key", String(HASH), nullable=True),
    Column("status", String(16), nullable=False),
    Column("submitted_at", UTCDateTime, nullable=False),
    Column("decided_at", UTCDateTime, nullable=True),
    Column("decided_by", String(NAME), nullable=True),
    Column("reason", Text, nullable=True),
)

# The key each study owner signs specs with, as this site trusts it: pinned on first use (the first signed
# spec of that owner) or by the steward (`fedhealth site approvals trust-key`). A spec signed by another key
# is refused, so an orchestrator cannot re-sign a spec under an owner's name with a key of its own.
owner_keys = Table(
    "gov_owner_keys",
    GOVERNANCE_METADATA,
    Column("owner", String(NAME), primary_key=True),
    Column("public_key", String(HASH), nullable=False),
    Column("pinned_at", UTCDateTime, nullable=False),
    Column("pinned_by", String(NAME), nullable=False),
)

consent_records = Table(
    "gov_consent_records",
    GOVERNANCE_METADATA,
    Column("record_id", String(HASH), primary_key=True),
    Column("patient_id", String(NAME), nullable=False, index=True),
    Column("purpose", String(NAME), nullable=False, index=True),
    Column("decision", String(8), nullable=False),
    Column("valid_from", UTCDateTime, nullable=True),
    Column("valid_until", UTCDateTime, nullable=True),
    Column("withdrawn_at", UTCDateTime, nullable=True),
    Column("source", String(400), nullable=False),
    Column("imported_at", UTCDateTime, nullable=False),
)

consent_snapshots = Table(
    "gov_consent_snapshots",
    GOVERNANCE_METADATA,
    Column("snapshot_hash", String(HASH), primary_key=True),
    Column("purpose", String(NAME), nullable=False),
    Column("on_date", String(10), nullable=False),
    Column("n_patients", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

consent_snapshot_members = Table(
    "gov_consent_snapshot_members",
    GOVERNANCE_METADATA,
    Column("snapshot_hash", String(HASH), nullable=False),
    Column("patient_id", String(NAME), nullable=False),
    PrimaryKeyConstraint("snapshot_hash", "patient_id"),
    Index("ix_gov_consent_snapshot_members_patient", "patient_id"),
)

model_versions = Table(
    "gov_model_versions",
    GOVERNANCE_METADATA,
    Column("model_digest", String(HASH), primary_key=True),
    Column("parent_digest", String(HASH), nullable=True, index=True),
    Column("study_id", String(NAME), nullable=False, index=True),
    Column("round", Integer, nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

model_snapshots = Table(
    "gov_model_snapshots",
    GOVERNANCE_METADATA,
    Column("model_digest", String(HASH), nullable=False),
    Column("site", String(NAME), nullable=False),
    Column("snapshot_hash", String(HASH), nullable=False),
    PrimaryKeyConstraint("model_digest", "site"),
    Index("ix_gov_model_snapshots_snapshot", "snapshot_hash"),
)

model_metrics = Table(
    "gov_model_metrics",
    GOVERNANCE_METADATA,
    Column("model_digest", String(HASH), nullable=False),
    Column("site", String(NAME), nullable=False),
    Column("metrics", Text, nullable=False),
    PrimaryKeyConstraint("model_digest", "site"),
)

model_flags = Table(
    "gov_model_flags",
    GOVERNANCE_METADATA,
    Column("model_digest", String(HASH), nullable=False),
    Column("notice_id", String(NAME), nullable=False),
    Column("site", String(NAME), nullable=False),
    Column("reason", String(32), nullable=False),
    Column("snapshot_hash", String(HASH), nullable=True),
    Column("via_digest", String(HASH), nullable=True),
    Column("flagged_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("model_digest", "notice_id"),
)


def create_governance_tables(engine: Engine) -> None:
    """Create every governance table that does not exist yet (a site's SQLite file; tests)."""
    GOVERNANCE_METADATA.create_all(engine)
