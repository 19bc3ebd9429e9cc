"""The review queue's pages: cards by upload in a chosen order, claims, decisions, the page
for a decision that went stale, undo, and a decision form given back after a new login.

A card is an upload (`review.cards`): its hits, its preserved frame, the submitter's
metadata, how long it has waited against the age target. A reviewer claims a batch
(`review.claims`); their cards head the page and nobody else is given them. Each decision
form carries the card's state as drawn (`cards.card_state`); if the upload changed before
the form arrived (a colleague decided or escalated, a hit was found), nothing is written
and the reviewer gets a page showing what changed, with their decision and note ready to
send again. A decision can be undone for `review_undo_seconds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Path, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.audit.models import AuditEvent
from moderation.auth.models import Role
from moderation.config import Settings
from moderation.evidence import service as evidence
from moderation.http.access import AppRuntime, Caller, DbSession, allow
from moderation.http.admission import form_kept_when_refused
from moderation.http.types import form_datetime
from moderation.images.signals import SignalType
from moderation.review import cards, claims, undo
from moderation.review import service as review
from moderation.review.cards import CardKey, Order
from moderation.review.models import Hit, ReviewStatus
from moderation.review.service import HitEvidence, Outcome, QueueFilter
from moderation.screening.models import Upload
from moderation.web import pending_forms, reads
from moderation.web.media import Media, media_for
from moderation.web.rendering import PAGES_TAG, render
from moderation.web.security import check_form_token

router = APIRouter(tags=[PAGES_TAG], include_in_schema=False)

RowId = Annotated[int, Path(ge=1, le=2**63 - 1)]
REVIEWERS = allow(Role.REVIEWER)
# Set after a decision for as long as it can be undone: the queue page offers the undo.
UNDO_COOKIE = "moderation_undo"
# The queue's status filter: a review status, or every status.
QUEUE_STATUSES = (*(status.value for status in ReviewStatus), "any")
FOUND = {"": None, "screening": False, "retroactive": True}
OPEN = {status.value for status in review.OPEN_STATUSES}


def local_path(target: str | None) -> str | None:
    """`target` if it is a path on this site (so a form cannot send people away)."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return None


def _query_url(path: str, params: dict[str, str]) -> str:
    kept = {name: value for name, value in params.items() if value}
    return f"{path}?{urlencode(kept)}" if kept else path


