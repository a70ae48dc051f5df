"""study approvals, site versions and readiness

A study now waits in ``awaiting_approval`` until every site it names reported its steward's approval of the
spec hash: ``studies`` gains the hash (backfilled from each stored spec) and the approval deadline, its status
column widens to 32 characters, and
``site_approvals`` holds each site's latest decision per hash. ``sites`` gains the versions its agent stated
at login and its last readiness report (``fedhealth site check``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 03:00:00.000000
"""

import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _spec_hash(spec_json: str) -> str:
    # fedhealth.governance.spec_hash of the spec as stored (model_dump_json): sha256 of its canonical JSON
    canonical = json.dumps(
        json.loads(spec_json), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        # "awaiting_approval" does not fit the 16 characters of 0001 (PostgreSQL enforces the length)
        batch_op.alter_column(
            "status", existing_type=sa.String(length=16), type_=sa.String(length=32), existing_nullable=False
        )
        batch_op.add_column(sa.Column("spec_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("approval_deadline_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_studies_spec_hash", ["spec_hash"], unique=False)
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.add_column(sa.Column("software_version", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("protocol_version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("readiness_json", sa.Text(), nullable=True))
    op.create_table(
        "site_approvals",
        sa.Column("site", sa.String(length=63), nullable=False),
        sa.Column("spec_hash", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["site"], ["sites.name"], name=op.f("fk_site_approvals_site_sites")),
        sa.PrimaryKeyConstraint("site", "spec_hash", name=op.f("pk_site_approvals")),
    )
    studies = sa.table("studies", sa.column("id", sa.String), sa.column("spec_json", sa.Text))
    conn = op.get_bind()
    for study_id, spec_json in conn.execute(sa.select(studies.c.id, studies.c.spec_json)).all():
        conn.execute(
            sa.text("UPDATE studies SET spec_hash = :h WHERE id = :i"),
            {"h": _spec_hash(spec_json), "i": study_id},
        )


def downgrade() -> None:
    op.drop_table("site_approvals")
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.drop_column("readiness_json")
        batch_op.drop_column("protocol_version")
        batch_op.drop_column("software_version")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_spec_hash")
        batch_op.drop_column("approval_deadline_at")
        batch_op.drop_column("spec_hash")
        batch_op.alter_column(
            "status", existing_type=sa.String(length=32), type_=sa.String(length=16), existing_nullable=False
        )
