"""The relay's first tables (issue 14): operators, sites, signing keys, API keys,
OAuth states, webhook dedupe, unit states and the command outbox.

Revision ID: 0001
Revises: (none)
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('oauth_states',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('verifier_enc', sa.Text(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.Column('used_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('digest')
    )
    op.create_table('operators',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('access_token_enc', sa.Text(), nullable=True),
    sa.Column('refresh_token_enc', sa.Text(), nullable=True),
    sa.Column('token_expires_at', sa.Float(), nullable=True),
    sa.Column('token_lifetime_s', sa.Float(), nullable=True),
    sa.Column('scopes', sa.Text(), nullable=False),
    sa.Column('last_refresh_at', sa.Float(), nullable=True),
    sa.Column('refreshes', sa.Integer(), nullable=False),
    sa.Column('webhook_key', sa.String(length=64), nullable=False),
    sa.Column('webhook_endpoint_id', sa.String(length=64), nullable=True),
    sa.Column('webhook_secret_enc', sa.Text(), nullable=True),
    sa.Column('last_webhook_at', sa.Float(), nullable=True),
    sa.Column('reconciled_at', sa.Float(), nullable=True),
    sa.Column('connected_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('webhook_key')
    )
    op.create_table('signing_keys',
    sa.Column('kid', sa.String(length=64), nullable=False),
    sa.Column('private_key_enc', sa.Text(), nullable=False),
    sa.Column('public_key', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('retired_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('kid')
    )
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('operator_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=10), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('revoked_at', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['operator_id'], ['operators.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_operator_id'), ['operator_id'], unique=False)

    op.create_table('commands',
    sa.Column('jti', sa.String(length=64), nullable=False),
    sa.Column('operator_id', sa.String(length=64), nullable=False),
    sa.Column('site_id', sa.String(length=64), nullable=False),
    sa.Column('unit_id', sa.String(length=64), nullable=False),
    sa.Column('cmd', sa.String(length=20), nullable=False),
    sa.Column('ver', sa.BigInteger(), nullable=True),
    sa.Column('token', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('reason', sa.String(length=40), nullable=True),
    sa.Column('duplicate', sa.Boolean(), nullable=False),
    sa.Column('state_json', sa.Text(), nullable=True),
    sa.Column('origin', sa.String(length=20), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=True),
    sa.Column('api_key_id', sa.String(length=32), nullable=True),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.Column('published_at', sa.Float(), nullable=True),
    sa.Column('result_at', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['operator_id'], ['operators.id'], ),
    sa.PrimaryKeyConstraint('jti'),
    sa.UniqueConstraint('api_key_id', 'idempotency_key')
    )
    with op.batch_alter_table('commands', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_commands_operator_id'), ['operator_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_commands_site_id'), ['site_id'], unique=False)
        batch_op.create_index('ix_commands_unpublished', ['published_at', 'status'], unique=False)
        batch_op.create_index('ix_commands_unit', ['operator_id', 'unit_id', 'status'],
                              unique=False)

    op.create_table('operator_sites',
    sa.Column('site_id', sa.String(length=64), nullable=False),
    sa.Column('operator_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('seen_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['operator_id'], ['operators.id'], ),
    sa.PrimaryKeyConstraint('site_id')
    )
    with op.batch_alter_table('operator_sites', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_operator_sites_operator_id'), ['operator_id'],
                              unique=False)

    op.create_table('sites',
    sa.Column('site_id', sa.String(length=64), nullable=False),
    sa.Column('operator_id', sa.String(length=64), nullable=False),
    sa.Column('credential_id', sa.String(length=32), nullable=False),
    sa.Column('credential_digest', sa.String(length=64), nullable=False),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('shared_units', sa.Text(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('revoked_at', sa.Float(), nullable=True),
    sa.Column('status_json', sa.Text(), nullable=True),
    sa.Column('status_at', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['operator_id'], ['operators.id'], ),
    sa.PrimaryKeyConstraint('site_id'),
    sa.UniqueConstraint('credential_id')
    )
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sites_operator_id'), ['operator_id'], unique=False)

    op.create_table('unit_states',
    sa.Column('operator_id', sa.String(length=64), nullable=False),
    sa.Column('unit_id', sa.String(length=64), nullable=False),
    sa.Column('site_id', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=40), nullable=False),
    sa.Column('ver', sa.BigInteger(), nullable=False),
    sa.Column('lockout', sa.Boolean(), nullable=False),
    sa.Column('confirmed_ver', sa.BigInteger(), nullable=True),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['operator_id'], ['operators.id'], ),
    sa.PrimaryKeyConstraint('operator_id', 'unit_id')
    )
    with op.batch_alter_table('unit_states', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_unit_states_site_id'), ['site_id'], unique=False)

    op.create_table('webhook_events',
    sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('operator_id', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.String(length=100), nullable=False),
    sa.Column('type', sa.String(length=100), nullable=False),
    sa.Column('unit_id', sa.String(length=64), nullable=True),
    sa.Column('outcome', sa.String(length=40), nullable=False),
    sa.Column('skew_s', sa.Float(), nullable=False),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['operator_id'], ['operators.id'], ),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('operator_id', 'event_id')
    )


def downgrade() -> None:
    op.drop_table('webhook_events')
    with op.batch_alter_table('unit_states', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_unit_states_site_id'))

    op.drop_table('unit_states')
    with op.batch_alter_table('sites', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sites_operator_id'))

    op.drop_table('sites')
    with op.batch_alter_table('operator_sites', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_operator_sites_operator_id'))

    op.drop_table('operator_sites')
    with op.batch_alter_table('commands', schema=None) as batch_op:
        batch_op.drop_index('ix_commands_unit')
        batch_op.drop_index('ix_commands_unpublished')
        batch_op.drop_index(batch_op.f('ix_commands_site_id'))
        batch_op.drop_index(batch_op.f('ix_commands_operator_id'))

    op.drop_table('commands')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_operator_id'))

    op.drop_table('api_keys')
    op.drop_table('signing_keys')
    op.drop_table('operators')
    op.drop_table('oauth_states')
