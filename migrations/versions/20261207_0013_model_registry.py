"""the model registry: family, fingerprint and state of each embedding model

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0013'
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('embedding_models', sa.Column('family', sa.String(length=32), nullable=True))
    op.add_column('embedding_models', sa.Column('fingerprint', sa.String(length=64), nullable=True))
    # Every existing model starts retired: the first worker or command to need a model
    # makes the configured one (MODERATION_MODEL) active, as it was before the registry.
    op.add_column(
        'embedding_models',
        sa.Column(
            'state',
            sa.Enum('candidate', 'active', 'retired', name='model_state', native_enum=False,
                    create_constraint=True, length=16),
            server_default='retired',
            nullable=False,
        ),
    )
    op.add_column(
        'embedding_models',
        sa.Column('state_changed_at', sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        'uq_embedding_models_one_active', 'embedding_models', ['state'], unique=True,
        postgresql_where=sa.text("state = 'active'"),
    )


def downgrade() -> None:
    op.drop_index('uq_embedding_models_one_active', table_name='embedding_models')
    op.drop_column('embedding_models', 'state_changed_at')
    op.drop_column('embedding_models', 'state')
    op.drop_column('embedding_models', 'fingerprint')
    op.drop_column('embedding_models', 'family')
