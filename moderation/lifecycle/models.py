"""Re-embedding jobs: every screened upload and every bank entry with a source embedded
again under a new model, in the background, with a checkpoint."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, CreatedAtMixin, IdMixin, UpdatedAtMixin, enum_column


class ReembedStatus(enum.StrEnum):
    QUEUED = "queued"
    # Screened uploads with ids up to the horizon set at the first step, in id order.
    UPLOADS = "uploads"
    # Bank entries with a source, ids up to their horizon, in id order.
    ENTRIES = "entries"
    # Uploads and entries that arrived since the horizons without an embedding under the
    # model (screened by a worker that had not yet picked the model up), until a pass
    # finds none once `settle_until` has passed.
    CATCHING_UP = "catching_up"
    DONE = "done"
    # The model was retired before the job finished.
    CANCELLED = "cancelled"
    FAILED = "failed"


FINAL_REEMBED_STATUSES = (ReembedStatus.DONE, ReembedStatus.CANCELLED, ReembedStatus.FAILED)


class ReembedJob(IdMixin, CreatedAtMixin, UpdatedAtMixin, Base):
    """One model's re-embedding. Its progress is a checkpoint per phase, so a worker
    killed at any point resumes where the last committed step stopped; every row it
    writes is unique (an upload's frame, an entry, per model), so a step run twice writes
    nothing twice."""

    __tablename__ = "reembed_jobs"
    __table_args__ = (
        # The sweeper looks for unfinished jobs whose next step is overdue.
        Index("ix_reembed_jobs_status_next_run_at", "status", "next_run_at"),
    )

    model_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("embedding_models.id"), index=True)
    created_by: Mapped[str] = mapped_column(String(200))
    # The share of a worker's time its steps may take (rests after each step make up the
    # rest); NULL: the worker's `reembed_duty`. 1 runs a migration at full speed, e.g.
    # while uploads are few.
    duty: Mapped[float | None] = mapped_column(Float)
    status: Mapped[ReembedStatus] = mapped_column(
        enum_column(ReembedStatus, "reembed_status"), default=ReembedStatus.QUEUED
    )
    # Incremented as each step is taken; a message names the step it runs, so a
    # redelivered or re-sent message for a step already taken does nothing.
    step: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Set at the first step: what the scan covers.
    upload_horizon: Mapped[int | None] = mapped_column(BigInteger)
    entry_horizon: Mapped[int | None] = mapped_column(BigInteger)
    uploads_total: Mapped[int | None] = mapped_column(Integer)
    entries_total: Mapped[int | None] = mapped_column(Integer)
    # Checkpoints: every upload (entry) with an id up to this one has been handled.
    uploads_through: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    entries_through: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    settle_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Handled: embedded now, found embedded already, or failed (below).
    uploads_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    entries_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    embedded: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Failures by reason (an intake error's code: not_found, content_mismatch, ...).
    failures: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default="{}")
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)


class ReembedFailure(IdMixin, CreatedAtMixin, Base):
    """An upload or entry a job could not embed, and why (its content gone, or not the
    bytes screened): recorded, counted, never fatal to the job."""

    __tablename__ = "reembed_failures"
    __table_args__ = (
        UniqueConstraint("job_id", "upload_id"),
        UniqueConstraint("job_id", "bank_entry_id"),
        CheckConstraint("(upload_id IS NULL) <> (bank_entry_id IS NULL)", name="one_subject"),
    )

    job_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("reembed_jobs.id", ondelete="CASCADE"), index=True
    )
    upload_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("uploads.id", ondelete="CASCADE")
    )
    bank_entry_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("bank_entries.id", ondelete="CASCADE")
    )
    reason: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
