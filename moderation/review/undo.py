"""Taking a decision back, by its decider, for a few seconds after it was made
(`review_undo_seconds`): one key confirms, so one mistaken key must be recoverable.

An undo puts every hit the decision moved back as it was (status, and the earlier
reviewer's name, time and note where the decision overwrote an escalation), drops the
decision's webhook event before any sender took it (`decide` delays it by the window),
releases a legal hold the decision placed, and is audited. It is refused once the window
has passed, once a colleague changed any of those hits, or once the event was sent.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.audit.models import AuditEvent
from moderation.errors import Conflict
from moderation.evidence import service as evidence
from moderation.review.models import Hit, ReviewStatus
from moderation.review.service import was_escalated
from moderation.webhooks.models import DeliveryStatus, WebhookEvent

DECIDE = "review.decide"
UNDO = "review.undo"


class UndoUnavailable(Conflict):
    code = "undo_unavailable"


def undo(session: Session, event_id: int, actor: str, *, window: timedelta) -> int:
    """Undo the decision audited as `event_id`, made by `actor`; its upload's id."""
    event = session.get(AuditEvent, event_id, with_for_update=True)
    if event is None or event.action != DECIDE or event.actor != actor:
        raise UndoUnavailable(f"decision {event_id} is not one of yours to undo")
    # now() - created_at is an interval (a timedelta), whatever the typing of `-` says.
    age: Any = session.scalar(
        select(func.now() - AuditEvent.created_at).where(AuditEvent.id == event_id)
    )
    if not isinstance(age, timedelta) or age > window:
        raise UndoUnavailable(
            f"decision {event_id} can no longer be undone: undo lasts "
            f"{window.total_seconds():g} s (MODERATION_REVIEW_UNDO_SECONDS)"
        )
    upload_id = int(event.subject_id)
    before = event.before or {}
    after = event.after or {}
    moved = {int(id_): ReviewStatus(status) for id_, status in after.get("hits", {}).items()}
    earlier = before.get("reviews", {})
    hits = {
        hit.id: hit
        for hit in session.scalars(
            select(Hit)
            .where(Hit.upload_id == upload_id)
            .order_by(Hit.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    }
    for hit_id, status in moved.items():
        hit = hits.get(hit_id)
        if hit is None or hit.review_status is not status or hit.reviewed_by != actor:
            raise UndoUnavailable(
                f"upload {upload_id} changed after your decision (undone already, or decided "
                "again): there is nothing of yours to undo"
            )
    _withdraw_announcement(session, upload_id, event.created_at)
    for hit_id in moved:
        hit = hits[hit_id]
        was = earlier.get(str(hit_id), {})
        hit.review_status = ReviewStatus(before["hits"][str(hit_id)])
        hit.reviewed_by = was.get("by")
        hit.reviewed_at = datetime.fromisoformat(was["at"]) if was.get("at") else None
        hit.review_note = was.get("note")
    session.flush()
    if after.get("outcome") == "escalate" and not was_escalated(session, upload_id):
        evidence.release(session, upload_id, actor=actor)
    audit.record(
        session,
        actor=actor,
        action=UNDO,
        subject_type="upload",
        subject_id=upload_id,
        before={"hits": {str(id_): status.value for id_, status in moved.items()}},
        after={"undid": event_id, "hits": before.get("hits", {})},
    )
    return upload_id


def _withdraw_announcement(session: Session, upload_id: int, decided_at: datetime) -> None:
    """Drop the decision's webhook event (written in its transaction, so at its time);
    refuse if a sender already took it."""
    events = WebhookEvent.upload_id == upload_id, WebhookEvent.created_at == decided_at
    sent = session.scalar(
        select(func.count()).where(
            *events,
            (WebhookEvent.attempts > 0) | (WebhookEvent.status != DeliveryStatus.PENDING),
        )
    )
    if sent:
        raise UndoUnavailable(
            f"the decision on upload {upload_id} was already sent to the upload service"
        )
    session.execute(delete(WebhookEvent).where(*events))
