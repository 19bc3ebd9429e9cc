"""the model registry (family, fingerprint and state of each embedding model), and
re-embedding jobs

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql


revision: str = '0014'
down_revision: str | None = "0013"
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


    op.create_table(
        'reembed_jobs',
        sa.Column('model_id', sa.BigInteger(), nullable=False),
        sa.Column('created_by', sa.String(length=200), nullable=False),
        sa.Column('duty', sa.Float(), nullable=True),
        sa.Column(
            'status',
            sa.Enum('queued', 'uploads', 'entries', 'catching_up', 'done', 'cancelled', 'failed',
                    name='reembed_status', native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column('step', sa.Integer(), server_default='0', nullable=False),
        sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('upload_horizon', sa.BigInteger(), nullable=True),
        sa.Column('entry_horizon', sa.BigInteger(), nullable=True),
        sa.Column('uploads_total', sa.Integer(), nullable=True),
        sa.Column('entries_total', sa.Integer(), nullable=True),
        sa.Column('uploads_through', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('entries_through', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('settle_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('uploads_done', sa.Integer(), server_default='0', nullable=False),
        sa.Column('entries_done', sa.Integer(), server_default='0', nullable=False),
        sa.Column('embedded', sa.Integer(), server_default='0', nullable=False),
        sa.Column('failures', postgresql.JSONB(astext_type=sa.Text()), server_default='{}',
                  nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.ForeignKeyConstraint(['model_id'], ['embedding_models.id'],
                                name=op.f('fk_reembed_jobs_model_id_embedding_models')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_reembed_jobs')),
    )
    op.create_index('ix_reembed_jobs_status_next_run_at', 'reembed_jobs',
                    ['status', 'next_run_at'], unique=False)
    op.create_index(op.f('ix_reembed_jobs_model_id'), 'reembed_jobs', ['model_id'], unique=False)
    op.create_table(
        'reembed_failures',
        sa.Column('job_id', sa.BigInteger(), nullable=False),
        sa.Column('upload_id', sa.BigInteger(), nullable=True),
        sa.Column('bank_entry_id', sa.BigInteger(), nullable=True),
        sa.Column('reason', sa.String(length=64), nullable=False),
        sa.Column('message', sa.Text(), nullable=False),
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.CheckConstraint('(upload_id IS NULL) <> (bank_entry_id IS NULL)',
                           name=op.f('ck_reembed_failures_one_subject')),
        sa.ForeignKeyConstraint(['bank_entry_id'], ['bank_entries.id'], ondelete='CASCADE',
                                name=op.f('fk_reembed_failures_bank_entry_id_bank_entries')),
        sa.ForeignKeyConstraint(['job_id'], ['reembed_jobs.id'], ondelete='CASCADE',
                                name=op.f('fk_reembed_failures_job_id_reembed_jobs')),
        sa.ForeignKeyConstraint(['upload_id'], ['uploads.id'], ondelete='CASCADE',
                                name=op.f('fk_reembed_failures_upload_id_uploads')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_reembed_failures')),
        sa.UniqueConstraint('job_id', 'upload_id',
                            name=op.f('uq_reembed_failures_job_id_upload_id')),
        sa.UniqueConstraint('job_id', 'bank_entry_id',
                            name=op.f('uq_reembed_failures_job_id_bank_entry_id')),
    )
    op.create_index(op.f('ix_reembed_failures_job_id'), 'reembed_failures', ['job_id'],
                    unique=False)


def downgrade() -> None:
    op.drop_table('reembed_failures')
    op.drop_table('reembed_jobs')
    op.drop_index('uq_embedding_models_one_active', table_name='embedding_models')
    op.drop_column('embedding_models', 'state_changed_at')
    op.drop_column('embedding_models', 'state')
    op.drop_column('embedding_models', 'fingerprint')
    op.drop_column('embedding_models', 'family')
