"""The webhook outbox: events written in the transaction of what they announce, and every
attempt a sender made to deliver them."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, IdMixin, enum_column


class EventType(enum.StrEnum):
    # Screening found hits on an upload (only with MODERATION_WEBHOOK_ON_SCREENING_HIT).
    HIT = "upload.hit"
    # A reviewer confirmed an upload's hits: the verdict the upload service acts on.
    CONFIRMED = "upload.confirmed"
    # A reviewer dismissed them (only with MODERATION_WEBHOOK_ON_SCREENING_HIT, so that a
    # receiver told of a hit also learns it was cleared).
    DISMISSED = "upload.dismissed"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    # Undelivered past `webhook_give_up_after_s`; `moderation webhooks redeliver` revives it.
    FAILED = "failed"


class WebhookEvent(IdMixin, Base):
    __tablename__ = "webhook_events"
    __table_args__ = (
        # Senders claim due events in this order; delivered ones drop out of the index.
        Index(
            "ix_webhook_events_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    # Sent in the body and the `Idempotency-Key` header: the receiver drops repeats.
    idempotency_key: Mapped[uuid.UUID] = mapped_column(
        Uuid, unique=True, server_default=func.gen_random_uuid()
    )
    event_type: Mapped[EventType] = mapped_column(enum_column(EventType, "webhook_event_type"))
    upload_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("uploads.id", ondelete="CASCADE"), index=True
    )
    # The event's data as of its transaction (see `webhooks.service` for the fields).
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    status: Mapped[DeliveryStatus] = mapped_column(
        enum_column(DeliveryStatus, "delivery_status"),
        default=DeliveryStatus.PENDING,
        server_default=DeliveryStatus.PENDING.value,
    )
    # Claims so far, including one whose sender died before recording an outcome.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When a sender may next claim the event: the retry time, or the end of a claim's lease.
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # Since when the event has been waiting: its creation, or its last `redeliver`. It is
    # failed `webhook_give_up_after_s` after this.
    pending_since: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # The current claim; a sender records a failure only while its claim still holds.
    lease_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)


class WebhookAttempt(IdMixin, Base):
    """One POST of an event: its answer or its error, and how long it took."""

    __tablename__ = "webhook_attempts"

    event_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True
    )
    # The event's claim count when this attempt was made (1 for the first).
    attempt: Mapped[int] = mapped_column(Integer)
    sender: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[float] = mapped_column(Float)
    # The HTTP status, or NULL when no answer came (refused, timed out).
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
