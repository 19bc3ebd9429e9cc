"""What is kept of an upload for review: one row per upload, naming the sealed frames in
the evidence store, where they came from, and how long they are kept."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, enum_column


class EvidenceState(enum.StrEnum):
    # Being fetched again by a worker's sweeper (a hit found after screening).
    CAPTURING = "capturing"
    # Frames kept: what screening saw, or bytes fetched again with the screened SHA-256.
    PRESERVED = "preserved"
    # Fetched again, the URI served other bytes than those screened: nothing of them is
    # shown, the fact (and their SHA-256) is kept.
    CHANGED = "changed"
    # Fetched again, nothing usable came back (gone, refused, not an image).
    UNAVAILABLE = "unavailable"
    # The frames were deleted at the end of the retention period.
    EXPIRED = "expired"


class EvidenceSource(enum.StrEnum):
    SCREENING = "screening"  # rendered by the worker from the bytes it screened
    REFETCH = "refetch"  # fetched again later, its SHA-256 checked against the screened one


class Evidence(Base):
    __tablename__ = "evidence"

    upload_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[EvidenceState] = mapped_column(enum_column(EvidenceState, "evidence_state"))
    source: Mapped[EvidenceSource] = mapped_column(enum_column(EvidenceSource, "evidence_source"))
    # The SHA-256 of the bytes screening saw; the frames are renderings of exactly those.
    screened_sha256: Mapped[bytes] = mapped_column(LargeBinary(32))
    # What a later fetch served instead (state `changed`).
    observed_sha256: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    # The file's frame index of each kept frame, in order.
    frames: Mapped[list[int]] = mapped_column(ARRAY(Integer), default=list, server_default="{}")
    # Frames in the file (a lower bound for a long animation), for "frame 5 of 12".
    frame_count: Mapped[int | None] = mapped_column(Integer)
    # Why a capture failed, or who took the capture (a worker's name), for people.
    detail: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    captured_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # When the sweepers delete the frames, unless held; null while capturing.
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    legal_hold: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    held_by: Mapped[str | None] = mapped_column(String(200))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
