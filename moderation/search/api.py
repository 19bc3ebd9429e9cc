"""Similarity search for analysts: by text or upload id (GET), by example image (POST).

The application holds one `SearchRuntime`: the index is opened on the first search and
followed by a background thread from then on (an upload is searchable a second or two
after its screening commits); the thread stops, saving what it added, when the
application shuts down. On the Milvus backend the index is a collection that `moderation
index sync` keeps current, or a thread of this process with MODERATION_MILVUS_SYNC_IN_API.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, FastAPI, File, HTTPException, Query, Request, UploadFile, status
from pydantic import BaseModel, Field

from moderation.auth.models import Role
from moderation.http.access import AppRuntime, allow, app_runtime
from moderation.http.admission import image_body
from moderation.http.limits import app_limits
from moderation.http.resources import ProcessResource
from moderation.http.types import UtcDatetime
from moderation.review.models import ReviewStatus
from moderation.runtime import Runtime
from moderation.screening.models import UploadStatus
from moderation.search.rerank import SearchQuery
from moderation.search.runtime import SearchRuntime
from moderation.search.service import Filters, SearchResult

# Loaded with the process's first search, then following the embeddings table.
# Decodes and fetches within the application's limits, shared with its thumbnails.
RUNTIME = ProcessResource(
    "search_runtime",
    lambda request: SearchRuntime(app_runtime(request), follow=True, limits=app_limits(request)),
)


def _start_sync(runtime: Runtime) -> Callable[[], None] | None:
    """The Milvus sync as a thread of this process, when MODERATION_MILVUS_SYNC_IN_API asks."""
    settings = runtime.settings
    if settings.search_backend != "milvus" or not settings.milvus_sync_in_api:
        return None
    from moderation.search import milvus_sync
    from moderation.search.milvus_index import Milvus, MilvusSettings

    loop = milvus_sync.SyncLoop(
        runtime.engine,
        Milvus(MilvusSettings.from_settings(settings)),
        milvus_sync.SyncSettings.from_settings(settings),
        milvus_sync.synced_models(settings),
    )
    return loop.start(settings.milvus_sync_interval_s)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    stop_sync = _start_sync(app.state.runtime)
    try:
        async with RUNTIME.lifespan()(app):
            yield
    finally:
        if stop_sync is not None:
            await asyncio.to_thread(stop_sync)


router = APIRouter(prefix="/v1/search", tags=["search"], lifespan=_lifespan)


class HitOut(BaseModel):
    bank: str
    signal: str
    distance: float
    review_status: str
    retroactive: bool


class SearchResultOut(BaseModel):
    upload_id: int
    uri: str
    score: float
    frame_index: int
    status: str
    screened_at: datetime | None
    error_code: str | None
    hits: list[HitOut]

    @classmethod
    def of(cls, result: SearchResult) -> SearchResultOut:
        return cls(
            upload_id=result.upload_id,
            uri=result.uri,
            score=result.score,
            frame_index=result.frame_index,
            status=result.status,
            screened_at=result.screened_at,
            error_code=result.error_code,
            hits=[HitOut(**vars(hit)) for hit in result.hits],
        )


class SearchResponse(BaseModel):
    model: str
    index_kind: str
    index_size: int
    results: list[SearchResultOut]


# Results reachable by paging (offset + k): deep pages cost a search of offset + k.
MAX_RESULTS = 10_000


class FilterParams(BaseModel):
    k: int = Field(default=10, ge=1, le=1000)
    # Results skipped, to page past the first k: the next page is offset + k.
    offset: int = Field(default=0, ge=0, le=MAX_RESULTS - 1000)
    screened_from: UtcDatetime | None = None
    screened_until: UtcDatetime | None = None
    status: UploadStatus | None = None
    has_hit: bool | None = None
    bank: str | None = None
    error_code: str | None = None
    # Uploads with a hit in this review status (pending, confirmed, dismissed, escalated).
    review_status: ReviewStatus | None = None

    def filters(self) -> Filters:
        return Filters(
            screened_from=self.screened_from,
            screened_until=self.screened_until,
            status=self.status,
            has_hit=self.has_hit,
            bank=self.bank,
            error_code=self.error_code,
            review_status=self.review_status,
        )


# Declared once, shared by both routes: the filters arrive as query parameters.
Filtering = Annotated[FilterParams, Query()]


def _run(
    runtime: SearchRuntime, make_query: Callable[[], SearchQuery], params: FilterParams
) -> SearchResponse:
    query = make_query()
    results = runtime.search(query, params.offset + params.k, params.filters())[params.offset :]
    index = runtime.index(query.model_id)
    return SearchResponse(
        model=index.model_name,
        index_kind=str(index.kind),
        index_size=index.size,
        results=[SearchResultOut.of(r) for r in results],
    )


@router.get("", openapi_extra=allow(Role.ANALYST))
def search_by_text_or_upload(
    request: Request,
    params: Filtering,
    text: str | None = None,
    upload_id: int | None = None,
) -> SearchResponse:
    """The k screened uploads most like `text` (through the model's text tower) or like
    upload `upload_id` (its stored embedding): exactly one of them."""
    if (text is None) == (upload_id is None):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "give exactly one of `text` or `upload_id`"
        )
    runtime = RUNTIME.get(request)
    if text is not None:
        return _run(runtime, lambda: runtime.text_query(text), params)
    assert upload_id is not None
    return _run(runtime, lambda: runtime.upload_query(upload_id), params)


@router.post("/image", openapi_extra={**allow(Role.ANALYST), **image_body()})
def search_by_image(
    request: Request,
    runtime: AppRuntime,
    params: Filtering,
    image: Annotated[UploadFile, File()],
) -> SearchResponse:
    """The k screened uploads most like an example image, sent as multipart `image`; it is
    decoded and embedded exactly as screening does, and refused as screening would."""
    limit = runtime.settings.max_bytes
    data = image.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, f"the image is over {limit} bytes (max_bytes)"
        )
    searches = RUNTIME.get(request)
    return _run(searches, lambda: searches.image_query(data), params)
