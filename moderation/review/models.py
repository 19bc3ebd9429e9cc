"""Hits, the review queue's items: an upload that matched a bank entry on one signal, and
where each stands in review. Written by screening and by retro-hunts (`service.record_hits`),
decided by reviewers."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, IdMixin, enum_column
from moderation.images.signals import SignalType


class ReviewStatus(enum.StrEnum):
    """Where a hit stands in the review queue. A decision moves every hit of its upload."""

    PENDING = "pending"
    CONFIRMED = "confirmed"
    DISMISSED = "dismissed"
    # Sent to a senior reviewer; still waiting for a final decision.
    ESCALATED = "escalated"


class Hit(IdMixin, Base):
    """An upload matched a bank entry on one signal. One row per (upload, entry, signal)."""

    __tablename__ = "hits"
    __table_args__ = (
        UniqueConstraint("upload_id", "bank_entry_id", "signal"),
        # The review queue: newest first within a status.
        Index("ix_hits_review_status_created_at_id", "review_status", "created_at", "id"),
    )

    upload_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("uploads.id", ondelete="CASCADE"))
    bank_entry_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("bank_entries.id", ondelete="CASCADE"), index=True
    )
    signal: Mapped[SignalType] = mapped_column(enum_column(SignalType, "signal_type"))
    # Cosine distance for CLIP, Hamming bits for PDQ, 0 for SHA-256; the best over all frames.
    distance: Mapped[float] = mapped_column(Float)
    # What the distance was held to when the hit was found: the bank's CLIP radius, the
    # worker's PDQ threshold in bits, 0 for SHA-256. Null for hits found before it was kept.
    threshold: Mapped[float | None] = mapped_column(Float)
    frame_index: Mapped[int] = mapped_column(Integer, default=0)
    # The model whose embeddings matched (CLIP hits only).
    model_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("embedding_models.id"))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    # Found by a retro-hunt (a bank entry added after the upload was screened), not at screening.
    retroactive: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")

    review_status: Mapped[ReviewStatus] = mapped_column(
        enum_column(ReviewStatus, "review_status"),
        default=ReviewStatus.PENDING,
        server_default=ReviewStatus.PENDING.value,
    )
    # Indexed for /metrics, which counts the last hour's decisions at every scrape.
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    # The reviewer's name (an API key's name, or `cli:<user>`).
    reviewed_by: Mapped[str | None] = mapped_column(String(200))
    review_note: Mapped[str | None] = mapped_column(Text)


class ReviewClaim(Base):
    """A reviewer's lease on an upload's card: while it runs, no other reviewer is given the
    card or may decide it. One row per upload; an expired row is free for anyone to take."""

    __tablename__ = "review_claims"

    upload_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True
    )
    # The reviewer's actor name (as in `Hit.reviewed_by`).
    claimed_by: Mapped[str] = mapped_column(String(200), index=True)
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
