"""revoked tokens: operator tokens ended before their expiry (a dashboard sign-out)

A dashboard session is an operator token in a cookie; signing out must end it at once, not when it
expires, or a copy of the cookie keeps working for up to its lifetime. ``revoked_tokens`` holds the token
id (``jti``) of each ended token until the token would have expired anyway.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 23:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "revoked_tokens",
        sa.Column("token_id", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token_id", name=op.f("pk_revoked_tokens")),
    )
    op.create_index("ix_revoked_tokens_expires", "revoked_tokens", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_revoked_tokens_expires", table_name="revoked_tokens")
    op.drop_table("revoked_tokens")
