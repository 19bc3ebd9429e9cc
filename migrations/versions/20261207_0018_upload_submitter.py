"""who submitted an upload (uploads.submitted_by): the worker's fetch slots per submitter

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 18:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0018'
down_revision: str | None = '0017'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, with no default: adding it rewrites nothing, and uploads recorded before it
    # share one group of slots ("none recorded").
    op.add_column('uploads', sa.Column('submitted_by', sa.String(length=256), nullable=True))


def downgrade() -> None:
    op.drop_column('uploads', 'submitted_by')
