"""API keys. A key is shown once, when it is made; only its SHA-256 is stored."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import DateTime, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, CreatedAtMixin, IdMixin, enum_column


class Role(enum.StrEnum):
    # Sends uploads and reads their results: the upload service.
    SUBMITTER = "submitter"
    # Works the review queue and reads banks.
    REVIEWER = "reviewer"
    # Searches everything screened.
    ANALYST = "analyst"
    # Everything, including banks, keys and the audit log.
    ADMIN = "admin"


class ApiKey(IdMixin, CreatedAtMixin, Base):
    __tablename__ = "api_keys"

    # Who the key belongs to; the actor in the audit log.
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[Role] = mapped_column(enum_column(Role, "role"))
    # SHA-256 of the whole key. Keys are 256 random bits, so a plain hash is enough: there is
    # nothing to guess that a slow hash would protect (unlike a password).
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    # The key's first characters, shown in listings so a person can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
