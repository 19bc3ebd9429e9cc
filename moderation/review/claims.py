"""Claims: a reviewer takes a batch of cards for a while, so that two never work the same
upload.

A claim is a lease on an upload's card (`ReviewClaim`, one row per upload). Taking a batch
claims the next cards of the queue, in its order, that nobody holds; a card whose lease
has run out is anyone's again (a reviewer who went home holds nothing for long). Two
reviewers claiming at once get disjoint batches: each card is taken by one `INSERT .. ON
CONFLICT` that only replaces an expired lease, so the loser of a race on a card simply
does not get it, and takes the next one. A decision takes the lease for its transaction
(`take_for_decision`): a card a colleague holds is theirs until their lease ends.
Deciding a card ends the decider's claim on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from moderation.config import Settings
from moderation.errors import Conflict
from moderation.review.cards import Order, queue
from moderation.review.models import ReviewClaim
from moderation.review.service import QueueFilter

PENDING = QueueFilter()
# Passes over the queue when a race with a colleague took some of the cards a pass chose.
MAX_PASSES = 5


class ClaimedByColleague(Conflict):
    """The card is leased to another reviewer."""

    code = "claimed_by_colleague"

    def __init__(self, upload_id: int, holder: str, until: datetime) -> None:
        super().__init__(
            f"upload {upload_id} is claimed by {holder} until {until:%H:%M:%S %Z}: it is "
            "theirs to decide; take the next card"
        )
        self.upload_id = upload_id
        self.holder = holder
        self.until = until


@dataclass(frozen=True)
class Claim:
    upload_id: int
    claimed_by: str
    expires_at: datetime


def claim_batch(
    session: Session,
    settings: Settings,
    actor: str,
    *,
    size: int,
    lease: timedelta,
    order: Order,
    filters: QueueFilter = PENDING,
) -> list[int]:
    """Claim up to `size` cards for `actor`, the next ones in `order` that nobody holds;
    renew the actor's live claims too (the batch being worked stays theirs). The uploads
    newly claimed, in order. `settings`: the thresholds the queue's order holds hits with
    none recorded to (`cards.queue`)."""
    expires = func.now() + lease
    session.execute(
        update(ReviewClaim)
        .where(ReviewClaim.claimed_by == actor, ReviewClaim.expires_at > func.now())
        .values(expires_at=expires)
    )
    taken: list[int] = []
    for _ in range(MAX_PASSES):
        wanted = size - len(taken)
        if wanted <= 0:
            break
        page = queue(session, settings, filters, order=order, actor=actor, limit=wanted)
        if not page.cards:
            break
        for card in page.cards:
            statement = (
                insert(ReviewClaim)
                .values(upload_id=card.upload_id, claimed_by=actor, expires_at=expires)
                .on_conflict_do_update(
                    index_elements=[ReviewClaim.upload_id],
                    set_={"claimed_by": actor, "claimed_at": func.now(), "expires_at": expires},
                    where=ReviewClaim.expires_at <= func.now(),
                )
                .returning(ReviewClaim.upload_id)
            )
            if session.scalar(statement) is not None:
                taken.append(card.upload_id)
    return taken


def holder(session: Session, upload_id: int) -> Claim | None:
    """The live claim on an upload's card, if any."""
    row = session.execute(
        select(ReviewClaim.upload_id, ReviewClaim.claimed_by, ReviewClaim.expires_at).where(
            ReviewClaim.upload_id == upload_id, ReviewClaim.expires_at > func.now()
        )
    ).first()
    return Claim(*row) if row else None


def take_for_decision(session: Session, upload_id: int, actor: str, *, lease: timedelta) -> None:
    """Hold the card for `actor`'s decision, in its transaction; refuse a card a colleague
    holds (`ClaimedByColleague`). The claim row stays locked until the decision commits, so
    no colleague can claim the card in between. `release` ends it with the decision."""
    expires = func.now() + lease
    got = session.scalar(
        insert(ReviewClaim)
        .values(upload_id=upload_id, claimed_by=actor, expires_at=expires)
        .on_conflict_do_update(
            index_elements=[ReviewClaim.upload_id],
            set_={"claimed_by": actor, "expires_at": expires},
            where=(ReviewClaim.expires_at <= func.now()) | (ReviewClaim.claimed_by == actor),
        )
        .returning(ReviewClaim.upload_id)
    )
    if got is None:
        live = holder(session, upload_id)
        if live is not None:
            raise ClaimedByColleague(upload_id, live.claimed_by, live.expires_at)


def release(session: Session, upload_id: int, actor: str) -> None:
    """End `actor`'s claim on the card (decided)."""
    session.execute(
        delete(ReviewClaim).where(
            ReviewClaim.upload_id == upload_id, ReviewClaim.claimed_by == actor
        )
    )


def reclaim(session: Session, upload_id: int, actor: str, *, lease: timedelta) -> None:
    """Give the card back to `actor` (an undone decision), unless a colleague holds it."""
    expires = func.now() + lease
    session.execute(
        insert(ReviewClaim)
        .values(upload_id=upload_id, claimed_by=actor, expires_at=expires)
        .on_conflict_do_update(
            index_elements=[ReviewClaim.upload_id],
            set_={"claimed_by": actor, "claimed_at": func.now(), "expires_at": expires},
            where=(ReviewClaim.expires_at <= func.now()) | (ReviewClaim.claimed_by == actor),
        )
    )


def leases_of(session: Session, actor: str) -> dict[int, datetime]:
    """When each of `actor`'s live claims runs out, by upload."""
    rows = session.execute(
        select(ReviewClaim.upload_id, ReviewClaim.expires_at).where(
            ReviewClaim.claimed_by == actor, ReviewClaim.expires_at > func.now()
        )
    )
    return {upload_id: expires_at for upload_id, expires_at in rows}
