"""Re-embedding: every screened upload and every bank entry with a source, embedded again
under a new model in the background, so that the model can be activated with its whole
corpus and banks behind it.

The lifecycle of a job, each arrow one or more steps:

    queued ─▶ uploads (screened uploads up to the horizon, a block at a time, in id order)
           ─▶ entries (bank entries with a `source_ref`, likewise)
           ─▶ catching_up (uploads and entries that arrived since the horizons without an
              embedding under the model, until a pass finds none after `settle_until`)
           ─▶ done

- **One pipeline.** A step is a block of items; the worker that takes it fetches each
  again through the same intake pool as screening (the URI policy, the decode limits),
  checks the bytes against the SHA-256 recorded when they were screened (or the entry's),
  and embeds the crops in the model's own batched forward passes, beside live screening
  (`moderation.worker.reembed`). Content gone or changed is recorded per item with its
  reason (`ReembedFailure`), counted, and never fails the job.
- **Resumable and exact.** A step takes its block in one transaction (the job row
  locked, its step counter moved), embeds with no transaction open, and records in a
  second: the rows (ON CONFLICT DO NOTHING: an upload's frame or an entry has one
  embedding per model), the failures, and the checkpoint, which only moves forward. A
  worker killed anywhere in between leaves the checkpoint where the last record put it;
  the sweeper sends the job again once its step is overdue, and the block is taken again:
  nothing is written twice, and "done" counts a block once, when its checkpoint moves.
- **Blocks taken ahead.** At full duty a worker takes the next blocks of a scan phase
  (`take_ahead`) while the one before is still in its forward passes, and records them in
  order, so the model's batches stay full from one block to the next. A block taken ahead
  moves the step counter but never the checkpoint or the phase: a worker killed with
  blocks taken and not recorded leaves the job to resume from its last record, as above.
- **The race with screening.** Workers compute a candidate from the moment they pick it
  up (`model_poll_s`), so uploads screened after that have its embedding already. Those
  screened around the moment (claimed by a worker that had not yet picked it up) are
  found by the catch-up, which looks for any upload or entry above the horizons still
  without one, until `reembed_settle_s` after the scans ended.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import ColumnElement, and_, exists, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.banks.models import BankEntry, BankEntryEmbedding
from moderation.embedding import registry
from moderation.embedding.models import Embedding, EmbeddingModel, ModelState
from moderation.embedding.service import vector_to_bytes
from moderation.errors import Conflict, NotFound
from moderation.images.fetch import to_uri
from moderation.images.signals import SignalType
from moderation.lifecycle.models import (
    FINAL_REEMBED_STATUSES,
    ReembedFailure,
    ReembedJob,
    ReembedStatus,
)
from moderation.screening.models import Signal, Upload, UploadStatus

logger = logging.getLogger(__name__)


class JobNotFound(NotFound):
    code = "reembed_job_not_found"

    def __init__(self, job_id: int) -> None:
        super().__init__(f"no re-embedding job with id {job_id}; see `moderation reembed list`")


class NotReembeddable(Conflict):
    code = "not_reembeddable"


@dataclass(frozen=True)
class NextStep:
    job_id: int
    step: int


@dataclass(frozen=True)
class Item:
    """An upload or a bank entry to embed: where its bytes are, and what they must be."""

    kind: Literal["upload", "entry"]
    id: int
    uri: str
    sha256: bytes | None


@dataclass(frozen=True)
class Block:
    job_id: int
    step: int  # the step taken: the job's counter is now one more
    model_id: int
    model_name: str
    phase: ReembedStatus
    duty: float | None
    items: list[Item]
    # The ids the block covers (those already embedded included): the checkpoint moves
    # to `through`, and "done" by `covered`, when it is recorded. 0: a catch-up block.
    through: int
    covered: int


@dataclass(frozen=True)
class Settling:
    """The catch-up found nothing and waits for its settle time: the step to send when it
    is over (the sweeper sends it too, should that message be lost)."""

    step: NextStep
    after_s: float


@dataclass(frozen=True)
class Outcome:
    """One item's result: its embedded frames' vectors, or why it has none."""

    item: Item
    vectors: list[tuple[int, np.ndarray]] = field(default_factory=list)
    reason: str | None = None
    message: str | None = None


def start(
    session: Session, model_name: str, *, actor: str, duty: float | None = None
) -> tuple[ReembedJob, bool]:
    """A job for a computed model (an unfinished one for it is returned as it is); the job
    and whether it is new. `duty`: the share of a worker's time its steps may take (None:
    each worker's `reembed_duty`). The caller sends its first step after committing."""
    model = registry.get_model(session, model_name)
    if model.state is ModelState.RETIRED:
        raise NotReembeddable(
            f"model {model.name!r} is retired; `moderation model add {model.name}` first"
        )
    running = session.scalar(
        select(ReembedJob)
        .where(ReembedJob.model_id == model.id, ReembedJob.status.not_in(FINAL_REEMBED_STATUSES))
        .order_by(ReembedJob.id)
        .limit(1)
    )
    if running is not None:
        return running, False
    job = ReembedJob(
        model_id=model.id,
        created_by=actor[:200],
        duty=duty,
        status=ReembedStatus.QUEUED,
        next_run_at=func.now(),
        failures={},
    )
    session.add(job)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="model.reembed",
        subject_type="embedding_model",
        subject_id=model.id,
        after={"job": job.id},
    )
    return job, True


