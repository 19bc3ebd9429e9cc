"""hit thresholds: what each hit's distance was held to when it was found

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 02:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0011'
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: the threshold of a hit found before this is not known, and the review
    # shows the one in force now for it, saying so.
    op.add_column('hits', sa.Column('threshold', sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column('hits', 'threshold')
