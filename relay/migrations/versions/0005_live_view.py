"""The live view (issue 15): each site's gateway online flag, the operator's Timeline
counters, the index of an operator's newest commands, and admin keys (no operator).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sites", sa.Column("online", sa.Boolean(), nullable=True))
    op.add_column("operators", sa.Column("timeline_sent", sa.BigInteger(), nullable=False,
                                         server_default="0"))
    op.add_column("operators", sa.Column("timeline_throttled", sa.BigInteger(),
                                         nullable=False, server_default="0"))
    op.create_index("ix_commands_operator_created", "commands", ["operator_id", "created_at"])
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("operator_id", existing_type=sa.String(length=64), nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.alter_column("operator_id", existing_type=sa.String(length=64), nullable=False)
    op.drop_index("ix_commands_operator_created", table_name="commands")
    with op.batch_alter_table("operators") as batch:
        batch.drop_column("timeline_throttled")
        batch.drop_column("timeline_sent")
    with op.batch_alter_table("sites") as batch:
        batch.drop_column("online")