def _screened_uploads() -> ColumnElement[bool]:
    return Upload.status == UploadStatus.SCREENED


def _upload_embedded(model_id: int) -> ColumnElement[bool]:
    return exists().where(Embedding.upload_id == Upload.id, Embedding.model_id == model_id)


def _entry_embedded(model_id: int) -> ColumnElement[bool]:
    return exists().where(
        BankEntryEmbedding.bank_entry_id == BankEntry.id, BankEntryEmbedding.model_id == model_id
    )


def _failed_before(job_id: int, column: Any) -> ColumnElement[bool]:
    return exists().where(ReembedFailure.job_id == job_id, column)


def take(
    session: Session, job_id: int, step: int, *, block_size: int, settle_s: float
) -> Block | Settling | None:
    """Take step `step` of a job: its next block of items to embed, or `Settling` when the
    catch-up waits for its settle time. None when the step was already taken or the job is
    finished (done now, or its model retired). The caller commits before it embeds
    anything, or sends the settling step."""
    job = session.get(ReembedJob, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.step != step or job.status in FINAL_REEMBED_STATUSES:
        return None
    job.step += 1
    model = session.get_one(EmbeddingModel, job.model_id)
    if model.state is ModelState.RETIRED:
        _finish(job, ReembedStatus.CANCELLED, f"model {model.name!r} was retired")
        return None
    if job.status is ReembedStatus.QUEUED:
        _begin(session, job)
    while True:
        if job.status is ReembedStatus.UPLOADS:
            block = _upload_block(session, job, model, block_size)
            if block is not None:
                return block
            job.status = ReembedStatus.ENTRIES
        if job.status is ReembedStatus.ENTRIES:
            block = _entry_block(session, job, model, block_size)
            if block is not None:
                return block
            job.status = ReembedStatus.CATCHING_UP
            job.settle_until = func.now() + timedelta(seconds=settle_s)
            session.flush()
            session.refresh(job, ["settle_until"])
        if job.status is ReembedStatus.CATCHING_UP:
            block = _catch_up_block(session, job, model, block_size)
            if block is not None:
                return block
            now = session.scalars(select(func.now())).one()
            if job.settle_until is not None and job.settle_until > now:
                job.next_run_at = job.settle_until  # the sweeper's cue (`find_due`)
                wait_s = (job.settle_until - now).total_seconds()
                return Settling(NextStep(job.id, job.step), wait_s)
            _finish(job, ReembedStatus.DONE, None)
            logger.info("re-embedding job %d for %s is done", job.id, model.name)
            return None


def take_ahead(session: Session, previous: Block, *, block_size: int) -> Block | None:
    """The block after `previous`, taken while `previous` is still being embedded (see the
    module docstring). None, with nothing changed, unless `previous` is the job's latest
    step and more of its scan phase is left: the end of a phase, the catch-up and a job
    finished or taken elsewhere meanwhile are `take`'s, once `previous` is recorded."""
    if previous.phase not in (ReembedStatus.UPLOADS, ReembedStatus.ENTRIES):
        return None
    job = session.get(ReembedJob, previous.job_id, with_for_update=True, populate_existing=True)
    if job is None or job.step != previous.step + 1 or job.status is not previous.phase:
        return None
    model = session.get_one(EmbeddingModel, job.model_id)
    if model.state is ModelState.RETIRED:
        return None
    scan = _upload_block if previous.phase is ReembedStatus.UPLOADS else _entry_block
    job.step += 1
    block = scan(session, job, model, block_size, after=previous.through)
    if block is None:
        job.step -= 1  # nothing taken: the step is left for `take`
    return block


def _begin(session: Session, job: ReembedJob) -> None:
    job.upload_horizon = session.scalar(select(func.max(Upload.id))) or 0
    job.entry_horizon = session.scalar(select(func.max(BankEntry.id))) or 0
    job.uploads_total = (
        session.scalar(
            select(func.count()).where(_screened_uploads(), Upload.id <= job.upload_horizon)
        )
        or 0
    )
    job.entries_total = (
        session.scalar(
            select(func.count()).where(
                BankEntry.source_ref.is_not(None), BankEntry.id <= job.entry_horizon
            )
        )
        or 0
    )
    job.status = ReembedStatus.UPLOADS
    job.started_at = func.now()
    session.flush()


def _upload_items(session: Session, where: ColumnElement[bool], limit: int) -> list[Item]:
    sha = (
        select(Signal.value)
        .where(Signal.upload_id == Upload.id, Signal.signal == SignalType.SHA256)
        .limit(1)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Upload.id, Upload.uri, sha).where(where).order_by(Upload.id).limit(limit)
    )
    return [Item("upload", id_, uri, value) for id_, uri, value in rows]


