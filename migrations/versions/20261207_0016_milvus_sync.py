"""the change log a Milvus index follows (search_changes, written by triggers), and each
Milvus collection's sync checkpoints (milvus_sync_state)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 15:08:06.261903
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql


revision: str = '0016'
down_revision: str | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One row per changed upload, written in the changing transaction, and only while some
# Milvus collection is synced: an installation on Faiss pays one lookup in an empty table.
# The column naming the upload differs per table, hence TG_ARGV[0].
_LOG_FUNCTION = """
CREATE FUNCTION log_search_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed jsonb;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM milvus_sync_state) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        changed := to_jsonb(OLD);
    ELSE
        changed := to_jsonb(NEW);
    END IF;
    INSERT INTO search_changes (upload_id) VALUES ((changed ->> TG_ARGV[0])::bigint);
    RETURN NULL;
END
$$
"""

# Screening writes an upload's status, finish time, embeddings and hits in one transaction,
# which the sync reads whole; only what changes an upload after that is logged (hits: any,
# since retrohunt adds them later, and decisions move their review status).
_TRIGGERS = {
    "search_change_upload_update": """
        CREATE TRIGGER search_change_upload_update AFTER UPDATE OF status, finished_at, error_code
        ON uploads FOR EACH ROW
        WHEN (OLD.finished_at IS NOT NULL AND (
            OLD.status IS DISTINCT FROM NEW.status
            OR OLD.finished_at IS DISTINCT FROM NEW.finished_at
            OR OLD.error_code IS DISTINCT FROM NEW.error_code))
        EXECUTE FUNCTION log_search_change('id')
    """,
    "search_change_upload_delete": """
        CREATE TRIGGER search_change_upload_delete AFTER DELETE ON uploads
        FOR EACH ROW EXECUTE FUNCTION log_search_change('id')
    """,
    "search_change_hit_insert_delete": """
        CREATE TRIGGER search_change_hit_insert_delete AFTER INSERT OR DELETE ON hits
        FOR EACH ROW EXECUTE FUNCTION log_search_change('upload_id')
    """,
    "search_change_hit_review": """
        CREATE TRIGGER search_change_hit_review AFTER UPDATE OF review_status ON hits
        FOR EACH ROW WHEN (OLD.review_status IS DISTINCT FROM NEW.review_status)
        EXECUTE FUNCTION log_search_change('upload_id')
    """,
    "search_change_embedding_delete": """
        CREATE TRIGGER search_change_embedding_delete AFTER DELETE ON embeddings
        FOR EACH ROW EXECUTE FUNCTION log_search_change('upload_id')
    """,
}
_TABLES = {
    "search_change_upload_update": "uploads",
    "search_change_upload_delete": "uploads",
    "search_change_hit_insert_delete": "hits",
    "search_change_hit_review": "hits",
    "search_change_embedding_delete": "embeddings",
}


def upgrade() -> None:
    op.create_table('search_changes',
    sa.Column('upload_id', sa.BigInteger(), nullable=False),
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_search_changes'))
    )
    op.create_table('milvus_sync_state',
    sa.Column('collection', sa.String(length=255), nullable=False),
    sa.Column('model_id', sa.BigInteger(), nullable=False),
    sa.Column('embeddings_checkpoint', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('changes_checkpoint', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('synced_through', sa.DateTime(timezone=True), nullable=True),
    sa.Column('parameters', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['embedding_models.id'], name=op.f('fk_milvus_sync_state_model_id_embedding_models')),
    sa.PrimaryKeyConstraint('collection', name=op.f('pk_milvus_sync_state'))
    )
    op.execute(_LOG_FUNCTION)
    for statement in _TRIGGERS.values():
        op.execute(statement)


def downgrade() -> None:
    for name, table in _TABLES.items():
        op.execute(f"DROP TRIGGER {name} ON {table}")
    op.execute("DROP FUNCTION log_search_change()")
    op.drop_table('milvus_sync_state')
    op.drop_table('search_changes')
