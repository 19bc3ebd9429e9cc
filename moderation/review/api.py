"""The review queue over HTTP: reviewers read and decide hits; analysts may read them. And
what became of an upload, with its hits (`GET /v1/uploads/...`), for producers too."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from moderation.auth.models import Role
from moderation.config import Settings
from moderation.http.access import AppRuntime, Caller, DbSession, allow
from moderation.http.types import UtcDatetime
from moderation.images.signals import SignalType
from moderation.review import claims, service
from moderation.review.models import ReviewStatus
from moderation.review.service import HitEvidence, Outcome, QueueFilter
from moderation.screening import service as screening
from moderation.screening.api import MAX_ID
from moderation.screening.models import AS_STORED_FRAME, Upload

router = APIRouter(prefix="/v1/hits", tags=["review"])
# What became of an upload, with its hits.
uploads_router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

# Ids are PostgreSQL bigints: a larger number is no hit, not a database error.
HitId = Annotated[int, Path(ge=1, le=2**63 - 1)]
# PostgreSQL text cannot hold NUL: refused as a bad request, not failed in the driver.
NO_NUL = r"^[^\x00]*$"

READERS = allow(Role.REVIEWER, Role.ANALYST)


class HitOut(BaseModel):
    id: int
    upload_id: int
    upload_uri: str
    external_id: str | None
    bank_id: int
    bank: str
    bank_entry_id: int
    signal: str
    # Cosine distance for CLIP, Hamming bits for PDQ, 0 for SHA-256.
    distance: float
    threshold: float = Field(
        description="What the distance was held to when the hit was found (cosine distance "
        "for CLIP, bits for PDQ, 0 for SHA-256)"
    )
    threshold_source: str = Field(
        description="`recorded` when found; for hits found before thresholds were recorded, "
        "where the one in force now comes from: bank, global, pdq or exact"
    )
    frame_index: int
    model: str | None
    retroactive: bool
    created_at: datetime
    review_status: str
    reviewed_at: datetime | None
    reviewed_by: str | None
    review_note: str | None

    @classmethod
    def of(cls, hit: HitEvidence) -> HitOut:
        fields = vars(hit).copy()
        fields["id"] = fields.pop("hit_id")
        return cls(**fields)


class HitPage(BaseModel):
    hits: list[HitOut]
    # Pass as `cursor` for the next (older) page; null when this page is the last.
    next_cursor: str | None
    # Hits matching the filters (status aside) that are pending.
    pending: int


class DecisionIn(BaseModel):
    outcome: Outcome
    note: str | None = Field(default=None, max_length=4000, pattern=NO_NUL)
    seen_hit_ids: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] | None = Field(
        default=None,
        max_length=10_000,
        description=(
            "The upload's hits the reviewer was shown. When given, the decision covers only "
            "those (and the hit named in the path); any other open hit of the upload, such "
            "as one found since, stays open for review. When absent, every open hit of the "
            "upload is decided."
        ),
    )


class DecisionOut(BaseModel):
    upload_id: int
    hit_id: int
    outcome: Outcome
    # False when the hit was already decided so (a repeated request): nothing changed.
    changed: bool
    # The hits this decision moved.
    decided_hit_ids: list[int]
    # Every hit of the upload, after the decision.
    hits: list[HitOut]


@router.get("", openapi_extra=READERS)
def list_hits(
    session: DbSession,
    runtime: AppRuntime,
    status_: Annotated[
        ReviewStatus | None, Query(alias="status", description="default: pending")
    ] = ReviewStatus.PENDING,
    any_status: Annotated[bool, Query(description="all statuses; overrides status")] = False,
    bank: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
    signal: SignalType | None = None,
    since: UtcDatetime | None = None,
    until: UtcDatetime | None = None,
    retroactive: bool | None = None,
    upload_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> HitPage:
    """The review queue: hits newest first, filtered; page through with `cursor`."""
    filters = QueueFilter(
        status=None if any_status else status_,
        bank=bank,
        signal=signal,
        since=since,
        until=until,
        retroactive=retroactive,
        upload_id=upload_id,
    )
    page = service.queue(session, runtime.settings, filters, cursor=cursor, limit=limit)
    pending = service.count(session, replace(filters, status=ReviewStatus.PENDING))
    return HitPage(
        hits=[HitOut.of(hit) for hit in page.hits], next_cursor=page.next_cursor, pending=pending
    )


@router.get("/{hit_id}", openapi_extra=READERS)
def get_hit(session: DbSession, runtime: AppRuntime, hit_id: HitId) -> HitOut:
    return HitOut.of(service.get_hit(session, runtime.settings, hit_id))


@router.post(
    "/{hit_id}/decision",
    openapi_extra=allow(Role.REVIEWER),
    responses={
        404: {"description": "no such hit"},
        409: {"description": "decided otherwise, or the card is claimed by a colleague"},
    },
)
def decide(
    session: DbSession, runtime: AppRuntime, caller: Caller, hit_id: HitId, body: DecisionIn
) -> DecisionOut:
    """Confirm, dismiss or escalate a hit, and with it every open hit of its upload (or,
    given `seen_hit_ids`, those of them the reviewer saw). Repeating a decision changes
    nothing; contradicting a final one is a 409, as is deciding a card another reviewer
    has claimed (`claimed_by_colleague`) on the review pages."""
    settings = runtime.settings
    upload_id = service.get_hit(session, settings, hit_id).upload_id
    lease = timedelta(minutes=settings.review_claim_minutes)
    claims.take_for_decision(session, upload_id, caller.actor, lease=lease)
    decision = service.decide(
        session, settings, hit_id, body.outcome, body.note, caller.actor, seen=body.seen_hit_ids
    )
    claims.release(session, upload_id, caller.actor)
    return DecisionOut(
        upload_id=decision.upload_id,
        hit_id=decision.hit_id,
        outcome=decision.outcome,
        changed=decision.changed,
        decided_hit_ids=sorted(decision.decided),
        hits=[HitOut.of(hit) for hit in decision.hits],
    )


# Uploads with their hits.


class UploadError(BaseModel):
    code: str
    message: str


class SignalOut(BaseModel):
    signal: str
    frame_index: int
    # Hex digest: SHA-256 of the bytes, or the PDQ hash of one frame.
    value: str
    # PDQ's quality, 0-100; null for SHA-256.
    quality: int | None
    # A PDQ hash of frame 0 as the file stores it, before its EXIF orientation was applied
    # (present only where that turned it): hash lists made without orientation hold it.
    as_stored: bool = False


class UploadHitOut(BaseModel):
    hit_id: int
    bank: str
    bank_entry_id: int
    signal: str
    # Cosine distance for CLIP, Hamming bits for PDQ, 0 for SHA-256.
    distance: float
    frame_index: int
    model: str | None
    retroactive: bool
    review_status: str
    created_at: datetime


class UploadOut(BaseModel):
    upload_id: int
    external_id: str | None
    uri: str
    status: str
    error: UploadError | None
    metadata: dict[str, Any] | None
    media_format: str | None
    width: int | None
    height: int | None
    frame_count: int | None
    frames_hashed: int | None
    attempts: int
    created_at: datetime
    finished_at: datetime | None
    signals: list[SignalOut]
    hits: list[UploadHitOut]


class UploadList(BaseModel):
    uploads: list[UploadOut]


UPLOAD_READERS = allow(Role.SUBMITTER, Role.REVIEWER, Role.ANALYST)


@uploads_router.get("/{upload_id}", openapi_extra=UPLOAD_READERS)
def get_upload(
    session: DbSession, runtime: AppRuntime, upload_id: Annotated[int, Path(ge=1, le=MAX_ID)]
) -> UploadOut:
    """An upload's status, error, signals and hits."""
    return _upload_out(session, runtime.settings, screening.get_upload(session, upload_id))