def _entry_items(session: Session, where: ColumnElement[bool], limit: int) -> list[Item]:
    rows = session.execute(
        select(BankEntry.id, BankEntry.source_ref, BankEntry.sha256)
        .where(BankEntry.source_ref.is_not(None), where)
        .order_by(BankEntry.id)
        .limit(limit)
    )
    return [Item("entry", id_, to_uri(str(ref)), value) for id_, ref, value in rows]


def _block(
    job: ReembedJob, model: EmbeddingModel, items: list[Item], through: int, covered: int
) -> Block:
    return Block(
        job.id, job.step - 1, model.id, model.name, job.status, job.duty, items, through, covered
    )


def _upload_block(
    session: Session, job: ReembedJob, model: EmbeddingModel, size: int, after: int = 0
) -> Block | None:
    """The next block of the uploads' scan: from the checkpoint, or past `after` (the
    last block taken ahead of it)."""
    in_range = and_(
        _screened_uploads(),
        Upload.id > max(job.uploads_through, after),
        Upload.id <= (job.upload_horizon or 0),
    )
    ids = list(session.scalars(select(Upload.id).where(in_range).order_by(Upload.id).limit(size)))
    if not ids:
        return None
    wanted = and_(Upload.id.in_(ids), ~_upload_embedded(model.id))
    return _block(job, model, _upload_items(session, wanted, size), ids[-1], len(ids))


def _entry_block(
    session: Session, job: ReembedJob, model: EmbeddingModel, size: int, after: int = 0
) -> Block | None:
    """The next block of the entries' scan, as `_upload_block`."""
    in_range = and_(
        BankEntry.source_ref.is_not(None),
        BankEntry.id > max(job.entries_through, after),
        BankEntry.id <= (job.entry_horizon or 0),
    )
    ids = list(
        session.scalars(select(BankEntry.id).where(in_range).order_by(BankEntry.id).limit(size))
    )
    if not ids:
        return None
    wanted = and_(BankEntry.id.in_(ids), ~_entry_embedded(model.id))
    return _block(job, model, _entry_items(session, wanted, size), ids[-1], len(ids))


