"""The pages' images of uploads: kept evidence frames, an animation's strip, and the
fetched-and-checked thumbnail of an upload that kept none (see `thumbnails`).

Every image answers `private, no-store`. Every read of kept evidence is audited, and the
audit row commits before the image is sent: a read that is not on record is not shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from fastapi.responses import Response

from moderation.audit import service as audit
from moderation.auth.models import Role
from moderation.config import Settings
from moderation.evidence import service as evidence
from moderation.evidence.models import Evidence, EvidenceState
from moderation.evidence.vault import Vault
from moderation.http.access import AppRuntime, Caller, allow, app_runtime
from moderation.http.limits import AppLimits
from moderation.http.resources import ProcessResource
from moderation.images.errors import BadInput, IntakeError
from moderation.images.signals import SignalType
from moderation.review import service as review
from moderation.review.service import HitEvidence
from moderation.screening import service as screening
from moderation.screening.models import Upload
from moderation.web.thumbnails import ContentChanged, fetched_thumbnail, rendered, spread, strip_of

router = APIRouter(tags=["pages"], include_in_schema=False)
READERS = allow(Role.REVIEWER, Role.ANALYST)
RowId = Annotated[int, Path(ge=1, le=2**63 - 1)]
FrameIndex = Annotated[int, Path(ge=0, le=1_000_000)]
NO_STORE = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"}
# Which hit's frame a card shows first: the surest signal, then the closest match.
SIGNAL_RANK = {SignalType.SHA256.value: 0, SignalType.PDQ.value: 1, SignalType.CLIP.value: 2}


@dataclass(frozen=True)
class PagesVault:
    """The vault the pages read kept evidence from; None when no evidence key is configured."""

    vault: Vault | None

    def close(self) -> None:
        """Nothing to close: a store is a directory, or a boto3 client whose connections
        end with the process."""


# One per process, made from the application's settings on the first image asked for.
VAULT = ProcessResource(
    "pages_vault", lambda request: PagesVault(Vault.from_settings(app_runtime(request).settings))
)


def shown_hit(hits: list[HitEvidence]) -> HitEvidence | None:
    """The hit whose frame a card shows: exact hash first, then PDQ, then CLIP, closest first."""
    if not hits:
        return None
    return min(hits, key=lambda hit: (SIGNAL_RANK.get(hit.signal, 9), hit.distance, hit.hit_id))


@dataclass(frozen=True)
class Media:
    """What a page can show of an upload's content, and why not when it cannot."""

    upload_id: int
    state: str
    # The frame shown (the hit's), when there is an image to show.
    frame: int | None = None
    frame_count: int | None = None
    # More than one frame kept: the page shows the strip too.
    strip: bool = False
    # Why nothing is shown; None when an image is.
    reason: str | None = None

    @property
    def image(self) -> str | None:
        if self.frame is not None:
            return f"/review/uploads/{self.upload_id}/frames/{self.frame}"
        if self.state == "fetch":
            return f"/review/uploads/{self.upload_id}/thumbnail"
        return None


def media_for(
    settings: Settings, upload_id: int, kept: Evidence | None, hits: list[HitEvidence]
) -> Media:
    best = shown_hit(hits)
    if kept is None:
        if not hits:
            return Media(upload_id, "fetch")
        reason = (
            "No evidence kept: this service keeps none (MODERATION_EVIDENCE_KEY is not set)."
            if settings.evidence_key is None
            else "Evidence not kept yet: a worker fetches the upload again and keeps it only "
            "if its bytes are the ones screened."
        )
        return Media(upload_id, "none", reason=reason)
    if kept.state is EvidenceState.PRESERVED:
        frame = best.frame_index if best is not None else kept.frames[0]
        if frame not in kept.frames:  # a CLIP hit on an unhashed frame cannot be; be safe
            frame = kept.frames[0]
        return Media(
            upload_id,
            "preserved",
            frame=frame,
            frame_count=kept.frame_count,
            strip=len(kept.frames) > 1,
        )
    reasons = {
        EvidenceState.CHANGED: "Content changed since screening: the URI now serves other "
        f"bytes ({kept.detail}). Nothing of them is shown; this is itself evidence.",
        EvidenceState.CAPTURING: "Evidence not kept yet: a worker is fetching the upload again.",
        EvidenceState.UNAVAILABLE: f"No evidence could be kept: {kept.detail}.",
        EvidenceState.EXPIRED: "Evidence deleted at the end of its retention period "
        f"({kept.deleted_at:%Y-%m-%d} UTC)."
        if kept.deleted_at
        else "Evidence deleted.",
    }
    return Media(upload_id, kept.state.value, reason=reasons[kept.state])


