"""Retro-hunt jobs: past uploads searched for bank entries added after they were screened."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, CreatedAtMixin, IdMixin, UpdatedAtMixin, enum_column


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    # Past uploads, in id order up to the newest at the first step, a block at a time.
    SCANNING = "scanning"
    # Waiting until every worker matches with the new entries (see `service`).
    SETTLING = "settling"
    # Searching again the uploads screened around the time the entries were added.
    CATCHING_UP = "catching_up"
    DONE = "done"
    # The bank was disabled before the job ran: disabled banks are not hunted.
    SKIPPED = "skipped"
    FAILED = "failed"


FINAL_JOB_STATUSES = (JobStatus.DONE, JobStatus.SKIPPED, JobStatus.FAILED)


class RetrohuntJob(IdMixin, CreatedAtMixin, UpdatedAtMixin, Base):
    """The entries of one bank with ids in [first_entry_id, last_entry_id], hunted for in
    every upload screened before they were added. Created in the transaction that adds
    the entries; its progress is a checkpoint, so a crash resumes where it stopped."""

    __tablename__ = "retrohunt_jobs"
    __table_args__ = (
        # The sweeper looks for unfinished jobs whose next step is overdue.
        Index("ix_retrohunt_jobs_status_next_run_at", "status", "next_run_at"),
    )

    bank_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("banks.id", ondelete="CASCADE"), index=True
    )
    # A range, not a list: 100,000 imported entries are one row. Other entries of the
    # bank that fall inside it (added concurrently) are hunted again, harmlessly.
    first_entry_id: Mapped[int] = mapped_column(BigInteger)
    last_entry_id: Mapped[int] = mapped_column(BigInteger)
    entries: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(
        enum_column(JobStatus, "retrohunt_status"), default=JobStatus.QUEUED
    )
    # Incremented by each step; a message names the step it runs, so a redelivered or
    # re-sent message for a step already taken does nothing (chains never multiply).
    step: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the next step is due; an unfinished job overdue by `retrohunt_stalled_after_s`
    # lost its message or its worker, and the sweeper sends it again.
    next_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    # The scan: uploads with ids in (0, horizon_upload_id], set at the first step.
    horizon_upload_id: Mapped[int | None] = mapped_column(BigInteger)
    # The checkpoint: every upload with an id up to this one has been searched.
    scanned_through_upload_id: Mapped[int] = mapped_column(
        BigInteger, default=0, server_default="0"
    )
    uploads_total: Mapped[int | None] = mapped_column(Integer)
    uploads_scanned: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    vectors_scanned: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The final pass: uploads screened since `retrohunt_settle_s` before `created_at`
    # (the adding transaction's start), searched again once `settle_until` has passed,
    # with its own checkpoint.
    settle_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    caught_up_through_upload_id: Mapped[int] = mapped_column(
        BigInteger, default=0, server_default="0"
    )
    hits_found: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
