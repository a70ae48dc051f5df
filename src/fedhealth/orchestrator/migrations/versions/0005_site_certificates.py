"""site certificates: the fingerprint of the TLS client certificate issued to each site at enrollment

Under mutual TLS a request must present exactly the certificate issued at the site's latest enrollment, so
that rotating a site's key (``fedhealth site rotate``) retires its certificate at once. Sites enrolled before
this revision have none recorded and must be rotated to use mutual TLS.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cert_fingerprint", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.drop_column("cert_fingerprint")