def _image(data: bytes) -> Response:
    return Response(data, media_type="image/jpeg", headers=NO_STORE)


def _purpose(reveal: bool) -> str:
    return "revealed" if reveal else "blurred"


def _vault(request: Request) -> Vault:
    vault = VAULT.get(request).vault
    if vault is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no evidence is kept by this service")
    return vault


@router.get("/review/uploads/{upload_id}/frames/{frame}", openapi_extra=READERS)
def kept_frame(
    request: Request,
    runtime: AppRuntime,
    caller: Caller,
    upload_id: RowId,
    frame: FrameIndex,
    reveal: Annotated[bool, Query()] = False,
) -> Response:
    """A kept frame of the upload, blurred unless `reveal`; the read is audited."""
    vault = _vault(request)
    with runtime.session() as session:
        (jpeg,) = evidence.read_frames(
            session, vault, upload_id, [frame], actor=caller.actor, purpose=_purpose(reveal)
        )
    return _image(rendered(jpeg, reveal=reveal))


@router.get("/review/uploads/{upload_id}/strip", openapi_extra=READERS)
def kept_strip(
    request: Request,
    runtime: AppRuntime,
    caller: Caller,
    upload_id: RowId,
    frame: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    reveal: Annotated[bool, Query()] = False,
) -> Response:
    """The kept frames of an animation side by side (at most `STRIP_FRAMES`, spread), the
    one at `frame` framed; blurred unless `reveal`; the read is audited."""
    vault = _vault(request)
    with runtime.session() as session:
        kept = evidence.evidence_of(session, upload_id)
        frames = spread(kept.frames, frame) if kept is not None else []
        jpegs = evidence.read_frames(
            session,
            vault,
            upload_id,
            frames,
            actor=caller.actor,
            purpose="strip-" + _purpose(reveal),
        )
    marked = frames.index(frame) if frame in frames else None
    return _image(strip_of(jpegs, marked=marked, reveal=reveal))


@router.get("/review/uploads/{upload_id}/thumbnail", openapi_extra=READERS)
def upload_thumbnail(
    request: Request,
    runtime: AppRuntime,
    caller: Caller,
    limits: AppLimits,
    upload_id: RowId,
    reveal: Annotated[bool, Query()] = False,
) -> Response:
    """The upload as a page shows it: its kept frame (the best hit's) if evidence was kept;
    for an upload with no hit and no evidence, fetched again and shown only if its SHA-256
    is the one screened. An upload with hits is never fetched from here."""
    settings = runtime.settings
    with runtime.session() as session:
        upload = session.get(Upload, upload_id)
        if upload is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no upload with id {upload_id}")
        hits = review.upload_hits(session, settings, upload_id)
        media = media_for(settings, upload_id, evidence.evidence_of(session, upload_id), hits)
        uri = upload.uri
        screened = screening.screened_sha256(session, upload_id)
    if media.frame is not None:
        return kept_frame(request, runtime, caller, upload_id, media.frame, reveal)
    if media.state != "fetch" or screened is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, media.reason or "the upload was not screened"
        )
    if reveal:
        with runtime.session() as session:
            audit.record(
                session,
                actor=caller.actor,
                action="upload.reveal",
                subject_type="upload",
                subject_id=upload_id,
            )
    try:
        thumbnail = fetched_thumbnail(
            uri, screened, settings, limits, reveal=reveal, caller=caller.actor
        )
        return _image(thumbnail)
    except ContentChanged as changed:
        return Response(
            changed.message, status.HTTP_409_CONFLICT, media_type="text/plain", headers=NO_STORE
        )
    except IntakeError as exc:
        code = (
            status.HTTP_422_UNPROCESSABLE_CONTENT
            if isinstance(exc, BadInput)
            else status.HTTP_502_BAD_GATEWAY
        )
        return Response(str(exc), code, media_type="text/plain", headers=NO_STORE)
