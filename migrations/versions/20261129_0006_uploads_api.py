"""upload metadata, hits reviewed_at index

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 21:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql


revision: str = '0006'
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('uploads', sa.Column('metadata', postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), nullable=True))
    # /metrics counts the last hour's review decisions at every scrape.
    op.create_index(op.f('ix_hits_reviewed_at'), 'hits', ['reviewed_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_hits_reviewed_at'), table_name='hits')
    op.drop_column('uploads', 'metadata')