def _catch_up_block(
    session: Session, job: ReembedJob, model: EmbeddingModel, size: int
) -> Block | None:
    uploads = _upload_items(
        session,
        and_(
            _screened_uploads(),
            Upload.id > (job.upload_horizon or 0),
            ~_upload_embedded(model.id),
            ~_failed_before(job.id, ReembedFailure.upload_id == Upload.id),
        ),
        size,
    )
    entries = _entry_items(
        session,
        and_(
            BankEntry.id > (job.entry_horizon or 0),
            ~_entry_embedded(model.id),
            ~_failed_before(job.id, ReembedFailure.bank_entry_id == BankEntry.id),
        ),
        max(0, size - len(uploads)),
    )
    items = uploads + entries
    return _block(job, model, items, 0, 0) if items else None


def record(session: Session, block: Block, outcomes: Sequence[Outcome]) -> NextStep | None:
    """Record a block's outcomes and move the job's checkpoint, in the caller's
    transaction; the step to send next (after the caller commits), or None if the job
    finished meanwhile (its model retired, or failed)."""
    job = session.get(ReembedJob, block.job_id, with_for_update=True, populate_existing=True)
    if job is None or job.status in FINAL_REEMBED_STATUSES:
        return None
    embedded = _insert_vectors(session, block.model_id, outcomes)
    failed = _insert_failures(session, job, outcomes)
    job.embedded += embedded
    if block.phase is ReembedStatus.UPLOADS and block.through > job.uploads_through:
        job.uploads_through = block.through
        job.uploads_done += block.covered
    elif block.phase is ReembedStatus.ENTRIES and block.through > job.entries_through:
        job.entries_through = block.through
        job.entries_done += block.covered
    elif block.phase is ReembedStatus.CATCHING_UP:
        # Items past the horizons, counted (in the totals too) as they are handled, each
        # once: an embedded one is not found again, a failed one not looked for again.
        ok = [o for o in outcomes if o.reason is None]
        uploads = sum(o.item.kind == "upload" for o in ok) + failed["upload"]
        entries = sum(o.item.kind == "entry" for o in ok) + failed["entry"]
        job.uploads_done += uploads
        job.entries_done += entries
        job.uploads_total = (job.uploads_total or 0) + uploads
        job.entries_total = (job.entries_total or 0) + entries
    job.next_run_at = func.now()
    return NextStep(job.id, job.step)


def _insert_vectors(session: Session, model_id: int, outcomes: Sequence[Outcome]) -> int:
    uploads = [
        {
            "upload_id": o.item.id,
            "model_id": model_id,
            "frame_index": frame,
            "vector": vector_to_bytes(v),
        }
        for o in outcomes
        if o.item.kind == "upload" and o.reason is None
        for frame, v in o.vectors
    ]
    entries = [
        {"bank_entry_id": o.item.id, "model_id": model_id, "vector": vector_to_bytes(v)}
        for o in outcomes
        if o.item.kind == "entry" and o.reason is None
        for _, v in o.vectors[:1]  # an entry has one embedding per model: its first frame's
    ]
    inserted = 0
    if uploads:
        inserted += len(
            session.execute(
                insert(Embedding).values(uploads).on_conflict_do_nothing().returning(Embedding.id)
            ).all()
        )
    if entries:
        inserted += len(
            session.execute(
                insert(BankEntryEmbedding)
                .values(entries)
                .on_conflict_do_nothing()
                .returning(BankEntryEmbedding.id)
            ).all()
        )
    return inserted


def _insert_failures(
    session: Session, job: ReembedJob, outcomes: Sequence[Outcome]
) -> dict[str, int]:
    """The failures not yet recorded for this job; how many were new, by kind. Counted by
    reason on the job."""
    rows = [
        {
            "job_id": job.id,
            "upload_id": o.item.id if o.item.kind == "upload" else None,
            "bank_entry_id": o.item.id if o.item.kind == "entry" else None,
            "reason": (o.reason or "unknown")[:64],
            "message": o.message or "",
        }
        for o in outcomes
        if o.reason is not None
    ]
    new = {"upload": 0, "entry": 0}
    if not rows:
        return new
    inserted = session.execute(
        insert(ReembedFailure)
        .values(rows)
        .on_conflict_do_nothing()
        .returning(ReembedFailure.upload_id, ReembedFailure.reason)
    ).all()
    failures = dict(job.failures or {})
    for upload_id, reason in inserted:
        failures[reason] = failures.get(reason, 0) + 1
        new["upload" if upload_id is not None else "entry"] += 1
    job.failures = failures
    return new


