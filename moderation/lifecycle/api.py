"""The model registry and re-embedding over HTTP, for admins.

The same services as `moderation model ...` and `moderation reembed ...`; every change is
audited with the caller as actor. Adding a model loads its weights in this process, once,
for its fingerprint (a checkpoint this host can read: a directory or a cached id).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from moderation.embedding import registry
from moderation.embedding.checkpoints import ModelUnavailable
from moderation.embedding.models import EmbeddingModel
from moderation.errors import Invalid, NotFound
from moderation.http.access import AppRuntime, Caller, DbSession, allow
from moderation.lifecycle import reembed as jobs
from moderation.lifecycle import service
from moderation.lifecycle.reembed import JobView
from moderation.lifecycle.service import ModelView
from moderation.lifecycle.tasks import send_steps

router = APIRouter(tags=["models"])

ADMINS = allow()
ModelId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class ModelNotRegistered(NotFound):
    code = "model_id_not_found"

    def __init__(self, model_id: int) -> None:
        super().__init__(f"no model with id {model_id}; GET /v1/models lists them")


class CheckpointUnreadable(Invalid):
    """The name given is no checkpoint this host can load: the caller's to correct, unlike
    the configured model failing to load (`ModelUnavailable`, 503)."""

    code = "checkpoint_unreadable"


class ModelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=512,
        pattern=r"^[^\x00]+$",
        description="A local directory or a Hugging Face id.",
    )


class ReembedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    duty: float | None = Field(
        default=None, gt=0, le=1, description="Share of each worker's time; null: the default."
    )


def _name(session: DbSession, model_id: int) -> str:
    model = session.get(EmbeddingModel, model_id)
    if model is None:
        raise ModelNotRegistered(model_id)
    return model.name


def _out(session: DbSession, model_id: int) -> ModelView:
    (view,) = [m for m in service.list_models(session) if m.id == model_id]
    return view


@router.get("/v1/models", openapi_extra=ADMINS)
def list_models(session: DbSession) -> list[ModelView]:
    return service.list_models(session)


@router.post("/v1/models", status_code=201, openapi_extra=ADMINS)
def add_model(body: ModelIn, session: DbSession, caller: Caller) -> ModelView:
    from moderation.embedding.families import open_embedder

    try:
        embedder = open_embedder(body.name)
    except ModelUnavailable as error:
        raise CheckpointUnreadable(error.message) from None
    model, _ = registry.add(
        session,
        body.name,
        family=embedder.family,
        dim=embedder.dim,
        fingerprint=embedder.fingerprint,
        actor=caller.actor,
    )
    return _out(session, model.id)


@router.post("/v1/models/{model_id}/activate", openapi_extra=ADMINS)
def activate_model(model_id: ModelId, session: DbSession, caller: Caller) -> ModelView:
    registry.activate(session, _name(session, model_id), actor=caller.actor)
    return _out(session, model_id)


@router.post("/v1/models/{model_id}/retire", openapi_extra=ADMINS)
def retire_model(
    model_id: ModelId,
    session: DbSession,
    caller: Caller,
    force: Annotated[bool, Query(description="Even if bank entries lose CLIP matching.")] = False,
) -> ModelView:
    service.retire(session, _name(session, model_id), actor=caller.actor, force=force)
    return _out(session, model_id)


@router.post("/v1/models/{model_id}/reembed", status_code=202, openapi_extra=ADMINS)
def reembed_model(
    model_id: ModelId, body: ReembedIn, caller: Caller, runtime: AppRuntime
) -> JobView:
    """Start (or return the running) re-embedding job; its first step is sent once the
    job is committed."""
    with runtime.session() as session:
        job, new = jobs.start(session, _name(session, model_id), actor=caller.actor, duty=body.duty)
        job_id, step = job.id, job.step
    if new:
        send_steps(runtime, [jobs.NextStep(job_id, step)])
    with runtime.session() as session:
        return jobs.get_job(session, job_id)


@router.get("/v1/reembed-jobs", openapi_extra=ADMINS)
def list_jobs(session: DbSession) -> list[JobView]:
    return jobs.list_jobs(session)


@router.get("/v1/reembed-jobs/{job_id}", openapi_extra=ADMINS)
def get_job(job_id: ModelId, session: DbSession) -> JobView:
    return jobs.get_job(session, job_id)
