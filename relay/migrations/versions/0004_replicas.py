"""Replicas on one database (issue 15): a command's publish claim, and job leases with a
fencing counter.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("commands", sa.Column("publish_claimed_by", sa.String(length=32),
                                        nullable=True))
    op.add_column("commands", sa.Column("publish_claim_until", sa.Float(), nullable=True))
    op.create_table("job_leases",
                    sa.Column("name", sa.String(length=120), nullable=False),
                    sa.Column("owner", sa.String(length=32), nullable=True),
                    sa.Column("until", sa.Float(), nullable=False),
                    sa.Column("fence", sa.BigInteger(), nullable=False),
                    sa.PrimaryKeyConstraint("name"))


def downgrade() -> None:
    op.drop_table("job_leases")
    with op.batch_alter_table("commands") as batch:
        batch.drop_column("publish_claim_until")
        batch.drop_column("publish_claimed_by")
