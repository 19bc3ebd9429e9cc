"""bank changes horizon: where the change log was pruned

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 01:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('bank_changes_horizon',
    sa.Column('one_row', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('pruned_through', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('pruned_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('one_row', name=op.f('ck_bank_changes_horizon_one_row')),
    sa.PrimaryKeyConstraint('one_row', name=op.f('pk_bank_changes_horizon'))
    )
    # The row exists from the start: nothing pruned yet.
    op.execute("INSERT INTO bank_changes_horizon DEFAULT VALUES")


def downgrade() -> None:
    op.drop_table('bank_changes_horizon')
