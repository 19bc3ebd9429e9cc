"""Uploads over HTTP: `POST /v1/uploads` for producers. (What became of an upload, with its
hits, is read from `moderation.review.api`: hits are the review queue's.)

Submission goes through `submission.accept`, the path `moderation submit` takes: URIs
checked against the fetch policy before anything is recorded, a row committed before its
message is published, idempotent on the external id.

A batch is all or nothing: one refused URI or one conflicting external id refuses the
whole batch (422 or 409, naming every refused item by its index), and nothing of it is
recorded. A producer drops or fixes those items and sends the batch again; the items'
external ids make the retry safe.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, status
from prometheus_client import Histogram
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from moderation.auth.models import Role
from moderation.http.access import allow, app_runtime, current_principal
from moderation.http.metrics import REGISTRY
from moderation.http.resources import ProcessResource
from moderation.http.types import plain_text
from moderation.images.uri_policy import UriPolicy
from moderation.screening.announcer import Announcer
from moderation.screening.service import NewUpload, Submitted
from moderation.screening.submission import accept

# Started with the process's first upload; closed after the requests in flight, sending
# what they recorded.
ANNOUNCER = ProcessResource(
    "announcer", lambda request: Announcer(app_runtime(request).producer.send_screening)
)

router = APIRouter(prefix="/v1/uploads", tags=["uploads"], lifespan=ANNOUNCER.lifespan())


UPLOAD_BATCH_SIZE = Histogram(
    "moderation_upload_batch_size",
    "Uploads per POST /v1/uploads request accepted by this API process",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    registry=REGISTRY,
)

# Events per request. A batch is one transaction; a producer with more sends more requests.
MAX_BATCH = 1000
# Ids are PostgreSQL bigints: a larger one is no upload, not a server error.
MAX_ID = 2**63 - 1
# The stored metadata of one event, as JSON.
MAX_METADATA_BYTES = 16_384


class UploadIn(BaseModel):
    """One upload event."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(min_length=1, max_length=8192, description="Where the worker fetches it.")
    external_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Your id for the event: sending it again returns the same upload.",
    )
    sha256: str | None = Field(
        default=None,
        pattern="^[0-9a-fA-F]{64}$",
        description="The SHA-256 of the bytes, if known: the worker refuses other bytes.",
    )
    metadata: dict[str, Any] | None = Field(
        default=None, description="Your own fields, stored with the upload and returned as given."
    )

    # Refused here rather than failing the insert.
    _uri_plain = field_validator("uri")(plain_text)

    @field_validator("external_id")
    @classmethod
    def _external_id(cls, value: str | None) -> str | None:
        return None if value is None else plain_text(value)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            encoded = json.dumps(value, allow_nan=False, ensure_ascii=False)
        except ValueError:
            # 1e400 parses as infinity.
            raise ValueError("must be plain JSON (no NaN or Infinity)") from None
        # JSONB refuses \u0000 and lone surrogates anywhere in a document.
        plain_text(encoded.replace("\\u0000", "\x00"))
        if len(encoded.encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
        return value

    def to_new_upload(self, submitted_by: str) -> NewUpload:
        return NewUpload(
            uri=self.uri,
            external_id=self.external_id,
            declared_sha256=bytes.fromhex(self.sha256) if self.sha256 else None,
            metadata=self.metadata,
            submitted_by=submitted_by,
        )


class UploadBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uploads: list[UploadIn] = Field(min_length=1, max_length=MAX_BATCH)


class UploadAccepted(BaseModel):
    upload_id: int
    external_id: str | None
    # False when the external id named an upload already recorded: nothing new is queued.
    created: bool


class UploadBatchAccepted(BaseModel):
    uploads: list[UploadAccepted]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=allow(Role.SUBMITTER),
    responses={
        409: {"description": "An external id already names another event; nothing recorded."},
        422: {"description": "A URI is refused by the fetch policy; nothing recorded."},
    },
)
async def submit_uploads(
    request: Request, body: UploadIn | UploadBatchIn
) -> UploadAccepted | UploadBatchAccepted:
    """Queue one upload event, or a batch of them (`{"uploads": [...]}`) all or none.

    202 once the uploads are recorded; their screening messages follow within
    milliseconds (or, while the broker is unreachable, once it is back). Poll
    `GET /v1/uploads/{id}` for the verdict.
    """
    # What blocks (resolving hosts, the transaction) runs on the thread pool, as a plain
    # `def` handler's body would; as a coroutine the handler also has its answer checked
    # against the response model here, where FastAPI took a second hop to the pool for it.
    events = body.uploads if isinstance(body, UploadBatchIn) else [body]
    submitter = (await current_principal(request)).actor
    accepted = await run_in_threadpool(
        accept,
        app_runtime(request),
        [event.to_new_upload(submitter) for event in events],
        policy=_uri_policy(request),
        announce=ANNOUNCER.get(request).announce,
    )
    UPLOAD_BATCH_SIZE.observe(len(events))
    return accepted_answer(body, accepted)


def _uri_policy(request: Request) -> UriPolicy:
    """The application's fetch policy, made from its settings on the first submit and
    shared by every request (made per request, its checks of the configured prefixes were
    5% of a single event's samples: py-spy, `bench/api.py`). Two requests racing to make it
    make equal ones; either serves."""
    state = request.app.state
    policy: UriPolicy | None = getattr(state, "uri_policy", None)
    if policy is None:
        policy = state.uri_policy = UriPolicy.from_settings(app_runtime(request).settings)
    return policy


def accepted_answer(
    body: UploadIn | UploadBatchIn, accepted: list[Submitted]
) -> UploadAccepted | UploadBatchAccepted:
    """The 202's body: one upload, or the batch's in order, as the request came."""
    events = body.uploads if isinstance(body, UploadBatchIn) else [body]
    out = [
        UploadAccepted(upload_id=a.upload_id, external_id=e.external_id, created=a.created)
        for a, e in zip(accepted, events, strict=True)
    ]
    return UploadBatchAccepted(uploads=out) if isinstance(body, UploadBatchIn) else out[0]