@uploads_router.get("", openapi_extra=UPLOAD_READERS)
def find_uploads(
    session: DbSession,
    runtime: AppRuntime,
    external_id: Annotated[str, Query(min_length=1, max_length=512)],
) -> UploadList:
    """The upload an external id names (a list of at most one)."""
    if "\x00" in external_id:
        return UploadList(uploads=[])
    upload = screening.upload_by_external_id(session, external_id)
    return UploadList(
        uploads=[] if upload is None else [_upload_out(session, runtime.settings, upload)]
    )


def _upload_out(session: Session, settings: Settings, upload: Upload) -> UploadOut:
    error = (
        UploadError(code=upload.error_code, message=upload.error_message or "")
        if upload.error_code
        else None
    )
    return UploadOut(
        upload_id=upload.id,
        external_id=upload.external_id,
        uri=upload.uri,
        status=upload.status.value,
        error=error,
        metadata=upload.event_metadata,
        media_format=upload.media_format,
        width=upload.width,
        height=upload.height,
        frame_count=upload.frame_count,
        frames_hashed=upload.frames_hashed,
        attempts=upload.attempts,
        created_at=upload.created_at,
        finished_at=upload.finished_at,
        signals=[
            SignalOut(
                signal=s.signal.value,
                frame_index=max(s.frame_index, 0),
                as_stored=s.frame_index == AS_STORED_FRAME,
                value=s.value.hex(),
                quality=s.quality,
            )
            for s in screening.upload_signals(session, upload.id)
        ],
        hits=[
            UploadHitOut(
                hit_id=hit.hit_id,
                bank=hit.bank,
                bank_entry_id=hit.bank_entry_id,
                signal=hit.signal,
                distance=hit.distance,
                frame_index=hit.frame_index,
                model=hit.model,
                retroactive=hit.retroactive,
                review_status=hit.review_status,
                created_at=hit.created_at,
            )
            for hit in service.upload_hits(session, settings, upload.id)
        ],
    )
