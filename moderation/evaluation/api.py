"""The golden set and its runs over HTTP, for analysts (and admins): the same services as
`moderation golden ...` and `moderation eval history`; additions are audited with the
caller as actor. Runs themselves are started by the command or the schedule: one takes a
model load and a pass over the golden set, too long for a request."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from moderation.auth.models import Role
from moderation.evaluation import golden, service
from moderation.evaluation.models import Modality
from moderation.http.access import Caller, DbSession, allow

router = APIRouter(tags=["golden set"])

ANALYSTS = allow(Role.ANALYST)
QueryId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class GoldenQueryIn(BaseModel):
    """Exactly one of `text`, `image_uri` or `upload_id`, and the uploads it should find."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, max_length=1000)
    image_uri: str | None = Field(default=None, max_length=4096)
    upload_id: int | None = Field(default=None, ge=1, le=2**63 - 1)
    relevant: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] = Field(min_length=1, max_length=1000)
    note: str | None = Field(default=None, max_length=2000)


class GoldenQueryOut(BaseModel):
    id: int
    modality: str
    origin: str
    subject: str
    relevant: list[int]
    created_by: str
    note: str | None


def _out(session: DbSession, query_id: int) -> GoldenQueryOut:
    (view,) = golden.list_queries(session, query_id=query_id)
    return GoldenQueryOut(**vars(view))


@router.get("/v1/golden", openapi_extra=ANALYSTS)
def list_golden(session: DbSession, modality: Modality | None = None) -> list[GoldenQueryOut]:
    return [GoldenQueryOut(**vars(v)) for v in golden.list_queries(session, modality)]


@router.post("/v1/golden", status_code=201, openapi_extra=ANALYSTS)
def add_golden(body: GoldenQueryIn, session: DbSession, caller: Caller) -> GoldenQueryOut:
    """Add a golden query with its relevant uploads (to an existing one: the same text,
    image or upload adds to its relevant uploads)."""
    subject = golden.QuerySubject(
        text=body.text, image_uri=body.image_uri, upload_id=body.upload_id
    )
    query = golden.add_query(session, subject, body.relevant, actor=caller.actor, note=body.note)
    return _out(session, query.id)


@router.delete("/v1/golden/{query_id}", status_code=204, openapi_extra=ANALYSTS)
def remove_golden(query_id: QueryId, session: DbSession, caller: Caller) -> None:
    golden.remove_query(session, query_id, actor=caller.actor)


@router.get("/v1/eval/runs", openapi_extra=ANALYSTS)
def eval_history(
    session: DbSession,
    model: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[service.RunView]:
    """Runs on the golden set, oldest first: recall by date and corpus size."""
    return service.history(session, model=model, limit=limit)
