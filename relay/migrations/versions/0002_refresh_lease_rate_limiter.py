"""The token refresh lease on ``operators`` and the shared rate limiter's log
(``stora_sends``), issue 14 (relay/tokens.py, relay/ratelimit.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("stora_sends",
    sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
    sa.Column("operator_id", sa.String(length=64), nullable=False),
    sa.Column("sent_at", sa.Float(), nullable=False),
    sa.Column("purpose", sa.String(length=40), nullable=False),
    sa.ForeignKeyConstraint(["operator_id"], ["operators.id"], ),
    sa.PrimaryKeyConstraint("seq")
    )
    with op.batch_alter_table("stora_sends", schema=None) as batch_op:
        batch_op.create_index("ix_stora_sends_operator_sent", ["operator_id", "sent_at"],
                              unique=False)

    with op.batch_alter_table("operators", schema=None) as batch_op:
        batch_op.add_column(sa.Column("refresh_lease_until", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("refresh_lease_owner", sa.String(length=32),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("operators", schema=None) as batch_op:
        batch_op.drop_column("refresh_lease_owner")
        batch_op.drop_column("refresh_lease_until")

    with op.batch_alter_table("stora_sends", schema=None) as batch_op:
        batch_op.drop_index("ix_stora_sends_operator_sent")

    op.drop_table("stora_sends")
