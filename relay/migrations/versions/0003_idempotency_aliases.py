"""Idempotency aliases: an unlock's Idempotency-Key answered with the pending unlock of
a double tap, so that its retries get that command again (issue 14 review).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('idempotency_aliases',
    sa.Column('api_key_id', sa.String(length=32), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('jti', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['jti'], ['commands.jti'], ),
    sa.PrimaryKeyConstraint('api_key_id', 'idempotency_key')
    )


def downgrade() -> None:
    op.drop_table('idempotency_aliases')
