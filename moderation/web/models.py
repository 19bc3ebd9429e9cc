"""Browser sessions: a person logs in with an API key once and the browser keeps a cookie."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, LargeBinary, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, CreatedAtMixin, IdMixin


class WebSession(IdMixin, CreatedAtMixin, Base):
    """One login. The cookie holds a random token; only its SHA-256 is stored, so a copy of
    this table lets no one in. A session acts as its key: revoking the key ends it."""

    __tablename__ = "web_sessions"

    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    api_key_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Set by logging out.
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PendingForm(IdMixin, CreatedAtMixin, Base):
    """A decision form posted after its session ended, kept so that the reviewer, once
    logged in again, gets it back as they filled it in (`/review/resume/{token}`). The
    browser holds the token (in the login's `next`); only its SHA-256 is stored. Read once."""

    __tablename__ = "web_pending_forms"

    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    # The path the form was posted to.
    action: Mapped[str] = mapped_column(String(200))
    fields: Mapped[dict[str, str]] = mapped_column(JSONB)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
