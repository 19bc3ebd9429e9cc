"""The audit log, for admins."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from moderation.audit import service
from moderation.audit.models import AuditEvent
from moderation.http.access import DbSession, allow

router = APIRouter(prefix="/v1/audit", tags=["audit"])


class AuditEventOut(BaseModel):
    id: int
    actor: str
    action: str
    subject_type: str
    subject_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    created_at: datetime

    @classmethod
    def of(cls, event: AuditEvent) -> AuditEventOut:
        return cls(
            id=event.id,
            actor=event.actor,
            action=event.action,
            subject_type=event.subject_type,
            subject_id=event.subject_id,
            before=event.before,
            after=event.after,
            created_at=event.created_at,
        )


class AuditPage(BaseModel):
    events: list[AuditEventOut]
    # Pass as `before_id` for the next (older) page; null when this page is the last.
    next_before_id: int | None


@router.get("", openapi_extra=allow())
def list_audit(
    session: DbSession,
    action: str | None = None,
    subject_type: str | None = None,
    subject_id: str | None = None,
    before_id: int | None = Query(default=None, ge=1, le=2**63 - 1),
    limit: int = Query(default=100, ge=1, le=1000),
) -> AuditPage:
    """Newest first, filtered; page through with `before_id`."""
    events = service.page(
        session,
        action=action,
        subject_type=subject_type,
        subject_id=subject_id,
        before_id=before_id,
        limit=limit + 1,
    )
    more = len(events) > limit
    events = events[:limit]
    return AuditPage(
        events=[AuditEventOut.of(event) for event in events],
        next_before_id=events[-1].id if more else None,
    )
