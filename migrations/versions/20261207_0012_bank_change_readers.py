"""bank change readers, and decided hits kept with their entry

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0012'
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A confirmed or escalated hit is evidence: an entry it points at cannot be deleted, by
# the API, the command line or plain SQL (its undecided hits go with it, by the foreign
# key's cascade). The DETAIL carries the count, for the error the caller shows.
_KEEP_DECIDED_HITS = """
CREATE FUNCTION bank_entries_keep_decided_hits() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    decided bigint;
BEGIN
    SELECT count(*) INTO decided FROM hits
    WHERE bank_entry_id = OLD.id AND review_status IN ('confirmed', 'escalated');
    IF decided > 0 THEN
        RAISE EXCEPTION 'bank entry % has % confirmed or escalated hit(s)', OLD.id, decided
            USING ERRCODE = 'restrict_violation', DETAIL = decided::text;
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER bank_entries_keep_decided_hits BEFORE DELETE ON bank_entries
    FOR EACH ROW EXECUTE FUNCTION bank_entries_keep_decided_hits();
"""


def upgrade() -> None:
    op.create_table(
        'bank_change_readers',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('checkpoint', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('read_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_bank_change_readers')),
    )
    # Retro-hunts were started with their entries until now, so the reader that starts
    # them from the log begins at its end.
    op.execute(
        "INSERT INTO bank_change_readers (name, checkpoint) "
        "SELECT 'retrohunt', coalesce(max(id), 0) FROM bank_changes"
    )
    op.execute(_KEEP_DECIDED_HITS)


def downgrade() -> None:
    op.execute("DROP TRIGGER bank_entries_keep_decided_hits ON bank_entries")
    op.execute("DROP FUNCTION bank_entries_keep_decided_hits()")
    op.drop_table('bank_change_readers')
