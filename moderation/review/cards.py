"""The review queue as a team works it: one card per upload, not per hit, in an order a
lead chooses, each card with how long it has waited.

A decision is on an upload (`service.decide`), so the queue counts and pages uploads: an
upload with three hits is one card. Two orders:

- `priority`: the strongest evidence first. Exact-hash (SHA-256) matches before anything
  else, then by signal strength, the best hit's distance as a fraction of the threshold it
  was held to (0 is an exact copy, 1 is at the threshold), then the longest waiting.
- `oldest`: the longest waiting first (a service-level target on age).

A card's age runs from its oldest open hit. Pages follow a keyset cursor over the order's
own key, so a page never shifts while others decide. Cards claimed by a colleague
(`claims`) are left out; the caller's own claims are listed on their own (`claimed_by`).

A card's state (`card_state`) is what the page showed of it: each hit and its status. A
decision sent with the state it was drawn with is checked against the state now
(`changes`): if a colleague decided, escalated, or a new hit arrived, the reviewer is shown
what changed before anything is written.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Float,
    Select,
    and_,
    case,
    cast,
    exists,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Exists, Subquery

from moderation.config import Settings
from moderation.images.signals import SignalType
from moderation.review.models import Hit, ReviewClaim
from moderation.review.service import (
    HitEvidence,
    InvalidCursor,
    QueueFilter,
    _filtered,
)


class Order(enum.StrEnum):
    PRIORITY = "priority"
    OLDEST = "oldest"


@dataclass(frozen=True)
class CardKey:
    """Where a card sits in the queue, and what the page shows of its standing."""

    upload_id: int
    # Any exact-hash (SHA-256) hit among the card's hits.
    exact: bool
    # The best hit's distance / its threshold: 0 an exact copy, 1 at the threshold.
    strength: float
    # The card's oldest hit: its age runs from here.
    waiting_since: datetime
    hits: int


@dataclass(frozen=True)
class CardPage:
    cards: list[CardKey]
    # Pass back for the next page; None when this page is the last.
    next_cursor: str | None


def _strength(settings: Settings) -> ColumnElement[float]:
    """A hit's distance as a fraction of its threshold. Hits found before thresholds were
    recorded are held to the global one in `settings` (a bank's own radius is not looked
    up here)."""
    fallback = case(
        (Hit.signal == SignalType.PDQ, literal(float(settings.pdq_threshold))),
        else_=literal(settings.match_radius),
    )
    threshold = func.coalesce(Hit.threshold, fallback)
    return case(
        (Hit.signal == SignalType.SHA256, literal(0.0)),
        (threshold <= 0, literal(0.0)),
        else_=cast(Hit.distance, Float) / threshold,
    )


def _cards(settings: Settings, filters: QueueFilter) -> Select[int, bool, float, datetime, int]:
    return (
        _filtered(select(Hit.upload_id), filters)
        .with_only_columns(
            Hit.upload_id.label("upload_id"),
            func.bool_or(Hit.signal == SignalType.SHA256).label("exact"),
            func.min(_strength(settings)).label("strength"),
            func.min(Hit.created_at).label("waiting_since"),
            func.count().label("hits"),
        )
        .group_by(Hit.upload_id)
    )


def _live_claim(
    upload_id: ColumnElement[int] | InstrumentedAttribute[int],
    *,
    by: str | None = None,
    not_by: str | None = None,
) -> Exists:
    condition: ColumnElement[bool] = and_(
        ReviewClaim.upload_id == upload_id, ReviewClaim.expires_at > func.now()
    )
    if by is not None:
        condition = and_(condition, ReviewClaim.claimed_by == by)
    if not_by is not None:
        condition = and_(condition, ReviewClaim.claimed_by != not_by)
    return exists().where(condition)


def _ordered(
    query: Select[int, bool, float, datetime, int], order: Order
) -> tuple[Subquery, tuple[ColumnElement[Any], ...]]:
    cards = query.subquery()
    rank = case((cards.c.exact, literal(0)), else_=literal(1))
    if order is Order.PRIORITY:
        return cards, (rank, cards.c.strength, cards.c.waiting_since, cards.c.upload_id)
    return cards, (cards.c.waiting_since, cards.c.upload_id)


def encode_cursor(order: Order, key: CardKey) -> str:
    values: list[object] = (
        [0 if key.exact else 1, key.strength] if order is Order.PRIORITY else []
    ) + [key.waiting_since.isoformat(), key.upload_id]
    raw = json.dumps([order.value, values], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, order: Order) -> tuple[object, ...]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        named, values = json.loads(raw)
        if named != order.value:
            raise InvalidCursor
        *head, since, upload_id = values
        when = datetime.fromisoformat(since)
        if when.tzinfo is None or not isinstance(upload_id, int) or not 0 < upload_id < 2**63:
            raise InvalidCursor
        if order is Order.PRIORITY:
            rank, strength = head
            if rank not in (0, 1) or not isinstance(strength, int | float):
                raise InvalidCursor
            return (rank, float(strength), when, upload_id)
        if head:
            raise InvalidCursor
        return (when, upload_id)
    except (binascii.Error, ValueError, TypeError, OverflowError) as error:
        raise InvalidCursor from error


def queue(
    session: Session,
    settings: Settings,
    filters: QueueFilter,
    *,
    order: Order,
    actor: str,
    cursor: str | None = None,
    limit: int = 50,
) -> CardPage:
    """A page of cards in `order`, after `cursor`: those nobody holds a live claim on
    (the caller's own claims are `claimed_by`'s)."""
    query = _cards(settings, filters).where(~_live_claim(Hit.upload_id))
    cards, key = _ordered(query, order)
    statement = select(cards).order_by(*key)
    if cursor is not None:
        statement = statement.where(tuple_(*key) > tuple_(*decode_cursor(cursor, order)))
    rows = session.execute(statement.limit(limit + 1)).all()
    found = [CardKey(*row) for row in rows[:limit]]
    more = len(rows) > limit
    return CardPage(found, encode_cursor(order, found[-1]) if more else None)


def claimed_by(
    session: Session, settings: Settings, filters: QueueFilter, *, order: Order, actor: str
) -> list[CardKey]:
    """The cards `actor` holds a live claim on, in `order` (a batch is small: no paging)."""
    query = _cards(settings, filters).where(_live_claim(Hit.upload_id, by=actor))
    cards, key = _ordered(query, order)
    statement = select(cards).order_by(*key)
    return [CardKey(*row) for row in session.execute(statement)]


@dataclass(frozen=True)
class QueueCounts:
    # Uploads with a hit matching the filters (pending ones, by default).
    uploads: int
    # Of those, claimed by a colleague now / by the caller.
    claimed_by_others: int
    claimed_by_me: int
    # Of those, waiting longer than the age target.
    over_target: int


def counts(
    session: Session, settings: Settings, filters: QueueFilter, *, actor: str, target_s: float
) -> QueueCounts:
    cards = _cards(settings, filters).subquery()
    others = _live_claim(cards.c.upload_id, not_by=actor)
    mine = _live_claim(cards.c.upload_id, by=actor)
    overdue = cards.c.waiting_since < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, target_s)
    row = session.execute(
        select(
            func.count(),
            func.count().filter(others),
            func.count().filter(mine),
            func.count().filter(overdue),
        ).select_from(cards)
    ).one()
    return QueueCounts(*row)


# A card's state as the page drew it.


def card_state(hits: Sequence[HitEvidence]) -> str:
    """What the page showed of an upload's card: each hit and its status, `id:status`."""
    return ",".join(f"{hit.hit_id}:{hit.review_status}" for hit in sorted(hits, key=_id))


def _id(hit: HitEvidence) -> int:
    return hit.hit_id


def parse_state(state: str) -> dict[int, str]:
    drawn: dict[int, str] = {}
    for part in filter(None, state.split(",")):
        hit_id, _, status = part.partition(":")
        drawn[int(hit_id)] = status
    return drawn


@dataclass(frozen=True)
class Change:
    hit: HitEvidence
    # The status the page showed; None for a hit found since.
    was: str | None

    @property
    def new(self) -> bool:
        return self.was is None


def changes(hits: Sequence[HitEvidence], drawn: str) -> list[Change]:
    """How the upload's hits now differ from the state the page was drawn with."""
    then = parse_state(drawn)
    return [
        Change(hit, then.get(hit.hit_id))
        for hit in sorted(hits, key=_id)
        if then.get(hit.hit_id) != hit.review_status
    ]


__all__ = [
    "CardKey",
    "CardPage",
    "Change",
    "Order",
    "QueueCounts",
    "card_state",
    "changes",
    "claimed_by",
    "counts",
    "queue",
]
