"""review claims (a reviewer's lease on a card), decision forms kept across a lost session,
and NOTIFY api_keys_changed (the API's key cache)

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 15:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0017'
down_revision: str | None = '0016'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('review_claims',
    sa.Column('upload_id', sa.BigInteger(), nullable=False),
    sa.Column('claimed_by', sa.String(length=200), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['upload_id'], ['uploads.id'], name=op.f('fk_review_claims_upload_id_uploads'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('upload_id', name=op.f('pk_review_claims'))
    )
    op.create_index(op.f('ix_review_claims_claimed_by'), 'review_claims', ['claimed_by'], unique=False)
    op.create_index(op.f('ix_review_claims_expires_at'), 'review_claims', ['expires_at'], unique=False)
    op.create_table('web_pending_forms',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('token_hash', sa.LargeBinary(length=32), nullable=False),
    sa.Column('action', sa.String(length=200), nullable=False),
    sa.Column('fields', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_web_pending_forms')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_web_pending_forms_token_hash'))
    )
    op.create_index(op.f('ix_web_pending_forms_expires_at'), 'web_pending_forms', ['expires_at'], unique=False)
    # The API's key cache (moderation/auth/key_cache.py) drops what it holds on this
    # notification, sent when the changing transaction commits: a revoked key is refused at
    # once. Not on `last_used_at`, which the API itself writes once a minute per key.
    op.execute(
        """
        CREATE FUNCTION notify_api_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('api_keys_changed', '');
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER api_keys_changed AFTER UPDATE OF revoked_at, role, name, key_hash "
        "OR DELETE ON api_keys FOR EACH ROW EXECUTE FUNCTION notify_api_keys_changed()"
    )
    op.execute(
        "CREATE TRIGGER api_keys_truncated AFTER TRUNCATE ON api_keys "
        "FOR EACH STATEMENT EXECUTE FUNCTION notify_api_keys_changed()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER api_keys_truncated ON api_keys")
    op.execute("DROP TRIGGER api_keys_changed ON api_keys")
    op.execute("DROP FUNCTION notify_api_keys_changed()")
    op.drop_index(op.f('ix_web_pending_forms_expires_at'), table_name='web_pending_forms')
    op.drop_table('web_pending_forms')
    op.drop_index(op.f('ix_review_claims_expires_at'), table_name='review_claims')
    op.drop_index(op.f('ix_review_claims_claimed_by'), table_name='review_claims')
    op.drop_table('review_claims')
