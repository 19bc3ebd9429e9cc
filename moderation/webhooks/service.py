"""The outbox: writing events with the change they announce, and claiming, recording and
listing them for the senders and operators.

Writing: an event row is inserted by the transaction of the decision (or of the screening
group) itself, so it exists exactly when the change committed. Its payload is a snapshot
built by PostgreSQL in the same statement (one statement for any number of uploads), so
the screening hot path pays one multi-row INSERT per group that found hits.

Delivering (`webhooks.sender`): a sender claims one due event in a short transaction,
which hides it from other senders for a lease; posts it with no transaction open; then
records the attempt. A sender that dies mid-delivery leaves the event to be claimed again
when the lease runs out, so delivery is at least once and the receiver drops repeats by
the idempotency key.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Float, bindparam, case, func, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Session

from moderation.config import Settings
from moderation.errors import NotFound
from moderation.webhooks.models import DeliveryStatus, EventType, WebhookAttempt, WebhookEvent


class EventNotFound(NotFound):
    code = "event_not_found"

    def __init__(self, event_id: int) -> None:
        super().__init__(f"no webhook event with id {event_id}; `moderation webhooks list`")


def enabled(settings: Settings) -> bool:
    """Whether events are written at all: only while a receiver is configured, so that an
    installation without webhooks does not grow an outbox nobody empties."""
    return bool(settings.webhook_url)


def screening_hits_enabled(settings: Settings) -> bool:
    return enabled(settings) and settings.webhook_on_screening_hit


# The payload, built in the writing transaction. `hit_ids` NULL means every hit of the upload.
_ENQUEUE = text(
    """
    INSERT INTO webhook_events (event_type, upload_id, next_attempt_at, payload)
    SELECT :event_type, u.id, now() + make_interval(secs => :delay_s), jsonb_build_object(
        'upload', jsonb_build_object('id', u.id, 'external_id', u.external_id, 'uri', u.uri),
        'hits', (
            SELECT coalesce(jsonb_agg(jsonb_build_object(
                'id', h.id,
                'bank', b.name,
                'bank_entry_id', h.bank_entry_id,
                'signal', h.signal,
                'distance', h.distance,
                'frame_index', h.frame_index,
                'model', m.name,
                'retroactive', h.retroactive,
                'review_status', h.review_status
            ) ORDER BY h.id), '[]'::jsonb)
            FROM hits h
            JOIN bank_entries e ON e.id = h.bank_entry_id
            JOIN banks b ON b.id = e.bank_id
            LEFT JOIN embedding_models m ON m.id = h.model_id
            WHERE h.upload_id = u.id AND (:hit_ids IS NULL OR h.id = ANY(:hit_ids))
        ),
        'decision', CAST(:decision AS jsonb)
    )
    FROM uploads u
    WHERE u.id = ANY(:upload_ids)
    ORDER BY u.id
    """
).bindparams(
    bindparam("upload_ids", type_=ARRAY(BigInteger)),
    bindparam("hit_ids", type_=ARRAY(BigInteger)),
    bindparam("decision", type_=JSONB),
    bindparam("delay_s", type_=Float),
)


def enqueue(
    session: Session,
    event_type: EventType,
    upload_ids: Sequence[int],
    *,
    hit_ids: Sequence[int] | None = None,
    decision: dict[str, Any] | None = None,
    delay_s: float = 0.0,
) -> None:
    """Write one event per upload, in the caller's transaction. The caller checks `enabled`.
    `delay_s`: no sender takes it before then (a decision that may still be undone)."""
    if not upload_ids:
        return
    session.connection().execute(
        _ENQUEUE,
        {
            "event_type": event_type.value,
            "upload_ids": list(upload_ids),
            "hit_ids": None if hit_ids is None else list(hit_ids),
            "decision": decision,
            "delay_s": delay_s,
        },
    )


@dataclass(frozen=True)
class ClaimedEvent:
    id: int
    idempotency_key: uuid.UUID
    event_type: str
    payload: dict[str, Any]
    created_at: datetime
    # This claim's number: 1 for the first attempt.
    attempt: int
    lease_token: uuid.UUID


def claim_due(
    session: Session, *, lease_s: float, give_up_after_s: float, limit: int = 1
) -> list[ClaimedEvent]:
    """Take up to `limit` due events for this sender, hidden from the others for `lease_s`.

    SKIP LOCKED lets concurrent senders pass over each other's rows instead of queueing on
    them; the lease outlives this short transaction, so the caller commits at once.

    An event tried before and due again past its give-up time is failed here, not claimed:
    its attempts end even when none of them could be recorded (a sender that died, or
    whose record was refused, every time), which `record_attempt` alone cannot see. (One
    never tried is tried once, however old: the sender may just have been down.)
    """
    session.execute(
        update(WebhookEvent)
        .where(
            WebhookEvent.status == DeliveryStatus.PENDING,
            WebhookEvent.next_attempt_at <= func.now(),
            WebhookEvent.attempts > 0,
            func.now() >= _give_up_at(give_up_after_s),
        )
        .values(
            status=DeliveryStatus.FAILED,
            lease_token=None,
            last_error=func.coalesce(WebhookEvent.last_error, "no attempt could be recorded")
            + " (given up: MODERATION_WEBHOOK_GIVE_UP_AFTER_S passed)",
        )
    )
    token = uuid.uuid4()
    due = (
        select(WebhookEvent.id)
        .where(
            WebhookEvent.status == DeliveryStatus.PENDING,
            WebhookEvent.next_attempt_at <= func.now(),
        )
        .order_by(WebhookEvent.next_attempt_at, WebhookEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    statement = (
        update(WebhookEvent)
        .where(WebhookEvent.id.in_(due))
        .values(
            attempts=WebhookEvent.attempts + 1,
            lease_token=token,
            next_attempt_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, lease_s),
        )
        .returning(
            WebhookEvent.id,
            WebhookEvent.idempotency_key,
            WebhookEvent.event_type,
            WebhookEvent.payload,
            WebhookEvent.created_at,
            WebhookEvent.attempts,
        )
    )
    rows = session.connection().execute(statement).all()
    return [
        ClaimedEvent(id_, key, str(kind), payload, created, attempts, token)
        for id_, key, kind, payload, created, attempts in sorted(rows)
    ]


@dataclass(frozen=True)
class AttemptOutcome:
    started_at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# An attempt's error text kept, at most.
ERROR_TEXT_CHARS = 500


def storable_error(text: str) -> str:
    """A receiver's words, made safe to store and show: at most `ERROR_TEXT_CHARS`, and
    every character that is not printable (NUL, which PostgreSQL text cannot hold; a lone
    surrogate, which UTF-8 cannot; control characters, which a terminal obeys) replaced.
    A NUL once made the attempt's INSERT fail, so the event was never marked failed and was
    posted again forever."""
    text = text[:ERROR_TEXT_CHARS]
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


def _give_up_at(give_up_after_s: float) -> Any:
    return WebhookEvent.pending_since + func.make_interval(0, 0, 0, 0, 0, 0, give_up_after_s)


def retry_delay_s(attempt: int, settings: Settings) -> float:
    """Doubling from the base, capped; between half and all of it, so that senders that
    failed together do not all come back together."""
    delay = min(settings.webhook_retry_max_s, settings.webhook_retry_base_s * 2.0 ** (attempt - 1))
    jitter: float = random.uniform(0.5, 1.0)
    return delay * jitter


def record_attempt(
    session: Session,
    event: ClaimedEvent,
    outcome: AttemptOutcome,
    *,
    sender: str,
    settings: Settings,
) -> None:
    """Store the attempt, and mark the event delivered or due again after a backoff."""
    session.add(
        WebhookAttempt(
            event_id=event.id,
            attempt=event.attempt,
            sender=sender,
            started_at=outcome.started_at,
            duration_ms=outcome.duration_ms,
            status_code=outcome.status_code,
            error=None if outcome.error is None else storable_error(outcome.error),
        )
    )
    if outcome.delivered:
        # Whatever became of the claim meanwhile: the receiver has it.
        session.execute(
            update(WebhookEvent)
            .where(WebhookEvent.id == event.id, WebhookEvent.status != DeliveryStatus.DELIVERED)
            .values(
                status=DeliveryStatus.DELIVERED,
                delivered_at=func.now(),
                lease_token=None,
                last_error=None,
            )
        )
        return
    error = storable_error(outcome.error or f"HTTP {outcome.status_code}")
    delay = retry_delay_s(event.attempt, settings)
    give_up_at = _give_up_at(settings.webhook_give_up_after_s)
    # Only while this claim holds: a sender whose lease ran out while it waited must not
    # push back the retry of whoever claimed the event since.
    session.execute(
        update(WebhookEvent)
        .where(
            WebhookEvent.id == event.id,
            WebhookEvent.lease_token == event.lease_token,
            WebhookEvent.status == DeliveryStatus.PENDING,
        )
        .values(
            next_attempt_at=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, delay),
            lease_token=None,
            last_error=error,
            status=case(
                (func.now() >= give_up_at, DeliveryStatus.FAILED.value),
                else_=DeliveryStatus.PENDING.value,
            ),
        )
    )


def redeliver(session: Session, event_id: int) -> WebhookEvent:
    """Send an event again from now on, whatever its state (a failed one, or one the
    receiver lost); it keeps its idempotency key."""
    event = session.get(WebhookEvent, event_id, with_for_update=True)
    if event is None:
        raise EventNotFound(event_id)
    event.status = DeliveryStatus.PENDING
    event.next_attempt_at = func.now()
    event.pending_since = func.now()
    event.lease_token = None
    session.flush()
    session.refresh(event)
    return event


def list_events(
    session: Session,
    *,
    status: DeliveryStatus | None = None,
    upload_id: int | None = None,
    limit: int | None = 100,
) -> list[WebhookEvent]:
    """Events, newest first."""
    query = select(WebhookEvent).order_by(WebhookEvent.id.desc()).limit(limit)
    if status is not None:
        query = query.where(WebhookEvent.status == status)
    if upload_id is not None:
        query = query.where(WebhookEvent.upload_id == upload_id)
    return list(session.scalars(query))


def count_by_status(session: Session) -> dict[DeliveryStatus, int]:
    rows = session.execute(
        select(WebhookEvent.status, func.count()).group_by(WebhookEvent.status)
    ).all()
    counts = dict.fromkeys(DeliveryStatus, 0)
    counts.update({status: count for status, count in rows})
    return counts


def get_event(session: Session, event_id: int) -> WebhookEvent:
    event = session.get(WebhookEvent, event_id)
    if event is None:
        raise EventNotFound(event_id)
    return event


def attempts_of(session: Session, event_id: int) -> list[WebhookAttempt]:
    return list(
        session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.event_id == event_id)
            .order_by(WebhookAttempt.id)
        )
    )
