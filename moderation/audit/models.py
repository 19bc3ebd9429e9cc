"""The audit log: every decision, bank change, key change and explicit re-screening.

Append-only: the migration installs a trigger that refuses UPDATE and DELETE on the table.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, String, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, IdMixin


class AuditEvent(IdMixin, Base):
    __tablename__ = "audit_log"

    # Who: an API key's name, or `cli:<user>` for the command line.
    actor: Mapped[str] = mapped_column(String(200))
    # What: a verb on a subject, such as `upload.resubmit`.
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(200))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
