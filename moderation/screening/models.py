"""Uploads being screened, the signals computed from them, and the workers screening them.
(The hits they produce are the review queue's: `moderation.review.models`.)"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, CreatedAtMixin, IdMixin, UpdatedAtMixin, enum_column
from moderation.images.signals import SignalType


class UploadStatus(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SCREENED = "screened"
    FAILED = "failed"


class Upload(IdMixin, CreatedAtMixin, UpdatedAtMixin, Base):
    __tablename__ = "uploads"
    __table_args__ = (
        # The sweeper looks for rows stuck in a non-final state.
        Index("ix_uploads_status_updated_at", "status", "updated_at"),
        CheckConstraint("octet_length(declared_sha256) = 32", name="declared_sha256_length"),
    )

    # The caller's own id for the upload; submitting it again returns the same upload, and
    # submitting it with another URI or other bytes is refused (an id names one event).
    external_id: Mapped[str | None] = mapped_column(String(512), unique=True)
    uri: Mapped[str] = mapped_column(Text)
    # The SHA-256 the submitter declared for the bytes; the worker refuses other bytes.
    declared_sha256: Mapped[bytes | None] = mapped_column(LargeBinary)
    # The producer's own fields for the event (its user, its surface), stored as given.
    # `metadata` is the column; the attribute cannot be, SQLAlchemy's models own that name.
    event_metadata: Mapped[dict[str, Any] | None] = mapped_column(
        "metadata", JSONB(none_as_null=True)
    )
    # Who submitted it: the API key (`key:ID:NAME`, as the audit log names it) or the
    # operator at the command line (`cli:USER`). Its fetch counts against their slots.
    submitted_by: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[UploadStatus] = mapped_column(
        enum_column(UploadStatus, "upload_status"), default=UploadStatus.QUEUED
    )
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    # Incremented each time a worker starts on the upload; bounds poison messages.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The worker (`workers.name`) that claimed it last: if that worker stops heartbeating,
    # the sweeper sends the upload again at once.
    held_by: Mapped[str | None] = mapped_column(String(128))

    # What the decoder found; NULL until screened.
    media_format: Mapped[str | None] = mapped_column(String(16))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    frame_count: Mapped[int | None] = mapped_column(Integer)
    # Frames hashed by PDQ: fewer than frame_count when an animation was sampled.
    frames_hashed: Mapped[int | None] = mapped_column(Integer)

    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# The frame index of a PDQ signal of frame 0 as the file stores it, when EXIF orientation
# turned it upright (`ImageSignals.pdq_as_stored`): hash lists made without applying
# orientation hold that one, so retro-hunts must search it as screening matches it.
AS_STORED_FRAME = -1


class Signal(IdMixin, Base):
    """A hash of an upload: SHA-256 of its bytes (frame 0), or PDQ of one screened frame
    (or of frame 0 as stored: `AS_STORED_FRAME`)."""

    __tablename__ = "signals"
    __table_args__ = (
        UniqueConstraint("upload_id", "signal", "frame_index"),
        Index("ix_signals_signal_value", "signal", "value"),
    )

    upload_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("uploads.id", ondelete="CASCADE"))
    signal: Mapped[SignalType] = mapped_column(enum_column(SignalType, "signal_type"))
    frame_index: Mapped[int] = mapped_column(Integer, default=0)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    # PDQ's own quality score, 0-100; NULL for SHA-256.
    quality: Mapped[int | None] = mapped_column(Integer)


class Worker(Base):
    """A screening worker process, alive while its heartbeat is recent."""

    __tablename__ = "workers"

    # Unique per process start: host, pid and a random suffix.
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    heartbeat_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    # Set by a clean shutdown; a dead worker never sets it.
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