def _finish(job: ReembedJob, status: ReembedStatus, error: str | None) -> None:
    job.status = status
    job.error = error
    job.finished_at = func.now()
    job.next_run_at = func.now()


def record_failure(session: Session, job_id: int, message: str) -> None:
    """A step failed on something no retry will fix (a bug): the job stops, visibly."""
    job = session.get(ReembedJob, job_id, with_for_update=True, populate_existing=True)
    if job is not None and job.status not in FINAL_REEMBED_STATUSES:
        _finish(job, ReembedStatus.FAILED, message)


def find_due(session: Session, *, stalled_after_s: float, limit: int = 100) -> list[NextStep]:
    """Jobs to send now: those catching up whose settle time is over, and unfinished ones
    whose next step is overdue by `stalled_after_s` (their message or worker was lost).
    Marks them sent now; the caller sends the steps after committing."""
    now = func.now()
    jobs = session.scalars(
        select(ReembedJob)
        .where(
            ReembedJob.status.not_in(FINAL_REEMBED_STATUSES),
            (ReembedJob.next_run_at < now - timedelta(seconds=stalled_after_s))
            | (
                (ReembedJob.status == ReembedStatus.CATCHING_UP)
                & (ReembedJob.settle_until <= now)
                & (ReembedJob.next_run_at == ReembedJob.settle_until)
            ),
        )
        .order_by(ReembedJob.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for job in jobs:
        job.next_run_at = now
    return [NextStep(job.id, job.step) for job in jobs]


# Reading.


@dataclass(frozen=True)
class JobView:
    id: int
    model: str
    status: str
    done: int
    total: int | None
    uploads_done: int
    uploads_total: int | None
    entries_done: int
    entries_total: int | None
    embedded: int
    failures: dict[str, int]
    rate_per_s: float | None
    eta_s: float | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None


def get_job(session: Session, job_id: int) -> JobView:
    row = session.execute(
        select(ReembedJob, EmbeddingModel.name, func.now())
        .join(EmbeddingModel, EmbeddingModel.id == ReembedJob.model_id)
        .where(ReembedJob.id == job_id)
    ).one_or_none()
    if row is None:
        raise JobNotFound(job_id)
    return _view(*row)


def list_jobs(session: Session, *, unfinished: bool = False, limit: int = 100) -> list[JobView]:
    """Jobs, newest first."""
    query = (
        select(ReembedJob, EmbeddingModel.name, func.now())
        .join(EmbeddingModel, EmbeddingModel.id == ReembedJob.model_id)
        .order_by(ReembedJob.id.desc())
        .limit(limit)
    )
    if unfinished:
        query = query.where(ReembedJob.status.not_in(FINAL_REEMBED_STATUSES))
    return [_view(*row) for row in session.execute(query)]


def _view(job: ReembedJob, model: str, now: datetime) -> JobView:
    total = (
        None
        if job.uploads_total is None or job.entries_total is None
        else job.uploads_total + job.entries_total
    )
    done = job.uploads_done + job.entries_done
    rate = eta = None
    if job.started_at is not None:
        elapsed = ((job.finished_at or now) - job.started_at).total_seconds()
        if elapsed > 0 and done:
            rate = done / elapsed
            if total is not None and job.status not in FINAL_REEMBED_STATUSES:
                eta = max(0, total - done) / rate
    return JobView(
        id=job.id,
        model=model,
        status=job.status.value,
        done=done,
        total=total,
        uploads_done=job.uploads_done,
        uploads_total=job.uploads_total,
        entries_done=job.entries_done,
        entries_total=job.entries_total,
        embedded=job.embedded,
        failures=dict(job.failures or {}),
        rate_per_s=rate,
        eta_s=eta,
        created_by=job.created_by,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
    )


def failures(session: Session, job_id: int, limit: int = 100) -> list[ReembedFailure]:
    return list(
        session.scalars(
            select(ReembedFailure)
            .where(ReembedFailure.job_id == job_id)
            .order_by(ReembedFailure.id)
            .limit(limit)
        )
    )