def age_text(seconds: float) -> str:
    """A card's age as a reviewer reads it: 45 s, 12 min, 3 h 05 min, 2 d 4 h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


@dataclass(frozen=True)
class UploadCard:
    """One upload on a queue page: every hit of it (a decision covers its open ones, and
    only those shown: `seen`), its evidence, who sent it and how long it has waited."""

    upload_id: int
    external_id: str | None
    hits: list[HitEvidence]
    media: Media
    metadata: dict[str, Any] | None
    key: CardKey | None
    age_s: float
    over_target: bool
    # The caller's lease on the card, when they hold one.
    claimed_until: datetime | None = None

    @property
    def age(self) -> str:
        return age_text(self.age_s)

    @property
    def open_hit_ids(self) -> list[int]:
        return [hit.hit_id for hit in self.hits if hit.review_status in OPEN]

    @property
    def seen(self) -> str:
        """The open hits shown, for the decision form: a hit found after the page was drawn
        is not among them, and stays open."""
        return ",".join(map(str, self.open_hit_ids))

    @property
    def state(self) -> str:
        return cards.card_state(self.hits)


def build_cards(
    session: Session,
    keys: list[CardKey],
    settings: Settings,
    *,
    claimed_until: dict[int, datetime] | None = None,
) -> list[UploadCard]:
    upload_ids = [key.upload_id for key in keys]
    if not upload_ids:
        return []
    hits = review.hits_of(session, settings, upload_ids)
    kept = evidence.evidence_for(session, upload_ids)
    uploads = {
        upload.id: upload
        for upload in session.scalars(select(Upload).where(Upload.id.in_(upload_ids)))
    }
    now = session.scalar(select(func.now())) or datetime.now(UTC)
    target_s = settings.review_age_target_hours * 3600
    built = []
    for key in keys:
        upload = uploads[key.upload_id]
        its_hits = hits.get(key.upload_id, [])
        age_s = (now - key.waiting_since).total_seconds()
        built.append(
            UploadCard(
                upload_id=key.upload_id,
                external_id=upload.external_id,
                hits=its_hits,
                media=media_for(settings, key.upload_id, kept.get(key.upload_id), its_hits),
                metadata=upload.event_metadata,
                key=key,
                age_s=age_s,
                over_target=age_s > target_s,
                claimed_until=(claimed_until or {}).get(key.upload_id),
            )
        )
    return built


@dataclass(frozen=True)
class UndoOffer:
    event_id: int
    upload_id: int
    outcome: str
    # Seconds left to undo.
    left_s: float


def _undo_offer(
    request: Request, session: Session, actor: str, settings: Settings
) -> UndoOffer | None:
    raw = request.cookies.get(UNDO_COOKIE, "")
    if not raw.isdigit() or len(raw) > 18:
        return None
    row = session.execute(
        select(AuditEvent, (func.now() - AuditEvent.created_at).label("age")).where(
            AuditEvent.id == int(raw),
            AuditEvent.action == undo.DECIDE,
            AuditEvent.actor == actor,
        )
    ).first()
    if row is None:
        return None
    event, age = row
    assert isinstance(age, timedelta)
    left = settings.review_undo_seconds - age.total_seconds()
    if left <= 0:
        return None
    return UndoOffer(event.id, int(event.subject_id), (event.after or {}).get("outcome", ""), left)


@router.get("/review", openapi_extra=REVIEWERS)
def queue_page(
    request: Request,
    session: DbSession,
    runtime: AppRuntime,
    caller: Caller,
    status_: Annotated[str, Query(alias="status")] = ReviewStatus.PENDING.value,
    bank: str = "",
    signal: str = "",
    found: str = "",
    since: str = "",
    until: str = "",
    order: Order = Order.PRIORITY,
    cursor: Annotated[str, Query(max_length=400)] = "",
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> HTMLResponse:
    """The review queue: a card per upload in the chosen order, the caller's claimed cards
    first, counts of uploads (claimed by colleagues, over the age target), and paging."""
    if status_ not in QUEUE_STATUSES or signal not in ("", *SignalType) or found not in FOUND:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"status must be one of {', '.join(QUEUE_STATUSES)}; signal one of "
            f"{', '.join(SignalType)}; found one of screening, retroactive",
        )
    settings = runtime.settings
    filters = QueueFilter(
        status=None if status_ == "any" else ReviewStatus(status_),
        bank=bank or None,
        signal=SignalType(signal) if signal else None,
        since=form_datetime(since, "since"),
        until=form_datetime(until, "until"),
        retroactive=FOUND[found],
    )
    actor = caller.actor
    page = cards.queue(
        session, settings, filters, order=order, actor=actor, cursor=cursor or None, limit=limit
    )
    mine: list[UploadCard] = []
    if not cursor:
        held = cards.claimed_by(session, settings, filters, order=order, actor=actor)
        leases = claims.leases_of(session, actor)
        mine = build_cards(session, held, settings, claimed_until=leases)
    target_s = settings.review_age_target_hours * 3600
    form = {
        "status": status_,
        "bank": bank,
        "signal": signal,
        "found": found,
        "since": since,
        "until": until,
        "order": order.value,
        "limit": str(limit),
    }
    params = {
        **form,
        "status": "" if status_ == ReviewStatus.PENDING.value else status_,
        "limit": "" if limit == 50 else str(limit),
        "order": "" if order is Order.PRIORITY else order.value,
    }
    pending = QueueFilter()
    return render(
        request,
        "queue.html",
        {
            "form": form,
            "filtered": filters != pending,
            "statuses": QUEUE_STATUSES,
            "signals": [signal.value for signal in SignalType],
            "orders": [order.value for order in Order],
            "banks": reads.bank_list(session),
            "mine": mine,
            "uploads": build_cards(session, page.cards, settings),
            "pending": cards.counts(session, settings, pending, actor=actor, target_s=target_s),
            "matching": cards.counts(session, settings, filters, actor=actor, target_s=target_s),
            "age_target_h": settings.review_age_target_hours,
            "claim_batch": settings.review_claim_batch,
            "claim_minutes": settings.review_claim_minutes,
            "undo": _undo_offer(request, session, actor, settings),
            "cursor": cursor,
            "here": _query_url("/review", {**params, "cursor": cursor}),
            "first_page": _query_url("/review", params),
            "next_page": page.next_cursor
            and _query_url("/review", {**params, "cursor": page.next_cursor}),
        },
    )


@router.post("/review/claim", openapi_extra=REVIEWERS)
def claim(
    request: Request,
    session: DbSession,
    runtime: AppRuntime,
    caller: Caller,
    order: Annotated[Order, Form()] = Order.PRIORITY,
    back: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    """Claim the next batch of cards (and renew the caller's lease on those they hold)."""
    check_form_token(request, csrf)
    settings = runtime.settings
    claims.claim_batch(
        session,
        settings,
        caller.actor,
        size=settings.review_claim_batch,
        lease=timedelta(minutes=settings.review_claim_minutes),
        order=order,
    )
    session.commit()  # before the redirect: the page asked for next shows the claims
    return RedirectResponse(local_path(back) or "/review", status.HTTP_303_SEE_OTHER)


# A decision form is small (an outcome, a note, the ids of the hits shown); kept for after
# the next login when the reviewer's session has lapsed (`pending_forms`).
DECISION_FORM_BYTES = 256 * 1024


@router.post(
    "/review/hits/{hit_id}/decision",
    openapi_extra={**REVIEWERS, **form_kept_when_refused(DECISION_FORM_BYTES)},
)
def decide(
    request: Request,
    session: DbSession,
    runtime: AppRuntime,
    caller: Caller,
    hit_id: RowId,
    outcome: Annotated[Outcome, Form()],
    note: Annotated[str, Form(max_length=4000)] = "",
    back: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
    seen: Annotated[str, Form(max_length=200_000, pattern=r"^[0-9]*(,[0-9]+)*$")] = "",
    state: Annotated[
        str, Form(max_length=400_000, pattern=r"^([0-9]+:[a-z]+(,[0-9]+:[a-z]+)*)?$")
    ] = "",
    resumed: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Decide a hit, and with it the open hits of its upload that the page showed (`seen`,
    comma-separated ids); back to the queue. With `state` (the card as drawn), an upload
    that changed since is not decided: the answer is a page showing what changed. With
    `resumed`, the token of a kept form this decision was given back from."""
    check_form_token(request, csrf)
    settings = runtime.settings
    target = review.get_hit(session, settings, hit_id)
    upload_id = target.upload_id
    fields = {"outcome": outcome.value, "note": note, "back": back}
    # Taking the card and checking it, undone together if the decision cannot go ahead.
    checks = session.begin_nested()
    try:
        claims.take_for_decision(
            session,
            upload_id,
            caller.actor,
            lease=timedelta(minutes=settings.review_claim_minutes),
        )
    except claims.ClaimedByColleague as claimed:
        checks.rollback()
        return _stale_page(
            request, session, settings, hit_id, upload_id, fields, [], claimed=claimed
        )
    if state:
        # Locked, in the order `decide` locks them: nobody changes them before we decide.
        session.execute(
            select(Hit.id).where(Hit.upload_id == upload_id).order_by(Hit.id).with_for_update()
        )
        changed = cards.changes(review.upload_hits(session, settings, upload_id), state)
        if changed:
            checks.rollback()
            return _stale_page(request, session, settings, hit_id, upload_id, fields, changed)
    checks.commit()
    decision = review.decide(
        session,
        settings,
        hit_id,
        outcome,
        note.strip() or None,
        caller.actor,
        seen=[int(id_) for id_ in seen.split(",") if id_],
        undo_window_s=settings.review_undo_seconds,
    )
    claims.release(session, upload_id, caller.actor)
    if resumed:  # sent from the page that gave a kept form back: that form is done with
        pending_forms.discard(session, resumed)
    # Committed before the redirect: the queue the browser asks for next must not show it.
    session.commit()
    response = RedirectResponse(local_path(back) or "/review", status.HTTP_303_SEE_OTHER)
    if decision.event_id is not None and settings.review_undo_seconds > 0:
        response.set_cookie(
            UNDO_COOKIE,
            str(decision.event_id),
            max_age=max(1, int(settings.review_undo_seconds + 0.999)),
            path="/review",
            secure=True,
            httponly=True,
            samesite="strict",
        )
    return response


def _stale_page(
    request: Request,
    session: Session,
    settings: Settings,
    hit_id: int,
    upload_id: int,
    fields: dict[str, str],
    changed: list[cards.Change],
    *,
    claimed: claims.ClaimedByColleague | None = None,
) -> HTMLResponse:
    """The upload changed since the reviewer's page was drawn (or a colleague holds it):
    what changed, the card as it is now, and the reviewer's decision ready to send again."""
    card = _card_now(session, settings, upload_id)
    open_ids = card.open_hit_ids
    return render(
        request,
        "stale.html",
        {
            "card": card,
            "changes": changed,
            "claimed": claimed,
            "fields": fields,
            # Go on with the same outcome on the card as it is now: any open hit names it.
            "action": f"/review/hits/{hit_id if hit_id in open_ids else open_ids[0]}/decision"
            if open_ids and claimed is None
            else None,
            "back": local_path(fields.get("back")) or "/review",
        },
        status.HTTP_409_CONFLICT,
    )


def _card_now(session: Session, settings: Settings, upload_id: int) -> UploadCard:
    """One upload's card as it is now, for a page about a decision on it (not the queue's
    order: its key carries no priority)."""
    hits = review.upload_hits(session, settings, upload_id)
    key = CardKey(upload_id, False, 0.0, min(hit.created_at for hit in hits), len(hits))
    (card,) = build_cards(session, [key], settings)
    return card


@router.post("/review/decisions/{event_id}/undo", openapi_extra=REVIEWERS)
def undo_decision(
    request: Request,
    session: DbSession,
    runtime: AppRuntime,
    caller: Caller,
    event_id: RowId,
    back: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    """Take back one's own decision within the undo window; the card is one's own again."""
    check_form_token(request, csrf)
    settings = runtime.settings
    upload_id = undo.undo(
        session,
        event_id,
        caller.actor,
        window=timedelta(seconds=settings.review_undo_seconds),
    )
    claims.reclaim(
        session, upload_id, caller.actor, lease=timedelta(minutes=settings.review_claim_minutes)
    )
    session.commit()
    response = RedirectResponse(local_path(back) or "/review", status.HTTP_303_SEE_OTHER)
    response.delete_cookie(UNDO_COOKIE, path="/review", secure=True, httponly=True)
    return response


@router.get("/review/resume/{token}", openapi_extra=REVIEWERS)
def resume(
    request: Request,
    session: DbSession,
    runtime: AppRuntime,
    token: Annotated[str, Path(max_length=64)],
) -> HTMLResponse:
    """A decision form the reviewer sent after their session had ended, given back as they
    filled it in, to send now from this session."""
    kept = pending_forms.find(session, token)
    if kept is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            "this saved decision was already used, or it expired: decide from the queue",
        )
    hit_id = int(kept.action.rstrip("/").split("/")[-2])
    settings = runtime.settings
    card = _card_now(session, settings, review.get_hit(session, settings, hit_id).upload_id)
    fields = kept.fields
    return render(
        request,
        "resume.html",
        {
            "card": card,
            "action": kept.action,
            "fields": fields,
            "back": local_path(fields.get("back")) or "/review",
            "resumed": (pending_forms.RESUMED_FIELD, token),
        },
    )


def is_decision(request: Request) -> bool:
    """Whether the request posts a decision form (what a lost session must not lose)."""
    route = request.scope.get("route")
    return request.method == "POST" and getattr(route, "endpoint", None) is decide


__all__ = ["REVIEWERS", "RowId", "UploadCard", "build_cards", "local_path", "router"]
