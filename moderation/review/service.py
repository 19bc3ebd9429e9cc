"""The review queue and decisions.

The queue: hits newest first, filtered, paged by a keyset cursor over (created_at, id), so
a page never shifts while hits arrive or are decided: a traversal returns each hit that
existed when it started exactly once, and never a hit twice. Hits that arrive during a
traversal are newer than its cursor and show on the next one, from the top. (A hit's
`created_at` is its transaction's start; a hit from a transaction that began before the
cursor's position but committed after a page was read would sort behind that page. Hits
are written by short screening transactions, and a pending hit stays in the queue, so it
shows on the next pass at the latest.)

A decision is on an upload: confirming, dismissing or escalating one hit decides every
open hit (pending or escalated) of its upload together. Hits already confirmed or
dismissed keep their decision: a decision never overturns another reviewer's final one.
Deciding a hit already decided the same way changes nothing (a repeated click, a retried
request); deciding it otherwise is `AlreadyDecided` (HTTP 409), with who decided it. Two
reviewers deciding at once are ordered by row locks on the upload's hits: the second waits,
then sees the first's decision.

Each decision that changes anything writes one audit row (who, what, when, the hits'
statuses before and after) and, for a confirmation, a webhook event, in its transaction.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVarTuple

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    Select,
    String,
    exists,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.banks.models import Bank, BankEntry
from moderation.bulk_insert import ArrayRows, insert_rows_statement
from moderation.config import Settings
from moderation.embedding.models import EmbeddingModel
from moderation.errors import Conflict, Invalid, NotFound
from moderation.evidence import service as evidence
from moderation.evidence.models import Evidence, EvidenceState
from moderation.images.signals import SignalType
from moderation.review.models import Hit, ReviewStatus
from moderation.screening.models import Upload, UploadStatus
from moderation.webhooks import service as webhooks
from moderation.webhooks.models import EventType

if TYPE_CHECKING:
    from moderation.banks.matcher import Match


class Outcome(enum.StrEnum):
    CONFIRM = "confirm"
    DISMISS = "dismiss"
    ESCALATE = "escalate"


STATUS_AFTER = {
    Outcome.CONFIRM: ReviewStatus.CONFIRMED,
    Outcome.DISMISS: ReviewStatus.DISMISSED,
    Outcome.ESCALATE: ReviewStatus.ESCALATED,
}
Columns = TypeVarTuple("Columns")


# Recording hits.

_INSERT_HITS = insert_rows_statement(
    Hit,
    {
        "upload_id": BigInteger,
        "bank_entry_id": BigInteger,
        "signal": String,
        "distance": Float,
        "frame_index": Integer,
        "model_id": BigInteger,
        "threshold": Float,
    },
)


def record_hits(session: Session, matches: Mapping[int, Sequence[Match]], *, notify: bool) -> None:
    """Add the hits screening found, by upload, to the queue, in the caller's transaction
    (the one that records the uploads screened), skipping any already there. A CLIP hit
    names the model whose embeddings matched (`Match.model_id`). `notify`: also queue a
    `hit` webhook event per upload with hits, committed with them."""
    rows = ArrayRows(
        "upload_id", "bank_entry_id", "signal", "distance", "frame_index", "model_id", "threshold"
    )
    for upload_id, found in matches.items():
        for m in found:
            rows.add(
                upload_id,
                m.bank_entry_id,
                m.signal.value,
                m.distance,
                m.frame_index,
                m.model_id if m.signal is SignalType.CLIP else None,
                m.threshold,
            )
    if not rows:
        return
    session.connection().execute(_INSERT_HITS, rows.lists)
    if notify:
        # One statement for the group, in its transaction: the events commit with the hits.
        # Measured (bench/webhooks.py, two loaded cores): 4 ms on a 36 ms group commit of
        # 16 uploads with two hits each, paid only by groups that found hits.
        webhooks.enqueue(session, EventType.HIT, [u for u, found in matches.items() if found])


# Hits a decision may still change.
OPEN_STATUSES = (ReviewStatus.PENDING, ReviewStatus.ESCALATED)


class HitNotFound(NotFound):
    code = "hit_not_found"

    def __init__(self, hit_id: int) -> None:
        super().__init__(f"no hit with id {hit_id}")


class InvalidCursor(Invalid):
    code = "invalid_cursor"

    def __init__(self) -> None:
        super().__init__("the cursor is not one this service returned; start again without it")


class AlreadyDecided(Conflict):
    """The hit has a final decision other than the one asked for."""

    code = "already_decided"

    def __init__(self, hit: Hit) -> None:
        when = f" at {hit.reviewed_at:%Y-%m-%d %H:%M:%S %Z}" if hit.reviewed_at else ""
        super().__init__(
            f"hit {hit.id} was already {hit.review_status.value} by "
            f"{hit.reviewed_by or 'an unknown reviewer'}{when}; a final decision is not changed"
        )
        self.hit_id = hit.id
        self.decided = hit.review_status


@dataclass(frozen=True)
class QueueFilter:
    # None: any status.
    status: ReviewStatus | None = ReviewStatus.PENDING
    bank: str | None = None
    signal: SignalType | None = None
    # created_at in [since, until)
    since: datetime | None = None
    until: datetime | None = None
    retroactive: bool | None = None
    upload_id: int | None = None


@dataclass(frozen=True)
class HitEvidence:
    """A hit and why it fired: the signal, its distance against the threshold, where."""

    hit_id: int
    upload_id: int
    upload_uri: str
    external_id: str | None
    bank_id: int
    bank: str
    bank_entry_id: int
    signal: str
    distance: float
    # What the distance was held to: the bank's CLIP radius (cosine distance), the PDQ
    # threshold (bits), 0 for SHA-256; as recorded when the hit was found. For a hit found
    # before thresholds were recorded, the one the reader's settings put in force now for
    # this signal and bank.
    threshold: float
    # `recorded` (when found); for older hits, where today's comes from: bank, global
    # (CLIP radius), pdq or exact.
    threshold_source: str
    frame_index: int
    model: str | None
    retroactive: bool
    created_at: datetime
    review_status: str
    reviewed_at: datetime | None
    reviewed_by: str | None
    review_note: str | None


@dataclass(frozen=True)
class QueuePage:
    hits: list[HitEvidence]
    # Pass back for the next (older) page; None when this page is the last.
    next_cursor: str | None


def _evidence_query() -> Select[Hit, Upload, Bank, str | None]:
    return (
        select(Hit, Upload, Bank, EmbeddingModel.name)
        .join(Upload, Upload.id == Hit.upload_id)
        .join(BankEntry, BankEntry.id == Hit.bank_entry_id)
        .join(Bank, Bank.id == BankEntry.bank_id)
        .outerjoin(EmbeddingModel, EmbeddingModel.id == Hit.model_id)
    )


def _threshold(hit: Hit, bank: Bank, settings: Settings) -> tuple[float, str]:
    if hit.threshold is not None:
        return hit.threshold, "recorded"
    if hit.signal is SignalType.CLIP:
        if bank.radius is not None:
            return bank.radius, "bank"
        return settings.match_radius, "global"
    if hit.signal is SignalType.PDQ:
        return float(settings.pdq_threshold), "pdq"
    return 0.0, "exact"


def _evidence(
    settings: Settings, hit: Hit, upload: Upload, bank: Bank, model: str | None
) -> HitEvidence:
    threshold, source = _threshold(hit, bank, settings)
    return HitEvidence(
        hit_id=hit.id,
        upload_id=hit.upload_id,
        upload_uri=upload.uri,
        external_id=upload.external_id,
        bank_id=bank.id,
        bank=bank.name,
        bank_entry_id=hit.bank_entry_id,
        signal=hit.signal.value,
        distance=hit.distance,
        threshold=threshold,
        threshold_source=source,
        frame_index=hit.frame_index,
        model=model,
        retroactive=hit.retroactive,
        created_at=hit.created_at,
        review_status=hit.review_status.value,
        reviewed_at=hit.reviewed_at,
        reviewed_by=hit.reviewed_by,
        review_note=hit.review_note,
    )


def _filtered(query: Select[*Columns], filters: QueueFilter) -> Select[*Columns]:
    if filters.status is not None:
        query = query.where(Hit.review_status == filters.status)
    if filters.bank is not None:
        query = query.where(
            Hit.bank_entry_id.in_(
                select(BankEntry.id)
                .join(Bank, Bank.id == BankEntry.bank_id)
                .where(Bank.name == filters.bank)
            )
        )
    if filters.signal is not None:
        query = query.where(Hit.signal == filters.signal)
    if filters.since is not None:
        query = query.where(Hit.created_at >= filters.since)
    if filters.until is not None:
        query = query.where(Hit.created_at < filters.until)
    if filters.retroactive is not None:
        query = query.where(Hit.retroactive.is_(filters.retroactive))
    if filters.upload_id is not None:
        query = query.where(Hit.upload_id == filters.upload_id)
    return query


def encode_cursor(created_at: datetime, hit_id: int) -> str:
    raw = json.dumps([created_at.isoformat(), hit_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, hit_id = json.loads(raw)
        when = datetime.fromisoformat(created_at)
        # `type`, not isinstance: JSON's true is a Python int, and PostgreSQL compares no
        # bigint with a boolean.
        if when.tzinfo is None or type(hit_id) is not int or not 0 < hit_id < 2**63:
            raise InvalidCursor
        # In UTC: PostgreSQL refuses offsets past ±15:59 (and with seconds) that Python
        # parses; a time that leaves the calendar on the way raises OverflowError.
        return when.astimezone(UTC), hit_id
    except (binascii.Error, ValueError, TypeError, OverflowError) as error:
        raise InvalidCursor from error


def queue(
    session: Session,
    settings: Settings,
    filters: QueueFilter = QueueFilter(),
    *,
    cursor: str | None = None,
    limit: int = 50,
) -> QueuePage:
    """A page of hits, newest first, after `cursor` (from the previous page) if given."""
    query = _newest_first(filters)
    if cursor is not None:
        query = query.where(tuple_(Hit.created_at, Hit.id) < tuple_(*decode_cursor(cursor)))
    rows = session.execute(query.limit(limit + 1)).all()
    hits = [_evidence(settings, *row) for row in rows[:limit]]
    more = len(rows) > limit
    next_cursor = encode_cursor(hits[-1].created_at, hits[-1].hit_id) if more else None
    return QueuePage(hits, next_cursor)


def newest(
    session: Session, settings: Settings, filters: QueueFilter, limit: int | None
) -> list[HitEvidence]:
    """Hits matching the filters, newest first: the first `limit`, or all (None)."""
    query = _newest_first(filters).limit(limit)
    return [_evidence(settings, *row) for row in session.execute(query)]


def _newest_first(filters: QueueFilter) -> Select[Hit, Upload, Bank, str | None]:
    """The evidence of the hits matching the filters, in the queue's order (its cursor's)."""
    return _filtered(_evidence_query(), filters).order_by(Hit.created_at.desc(), Hit.id.desc())


def count(session: Session, filters: QueueFilter = QueueFilter()) -> int:
    """Hits matching the filters; with the default filter, the pending ones."""
    query = _filtered(select(func.count()).select_from(Hit), filters)
    return session.scalar(query) or 0


def get_hit(session: Session, settings: Settings, hit_id: int) -> HitEvidence:
    row = session.execute(_evidence_query().where(Hit.id == hit_id)).one_or_none()
    if row is None:
        raise HitNotFound(hit_id)
    return _evidence(settings, *row)


def upload_hits(session: Session, settings: Settings, upload_id: int) -> list[HitEvidence]:
    """Every hit of an upload, whatever its status, in the order they were found."""
    query = _evidence_query().where(Hit.upload_id == upload_id).order_by(Hit.id)
    return [_evidence(settings, *row) for row in session.execute(query)]


def hits_of(
    session: Session, settings: Settings, upload_ids: Collection[int]
) -> dict[int, list[HitEvidence]]:
    """Every hit of each of these uploads, whatever its status, in the order they were found."""
    query = _evidence_query().where(Hit.upload_id.in_(upload_ids)).order_by(Hit.id)
    found: dict[int, list[HitEvidence]] = {}
    for row in session.execute(query):
        evidence = _evidence(settings, *row)
        found.setdefault(evidence.upload_id, []).append(evidence)
    return found


def open_hits(
    session: Session, settings: Settings, upload_ids: Collection[int]
) -> dict[int, list[HitEvidence]]:
    """The open hits of each of these uploads, in the order they were found: what a
    decision on one of their hits would cover, whatever page or filter showed that hit."""
    query = (
        _evidence_query()
        .where(Hit.upload_id.in_(upload_ids), Hit.review_status.in_(OPEN_STATUSES))
        .order_by(Hit.id)
    )
    found: dict[int, list[HitEvidence]] = {}
    for row in session.execute(query):
        evidence = _evidence(settings, *row)
        found.setdefault(evidence.upload_id, []).append(evidence)
    return found


@dataclass(frozen=True)
class Decision:
    upload_id: int
    hit_id: int
    outcome: Outcome
    # False when the hit was already decided so: nothing was written.
    changed: bool
    # The hits this decision moved, with their status before.
    decided: dict[int, ReviewStatus]
    # Every hit of the upload, after the decision.
    hits: list[HitEvidence]
    # The decision's audit event (None when nothing changed): what `undo` names.
    event_id: int | None = None


def decide(
    session: Session,
    settings: Settings,
    hit_id: int,
    outcome: Outcome | str,
    note: str | None,
    actor: str,
    *,
    seen: Collection[int] | None = None,
    undo_window_s: float = 0.0,
) -> Decision:
    """Decide a hit and its upload's other open hits; audit it; on a confirmation, write
    the webhook event. Raises `HitNotFound` or `AlreadyDecided`.

    `seen`: the hits the reviewer was shown with this one. When given, an open hit of the
    upload not among them stays open: it was found after the page was drawn (a retro-hunt,
    a second bank) or never shown, and nobody may dismiss evidence they have not seen.

    `undo_window_s`: the decider may take it back this long (`undo`); its webhook event
    waits as long, so that an undone decision is never announced.

    `settings`: whether webhooks are configured (which decisions write an event), and the
    thresholds the answer shows for hits found before thresholds were recorded.
    """
    outcome = Outcome(outcome)  # a plain "confirm" from a form is welcome too
    upload_id = session.scalar(select(Hit.upload_id).where(Hit.id == hit_id))
    if upload_id is None:
        raise HitNotFound(hit_id)
    # Every hit of the upload, locked in id order (the same order for every decider, so two
    # decisions on one upload queue instead of deadlocking), read afresh after the wait.
    hits = list(
        session.scalars(
            select(Hit)
            .where(Hit.upload_id == upload_id)
            .order_by(Hit.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    )
    named = next((hit for hit in hits if hit.id == hit_id), None)
    if named is None:  # deleted with its upload while we waited
        raise HitNotFound(hit_id)
    target = STATUS_AFTER[outcome]
    if named.review_status is target:
        return Decision(
            upload_id, hit_id, outcome, False, {}, upload_hits(session, settings, upload_id)
        )
    if named.review_status not in OPEN_STATUSES:
        raise AlreadyDecided(named)
    decided_at = session.scalar(select(func.now()))
    decided = {}
    # What the decision overwrites of an earlier reviewer's (an escalation): for `undo`.
    earlier: dict[str, dict[str, str | None]] = {}
    covered = None if seen is None else {hit_id, *seen}
    for hit in hits:
        if covered is not None and hit.id not in covered:
            continue
        if hit.review_status in OPEN_STATUSES and hit.review_status is not target:
            decided[hit.id] = hit.review_status
            if hit.reviewed_by is not None:
                earlier[str(hit.id)] = {
                    "by": hit.reviewed_by,
                    "at": hit.reviewed_at.isoformat() if hit.reviewed_at else None,
                    "note": hit.review_note,
                }
            hit.review_status = target
            hit.reviewed_at = decided_at
            hit.reviewed_by = actor
            hit.review_note = note
    session.flush()
    before: dict[str, Any] = {"hits": {str(id_): status.value for id_, status in decided.items()}}
    if earlier:
        before["reviews"] = earlier
    event = audit.record(
        session,
        actor=actor,
        action="review.decide",
        subject_type="upload",
        subject_id=upload_id,
        before=before,
        after={
            "hit_id": hit_id,
            "outcome": outcome.value,
            "note": note,
            "hits": {str(id_): target.value for id_ in decided},
        },
    )
    if outcome is Outcome.ESCALATE and decided:
        # Escalated evidence is kept past its retention until someone releases it.
        evidence.hold(session, upload_id, actor=actor, reason="escalated")
    _announce(
        session, settings, upload_id, outcome, list(decided), decided_at, delay_s=undo_window_s
    )
    return Decision(
        upload_id,
        hit_id,
        outcome,
        True,
        decided,
        upload_hits(session, settings, upload_id),
        event.id,
    )


def _announce(
    session: Session,
    settings: Settings,
    upload_id: int,
    outcome: Outcome,
    hit_ids: Sequence[int],
    decided_at: datetime | None,
    *,
    delay_s: float = 0.0,
) -> None:
    if outcome is Outcome.CONFIRM and webhooks.enabled(settings):
        event = EventType.CONFIRMED
    elif outcome is Outcome.DISMISS and webhooks.screening_hits_enabled(settings):
        event = EventType.DISMISSED
    else:
        return
    decision = {
        "outcome": outcome.value,
        "decided_at": decided_at.isoformat() if decided_at else None,
    }
    webhooks.enqueue(
        session, event, [upload_id], hit_ids=hit_ids, decision=decision, delay_s=delay_s
    )


def uploads_missing_evidence(
    session: Session, limit: int | None, *, stale_after: timedelta
) -> list[int]:
    """Screened uploads with hits and no evidence (found after screening, or before
    evidence was kept), or whose capture was taken over `stale_after` ago; oldest hit first."""
    stale = (Evidence.state == EvidenceState.CAPTURING) & (
        Evidence.captured_at < func.now() - stale_after
    )
    query = (
        select(Hit.upload_id)
        .join(Upload, Upload.id == Hit.upload_id)
        .where(
            Upload.status == UploadStatus.SCREENED,
            or_(
                ~exists().where(Evidence.upload_id == Hit.upload_id),
                exists().where(Evidence.upload_id == Hit.upload_id, stale),
            ),
        )
        .group_by(Hit.upload_id)
        .order_by(func.min(Hit.id))
        .limit(limit)
    )
    return list(session.scalars(query))


def was_escalated(session: Session, upload_id: int) -> bool:
    """Whether any hit of the upload is escalated now."""
    return bool(
        session.scalar(
            select(
                exists().where(
                    Hit.upload_id == upload_id, Hit.review_status == ReviewStatus.ESCALATED
                )
            )
        )
    )
