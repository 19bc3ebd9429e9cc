"""bank changes: a log of what matching must apply, written by triggers

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 22:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0009'
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Statement-level triggers read the changed rows from transition tables, so that a COPY of
# a million entries logs them with one INSERT ... SELECT rather than a function call per
# row. Deletions cascading from a bank (or an entry) are not logged row by row: the
# bank's (or the entry's) own change covers them, and a deleted bank's entries are gone
# before the cascade's statement trigger runs. Each log row is inserted after the change
# it reports, so its transaction always has an xid before it takes the row's id (see
# `moderation.commit_horizon`).
_TRIGGERS = """
CREATE FUNCTION bank_changes_of_bank() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bank_changes (bank_id)
    VALUES (CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
    RETURN NULL;
END $$;
CREATE TRIGGER bank_changes_on_insert_or_delete AFTER INSERT OR DELETE ON banks
    FOR EACH ROW EXECUTE FUNCTION bank_changes_of_bank();
CREATE TRIGGER bank_changes_on_update AFTER UPDATE ON banks
    FOR EACH ROW
    WHEN (OLD.enabled IS DISTINCT FROM NEW.enabled OR OLD.radius IS DISTINCT FROM NEW.radius)
    EXECUTE FUNCTION bank_changes_of_bank();

CREATE FUNCTION bank_changes_of_added_entries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bank_changes (bank_entry_id) SELECT id FROM new_rows;
    RETURN NULL;
END $$;
CREATE TRIGGER bank_changes_on_insert AFTER INSERT ON bank_entries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bank_changes_of_added_entries();

CREATE FUNCTION bank_changes_of_updated_entries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bank_changes (bank_entry_id)
    SELECT n.id FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE (n.bank_id, n.sha256, n.pdq, n.pdq_quality)
        IS DISTINCT FROM (o.bank_id, o.sha256, o.pdq, o.pdq_quality);
    RETURN NULL;
END $$;
CREATE TRIGGER bank_changes_on_update AFTER UPDATE ON bank_entries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bank_changes_of_updated_entries();

CREATE FUNCTION bank_changes_of_removed_entries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bank_changes (bank_entry_id)
    SELECT o.id FROM old_rows o WHERE EXISTS (SELECT FROM banks b WHERE b.id = o.bank_id);
    RETURN NULL;
END $$;
CREATE TRIGGER bank_changes_on_delete AFTER DELETE ON bank_entries
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bank_changes_of_removed_entries();

CREATE FUNCTION bank_changes_of_added_embeddings() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bank_changes (bank_entry_id, model_id)
    SELECT bank_entry_id, model_id FROM new_rows;
    RETURN NULL;
END $$;
CREATE TRIGGER bank_changes_on_insert AFTER INSERT ON bank_entry_embeddings
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bank_changes_of_added_embeddings();

CREATE FUNCTION bank_changes_of_updated_embeddings() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The entry and model before and after: an embedding moved to another entry or
    -- model changes both.
    INSERT INTO bank_changes (bank_entry_id, model_id)
    SELECT side.bank_entry_id, side.model_id
    FROM new_rows n JOIN old_rows o ON o.id = n.id,
        LATERAL (VALUES (n.bank_entry_id, n.model_id), (o.bank_entry_id, o.model_id))
            AS side (bank_entry_id, model_id)
    WHERE (n.bank_entry_id, n.model_id, n.vector)
        IS DISTINCT FROM (o.bank_entry_id, o.model_id, o.vector)
    GROUP BY side.bank_entry_id, side.model_id;
    RETURN NULL;
END $$;
CREATE TRIGGER bank_changes_on_update AFTER UPDATE ON bank_entry_embeddings
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bank_changes_of_updated_embeddings();

CREATE FUNCTION bank_changes_of_removed_embeddings() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bank_changes (bank_entry_id, model_id)
    SELECT o.bank_entry_id, o.model_id FROM old_rows o
    WHERE EXISTS (SELECT FROM bank_entries e WHERE e.id = o.bank_entry_id);
    RETURN NULL;
END $$;
CREATE TRIGGER bank_changes_on_delete AFTER DELETE ON bank_entry_embeddings
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bank_changes_of_removed_embeddings();

-- TRUNCATE deletes no rows one by one: a row naming nothing says "read everything".
CREATE FUNCTION bank_changes_of_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bank_changes DEFAULT VALUES;
    RETURN NULL;
END $$;
CREATE TRIGGER bank_changes_on_truncate AFTER TRUNCATE ON banks
    FOR EACH STATEMENT EXECUTE FUNCTION bank_changes_of_truncate();
CREATE TRIGGER bank_changes_on_truncate AFTER TRUNCATE ON bank_entries
    FOR EACH STATEMENT EXECUTE FUNCTION bank_changes_of_truncate();
CREATE TRIGGER bank_changes_on_truncate AFTER TRUNCATE ON bank_entry_embeddings
    FOR EACH STATEMENT EXECUTE FUNCTION bank_changes_of_truncate();
"""

_TRIGGERS_DROPPED = """
DROP TRIGGER bank_changes_on_truncate ON bank_entry_embeddings;
DROP TRIGGER bank_changes_on_truncate ON bank_entries;
DROP TRIGGER bank_changes_on_truncate ON banks;
DROP FUNCTION bank_changes_of_truncate();
DROP TRIGGER bank_changes_on_delete ON bank_entry_embeddings;
DROP FUNCTION bank_changes_of_removed_embeddings();
DROP TRIGGER bank_changes_on_update ON bank_entry_embeddings;
DROP FUNCTION bank_changes_of_updated_embeddings();
DROP TRIGGER bank_changes_on_insert ON bank_entry_embeddings;
DROP FUNCTION bank_changes_of_added_embeddings();
DROP TRIGGER bank_changes_on_delete ON bank_entries;
DROP FUNCTION bank_changes_of_removed_entries();
DROP TRIGGER bank_changes_on_update ON bank_entries;
DROP FUNCTION bank_changes_of_updated_entries();
DROP TRIGGER bank_changes_on_insert ON bank_entries;
DROP FUNCTION bank_changes_of_added_entries();
DROP TRIGGER bank_changes_on_update ON banks;
DROP TRIGGER bank_changes_on_insert_or_delete ON banks;
DROP FUNCTION bank_changes_of_bank();
"""


def upgrade() -> None:
    op.create_table('bank_changes',
    sa.Column('bank_id', sa.BigInteger(), nullable=True),
    sa.Column('bank_entry_id', sa.BigInteger(), nullable=True),
    sa.Column('model_id', sa.BigInteger(), nullable=True),
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('bank_id IS NULL OR bank_entry_id IS NULL', name=op.f('ck_bank_changes_one_subject')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_bank_changes'))
    )
    op.execute(_TRIGGERS)


def downgrade() -> None:
    op.execute(_TRIGGERS_DROPPED)
    op.drop_table('bank_changes')
