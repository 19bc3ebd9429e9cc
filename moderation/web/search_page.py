"""The analysts' search page: by text, by example image, or "more like this" from any
upload, with the API's filters; a grid of blurred thumbnails with distance and status;
paging past the first page; CSV and JSON export of a result set.

Every query is a GET: an example image is embedded once (`POST /search/image`) and the
browser is sent on to the GET of its vector, so paging and export repeat the query
without the image (which is never kept).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from moderation.auth.models import Role
from moderation.errors import Invalid
from moderation.http.access import AppRuntime, allow
from moderation.http.admission import image_body
from moderation.http.types import form_datetime
from moderation.screening.models import UploadStatus
from moderation.search.api import MAX_RESULTS, RUNTIME
from moderation.search.rerank import SearchQuery
from moderation.search.service import Filters, SearchResult
from moderation.web import reads
from moderation.web.rendering import render
from moderation.web.security import check_form_token

router = APIRouter(tags=["pages"], include_in_schema=False)
ANALYSTS = allow(Role.ANALYST, Role.REVIEWER)
PAGE_SIZES = (24, 48, 96)
# Results in one export: a result set, not the corpus.
EXPORT_MAX = 5_000


class BadSearch(Invalid):
    code = "bad_search"


@dataclass(frozen=True)
class SearchForm:
    """The page's query and filters, as its URL carries them (strings, checked here so a
    bad value is an error page that says which, not a JSON 422)."""

    text: str = ""
    upload_id: str = ""
    vector: str = ""
    status: str = ""
    has_hit: str = ""
    bank: str = ""
    screened_from: str = ""
    screened_until: str = ""
    error_code: str = ""
    page: str = "0"
    size: str = str(PAGE_SIZES[0])

    @property
    def asked(self) -> bool:
        return bool(self.text.strip() or self.upload_id or self.vector)

    def filters(self) -> Filters:
        if self.status and self.status not in {s.value for s in UploadStatus}:
            raise BadSearch(f"status must be one of {', '.join(UploadStatus)}")
        if self.has_hit not in ("", "yes", "no"):
            raise BadSearch("has_hit must be yes or no")
        return Filters(
            screened_from=form_datetime(self.screened_from, "screened_from"),
            screened_until=form_datetime(self.screened_until, "screened_until"),
            status=UploadStatus(self.status) if self.status else None,
            has_hit={"": None, "yes": True, "no": False}[self.has_hit],
            bank=self.bank or None,
            error_code=self.error_code or None,
        )

    def paging(self) -> tuple[int, int]:
        page, size = _number(self.page, "page"), _number(self.size, "size")
        if size not in PAGE_SIZES:
            raise BadSearch(f"size must be one of {', '.join(map(str, PAGE_SIZES))}")
        if (page + 1) * size > MAX_RESULTS:
            raise BadSearch(
                f"results beyond the first {MAX_RESULTS} are not served; narrow the filters"
            )
        return page, size

    def params(self, **changes: str) -> dict[str, str]:
        values = {**vars(self), **changes}
        return {name: value for name, value in values.items() if value not in ("", None)}

    def url(self, path: str = "/search", **changes: str) -> str:
        return f"{path}?{urlencode(self.params(**changes))}"


def _number(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise BadSearch(f"{name} must be a whole number, not {value!r}") from None
    if not 0 <= number < 2**63:
        raise BadSearch(f"{name} is out of range")
    return number


def encode_vector(vector: np.ndarray) -> str:
    return base64.urlsafe_b64encode(vector.astype("<f4").tobytes()).decode().rstrip("=")


def decode_vector(text: str) -> np.ndarray:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadSearch("vector is not a query this page made") from None
    if not raw or len(raw) % 4 or len(raw) > 4 * 4096:
        raise BadSearch("vector is not a query this page made")
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0:
        raise BadSearch("vector is not a query this page made")
    return vector / norm


def _query(request: Request, form: SearchForm) -> SearchQuery:
    runtime = RUNTIME.get(request)
    if form.vector:
        vector = decode_vector(form.vector)
        if vector.shape[0] != runtime.index().dim:
            raise BadSearch("vector was made by another model; search again")
        return SearchQuery(vector=vector)
    if form.upload_id:
        return runtime.upload_query(_number(form.upload_id, "upload_id"))
    return runtime.text_query(form.text)


def _results(request: Request, form: SearchForm, first: int, count: int) -> list[SearchResult]:
    runtime = RUNTIME.get(request)
    filters = form.filters()  # checked before the query is embedded
    return runtime.search(_query(request, form), first + count, filters)[first:]


def _form(request: Request) -> SearchForm:
    names = SearchForm.__dataclass_fields__
    return SearchForm(
        **{name: value[:20_000] for name, value in request.query_params.items() if name in names}
    )


@router.get("/search", openapi_extra=ANALYSTS)
def search_page(request: Request, runtime: AppRuntime) -> HTMLResponse:
    form = _form(request)
    page, size = form.paging()
    results: list[SearchResult] = []
    more = False
    if form.asked:
        found = _results(request, form, page * size, size + 1)
        results, more = found[:size], len(found) > size
    with runtime.session() as session:
        banks = reads.bank_list(session)
    return render(
        request,
        "search.html",
        {
            "form": form,
            "results": results,
            "page": page,
            "size": size,
            "sizes": PAGE_SIZES,
            "statuses": [s.value for s in UploadStatus],
            "banks": banks,
            "previous_page": form.url(page=str(page - 1)) if page > 0 else None,
            "next_page": form.url(page=str(page + 1)) if more else None,
            "export_csv": form.url("/search/export.csv", page="", size=""),
            "export_json": form.url("/search/export.json", page="", size=""),
            "more_like": lambda upload_id: form.url(
                upload_id=str(upload_id), text="", vector="", page=""
            ),
        },
    )


@router.post("/search/image", openapi_extra={**ANALYSTS, **image_body()})
def search_by_image(
    request: Request,
    runtime: AppRuntime,
    image: Annotated[UploadFile, File()],
    csrf: Annotated[str, Form()] = "",
    status_: Annotated[str, Form(alias="status")] = "",
    has_hit: Annotated[str, Form()] = "",
    bank: Annotated[str, Form()] = "",
    screened_from: Annotated[str, Form()] = "",
    screened_until: Annotated[str, Form()] = "",
    size: Annotated[str, Form()] = str(PAGE_SIZES[0]),
) -> Response:
    """Embed the example image as screening would, then show the GET of its vector."""
    check_form_token(request, csrf)
    limit = runtime.settings.max_bytes
    data = image.file.read(limit + 1)
    if len(data) > limit:
        raise BadSearch(f"the image is over {limit} bytes (max_bytes)")
    query = RUNTIME.get(request).image_query(data)
    form = SearchForm(
        vector=encode_vector(query.vector),
        status=status_,
        has_hit=has_hit,
        bank=bank,
        screened_from=screened_from,
        screened_until=screened_until,
        size=size,
    )
    form.filters()  # a bad filter is refused here, with the image, not on the next page
    return RedirectResponse(form.url(), status.HTTP_303_SEE_OTHER)


EXPORT_FIELDS = (
    "upload_id",
    "distance",
    "similarity",
    "frame_index",
    "status",
    "screened_at",
    "error_code",
    "hits",
    "uri",
)


def _row(result: SearchResult) -> dict[str, Any]:
    return {
        "upload_id": result.upload_id,
        "distance": round(1.0 - result.score, 6),
        "similarity": round(result.score, 6),
        "frame_index": result.frame_index,
        "status": result.status,
        "screened_at": result.screened_at.isoformat() if result.screened_at else None,
        "error_code": result.error_code,
        "hits": [
            {
                "bank": h.bank,
                "signal": h.signal,
                "distance": h.distance,
                "review_status": h.review_status,
            }
            for h in result.hits
        ],
        "uri": result.uri,
    }


@router.get("/search/export.{kind}", openapi_extra=ANALYSTS)
def export(request: Request, kind: str, limit: int | None = None) -> Response:
    """The query's results, best first, up to `limit` (default and most: `EXPORT_MAX`)."""
    if kind not in ("csv", "json"):
        raise BadSearch("export as csv or json")
    form = _form(request)
    if not form.asked:
        raise BadSearch("give text, upload_id or an image's vector to export its results")
    count = min(limit or EXPORT_MAX, EXPORT_MAX)
    rows = [_row(result) for result in _results(request, form, 0, count)]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    headers = {
        "Content-Disposition": f'attachment; filename="search-{stamp}.{kind}"',
        "Cache-Control": "private, no-store",
    }
    if kind == "json":
        body = json.dumps({"query": form.params(page="", size=""), "results": rows}, indent=1)
        return Response(body, media_type="application/json", headers=headers)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS)
    writer.writeheader()
    for row in rows:
        hits = "; ".join(f"{h['bank']}:{h['signal']}:{h['review_status']}" for h in row["hits"])
        writer.writerow({**row, "hits": hits})
    return Response(out.getvalue(), media_type="text/csv", headers=headers)
