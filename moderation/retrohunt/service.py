"""Retro-hunt: when bank entries are added, the uploads screened before them are searched
for them, exactly, and what is found is recorded as hits marked `retroactive`.

The lifecycle of a job, each arrow one transaction:

    entries added ─▶ queued ─▶ scanning (a block of uploads at a time, checkpointed)
                              ─▶ settling (no message: the sweeper sends the job once
                                 `settle_until` has passed)
                              ─▶ catching_up (the final pass) ─▶ done

- **Started from the bank change log.** Triggers log every entry added, in the
  transaction that adds it, whoever adds it (the CLI, the API, an import by COPY, plain
  SQL). Every worker's sweeper, and `moderation sweep`, read the log from a checkpoint
  of their own (`start_from_changes`), which pruning never passes: no entry is ever
  committed without its hunt, and banks know nothing of hunting. The job's first
  message is sent after the transaction that made it commits.
- **Exact.** See `search`: nothing is approximate, and a hit records the signal,
  distance, frame and model as screening would have.
- **Idempotent and resumable.** A step runs under the job's row lock, searches the
  blocks after the checkpoint, inserts hits with ON CONFLICT DO NOTHING (hits are unique
  per upload, entry and signal) and moves the checkpoint, all in one transaction. Each
  message names its step: a redelivered message for a step already taken does nothing,
  and the sweeper re-sends a job whose next step is overdue.
- **The race with screening.** Workers match against a bank snapshot refreshed every
  `bank_refresh_s`, so an upload screened while the entries were being added may have
  been matched by a snapshot without them, and its rows committed after the scan passed
  its id. The scan covers uploads up to the newest when it starts; then the job waits
  until `bank_refresh_s + retrohunt_settle_s` after its first step (by then every worker
  matches with the new entries) and searches again every upload screened since
  `retrohunt_settle_s` before the entries' transaction began. An upload escapes both only
  if its screening took more than `retrohunt_settle_s` from matching to commit.
- **Disabled banks are not hunted** (they are not matched either): no job is made for
  entries added to a disabled bank, and a job whose bank is disabled before it runs is
  skipped. `hunt_bank` (`moderation retrohunt start BANK`) hunts a whole bank, e.g. once
  it is enabled again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import InstrumentedAttribute, Session

from moderation.banks.changes import advance, read_as
from moderation.banks.models import Bank, BankChange, BankEntry
from moderation.config import Settings
from moderation.errors import Conflict, NotFound
from moderation.retrohunt.models import FINAL_JOB_STATUSES, JobStatus, RetrohuntJob
from moderation.retrohunt.search import FoundHit, HuntSettings, Targets, UploadFilter
from moderation.review.models import Hit
from moderation.screening.models import Upload, UploadStatus
from moderation.webhooks import service as webhooks
from moderation.webhooks.models import EventType

logger = logging.getLogger(__name__)

# Uploads searched per block: the checkpoint moves a block at a time. 2,000 uploads of
# one frame each are 6 MB of 768-d vectors, searched against the entries in one call.
BLOCK_UPLOADS = 2000
# Hits inserted per statement.
_HITS_PER_INSERT = 1000
# Its name among the bank change log's readers (`moderation.banks.changes.read_as`).
RETROHUNT_READER = "retrohunt"


class NothingToHunt(Conflict):
    code = "nothing_to_hunt"


class JobNotFound(NotFound):
    code = "job_not_found"

    def __init__(self, job_id: int) -> None:
        super().__init__(f"no retro-hunt job with id {job_id}; see `moderation retrohunt list`")


@dataclass(frozen=True)
class NextStep:
    job_id: int
    step: int


@dataclass(frozen=True)
class JobView:
    id: int
    bank: str
    status: str
    entries: int
    first_entry_id: int
    last_entry_id: int
    uploads_scanned: int
    uploads_total: int | None
    vectors_scanned: int
    hits_found: int
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None

    @property
    def progress(self) -> str:
        if self.uploads_total is None:
            return "not started"
        if self.uploads_total == 0:
            return "no uploads to scan"
        return f"{self.uploads_scanned:,} of {self.uploads_total:,} uploads"


def hunt_settings(settings: Settings) -> HuntSettings:
    return HuntSettings(settings.match_radius, settings.pdq_threshold, settings.pdq_min_quality)


def create_job(
    session: Session,
    bank: Bank,
    first_entry_id: int,
    last_entry_id: int,
    count: int,
    *,
    created_by: str,
    entries_added_at: datetime | None = None,
) -> RetrohuntJob | None:
    """A job for entries of `bank` with ids in [first, last], in the caller's
    transaction; the caller sends its first step after that transaction commits. None
    for a disabled bank or no entries. `entries_added_at`: when the transaction that
    added them began (the catch-up searches from a little before it), now by default."""
    if count == 0 or not bank.enabled:
        return None
    job = RetrohuntJob(
        bank_id=bank.id,
        first_entry_id=first_entry_id,
        last_entry_id=last_entry_id,
        entries=count,
        created_by=created_by[:200],
        status=JobStatus.QUEUED,
        next_run_at=func.now(),
    )
    if entries_added_at is not None:
        job.created_at = entries_added_at
    session.add(job)
    session.flush()
    return job


def hunt_bank(session: Session, bank: Bank, *, created_by: str) -> RetrohuntJob:
    """A job over every entry of `bank`, e.g. after it was enabled again."""
    if not bank.enabled:
        raise NothingToHunt(f"bank {bank.name!r} is disabled; disabled banks are not hunted")
    first, last, count = session.execute(
        select(func.min(BankEntry.id), func.max(BankEntry.id), func.count()).where(
            BankEntry.bank_id == bank.id
        )
    ).one()
    job = create_job(session, bank, first or 0, last or 0, count, created_by=created_by)
    if job is None:
        raise NothingToHunt(f"bank {bank.name!r} has no entries to hunt for")
    return job


def start_from_changes(session: Session, *, settle_wait_s: float = 1.0) -> list[NextStep] | None:
    """Jobs for the entries added (or whose hashes or bank changed) since the last call,
    read from the bank change log, which triggers write in the transaction of every
    change (`moderation.banks.changes`): no way of adding entries escapes a hunt, and
    adding them needs to know nothing of hunting. One job per bank, over the range of
    its entries' ids. Returns the first steps, to send after the caller commits; None
    when it cannot read now: another caller is starting jobs, or a transaction that
    could still add entries has not ended within `settle_wait_s` (a long transaction
    anywhere on the server: see `moderation.commit_horizon`). Call it in a session that
    has written nothing yet (see `banks.changes.read_as`)."""
    read = read_as(session, RETROHUNT_READER, settle_wait_s)
    if read is None:
        return None
    if read.missed:
        # Pruning never passes a reader's checkpoint, so only a hand-edited database gets
        # here: hunt every enabled bank whole rather than miss an entry.
        logger.error(
            "the bank change log was pruned past the retro-hunt's checkpoint; hunting "
            "every enabled bank whole"
        )
        banks = session.scalars(select(Bank).where(Bank.enabled)).all()
        jobs = [j for b in banks if (j := _hunt_whole(session, b)) is not None]
    else:
        jobs = jobs_for_changes(session, read.after, read.through)
    advance(session, RETROHUNT_READER, read.through)
    if jobs:
        logger.info("started retro-hunt job(s) %s", [job.id for job in jobs])
    return [NextStep(job.id, 0) for job in jobs]


def jobs_for_changes(session: Session, after: int, through: int) -> list[RetrohuntJob]:
    """Jobs for the entries that the log rows with ids in (`after`, `through`] name, one
    per enabled bank, in the caller's transaction."""
    added = (
        select(
            Bank,
            func.min(BankEntry.id),
            func.max(BankEntry.id),
            func.count(BankEntry.id.distinct()),
            func.min(BankChange.created_at),
            func.string_agg(BankEntry.added_by.distinct(), ", "),
        )
        .select_from(BankChange)
        .join(BankEntry, BankEntry.id == BankChange.bank_entry_id)
        .join(Bank, Bank.id == BankEntry.bank_id)
        .where(
            BankChange.id > after,
            BankChange.id <= through,
            # The entry's own row; its embeddings' rows name a model.
            BankChange.model_id.is_(None),
            Bank.enabled,
        )
        .group_by(Bank.id)
        .order_by(Bank.id)
    )
    jobs = []
    for bank, first, last, count, added_at, added_by in session.execute(added):
        job = create_job(
            session, bank, first, last, count, created_by=added_by, entries_added_at=added_at
        )
        if job is not None:
            jobs.append(job)
    return jobs


def _hunt_whole(session: Session, bank: Bank) -> RetrohuntJob | None:
    try:
        return hunt_bank(session, bank, created_by="retro-hunt recovery")
    except NothingToHunt:  # no entries
        return None


# Running a job.


def run_step(
    session: Session,
    job_id: int,
    step: int,
    settings: Settings,
    targets: TargetCache,
    *,
    budget_s: float | None = None,
    block_uploads: int = BLOCK_UPLOADS,
) -> NextStep | None:
    """Run step `step` of a job: search blocks of uploads for `budget_s` (default
    `retrohunt_step_s`), then return the step to send next, or None when the job is
    finished, settling (see `find_due`) or the step was already taken. The caller
    commits, then sends it."""
    job = session.get(RetrohuntJob, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.step != step or job.status in FINAL_JOB_STATUSES:
        return None
    job.step += 1
    bank = session.get_one(Bank, job.bank_id)
    if not bank.enabled:
        _finish(job, JobStatus.SKIPPED, f"bank {bank.name!r} was disabled; it is not hunted")
        targets.forget(job.id)
        return None
    if job.status is JobStatus.QUEUED:
        _start(session, job, settings)
    deadline = time.monotonic() + (settings.retrohunt_step_s if budget_s is None else budget_s)
    found = targets.get(session, job, bank, hunt_settings(settings))
    announce = webhooks.screening_hits_enabled(settings)
    if job.status is JobStatus.SCANNING:
        _scan(session, job, found, deadline, block_uploads, announce)
    if job.status is JobStatus.SETTLING:
        # The database's clock, which set `settle_until`, not this machine's.
        now = session.scalars(select(func.now())).one()
        if job.settle_until is not None and job.settle_until > now:
            # No message waits meanwhile: the sweeper sends the job once it is due.
            job.next_run_at = job.settle_until
            return None
        job.status = JobStatus.CATCHING_UP
    if job.status is JobStatus.CATCHING_UP:
        _catch_up(
            session, job, found, deadline, block_uploads, settings.retrohunt_settle_s, announce
        )
    if job.status is JobStatus.DONE:
        targets.forget(job.id)
        return None
    job.next_run_at = func.now()
    return NextStep(job.id, job.step)


def _start(session: Session, job: RetrohuntJob, settings: Settings) -> None:
    horizon = session.scalar(select(func.max(Upload.id))) or 0
    job.status = JobStatus.SCANNING
    job.started_at = func.now()
    job.horizon_upload_id = horizon
    job.uploads_total = session.scalar(select(func.count()).where(Upload.id <= horizon)) or 0
    # Now is after the entries' commit: every worker's snapshot has them
    # `bank_refresh_s` from now.
    job.settle_until = func.now() + _seconds(settings.bank_refresh_s + settings.retrohunt_settle_s)
    session.flush()


def _scan(
    session: Session,
    job: RetrohuntJob,
    targets: Targets,
    deadline: float,
    block_uploads: int,
    announce: bool,
) -> None:
    horizon = job.horizon_upload_id or 0
    while job.scanned_through_upload_id < horizon:
        low = job.scanned_through_upload_id
        block = (
            select(Upload.id)
            .where(Upload.id > low, Upload.id <= horizon)
            .order_by(Upload.id)
            .limit(block_uploads)
            .subquery()
        )
        high, count = session.execute(select(func.max(block.c.id), func.count())).one()
        high = high or horizon
        hits, vectors = targets.search(session, _between(low, high))
        job.hits_found += _record(session, hits, announce)
        job.vectors_scanned += vectors
        job.uploads_scanned += count
        job.scanned_through_upload_id = high
        if time.monotonic() >= deadline:
            return
    job.status = JobStatus.SETTLING


def _catch_up(
    session: Session,
    job: RetrohuntJob,
    targets: Targets,
    deadline: float,
    block_uploads: int,
    settle_s: float,
    announce: bool,
) -> None:
    """Search again the uploads screened since `settle_s` before the entries' transaction
    began: those a worker may have matched with a snapshot that predates the entries (see
    the module docstring)."""
    while True:
        ids = list(
            session.scalars(
                select(Upload.id)
                .where(
                    Upload.status == UploadStatus.SCREENED,
                    Upload.updated_at >= job.created_at - timedelta(seconds=settle_s),
                    Upload.id > job.caught_up_through_upload_id,
                )
                .order_by(Upload.id)
                .limit(block_uploads)
            )
        )
        if not ids:
            _finish(job, JobStatus.DONE, None)
            return
        hits, vectors = targets.search(session, _among(ids))
        job.hits_found += _record(session, hits, announce)
        job.vectors_scanned += vectors
        job.caught_up_through_upload_id = ids[-1]
        if time.monotonic() >= deadline:
            return


def _between(low: int, high: int) -> UploadFilter:
    """Uploads with ids in (low, high]."""

    def where(column: InstrumentedAttribute[int]) -> ColumnElement[bool]:
        return (column > low) & (column <= high)

    return where


def _among(ids: list[int]) -> UploadFilter:
    def where(column: InstrumentedAttribute[int]) -> ColumnElement[bool]:
        return column.in_(ids)

    return where


def _record(session: Session, hits: list[FoundHit], announce: bool) -> int:
    """Insert hits marked retroactive; those screening (or an earlier run) already
    recorded are left as they are. Returns how many were new. When screening hits are
    announced (`announce`), the new ones are too, in this transaction (`upload.hit`, each
    hit carrying `retroactive: true`)."""
    new_hits: list[tuple[int, int]] = []
    for start in range(0, len(hits), _HITS_PER_INSERT):
        rows = [
            {
                "upload_id": hit.upload_id,
                "bank_entry_id": hit.bank_entry_id,
                "signal": hit.signal,
                "distance": hit.distance,
                "frame_index": hit.frame_index,
                "model_id": hit.model_id,
                "threshold": hit.threshold,
                "retroactive": True,
            }
            for hit in hits[start : start + _HITS_PER_INSERT]
        ]
        inserted = session.execute(
            insert(Hit).values(rows).on_conflict_do_nothing().returning(Hit.id, Hit.upload_id)
        ).all()
        new_hits.extend((hit_id, upload_id) for hit_id, upload_id in inserted)
    if new_hits and announce:
        webhooks.enqueue(
            session,
            EventType.HIT,
            sorted({upload_id for _, upload_id in new_hits}),
            hit_ids=[hit_id for hit_id, _ in new_hits],
        )
    return len(new_hits)


def _finish(job: RetrohuntJob, status: JobStatus, error: str | None) -> None:
    job.status = status
    job.error = error
    job.finished_at = func.now()
    job.next_run_at = func.now()


def record_failure(session: Session, job_id: int, message: str) -> None:
    """A step failed on something a retry will not fix (a malformed stored vector, a bug):
    the job stops, visibly, with the error."""
    job = session.get(RetrohuntJob, job_id, with_for_update=True, populate_existing=True)
    if job is not None and job.status not in FINAL_JOB_STATUSES:
        _finish(job, JobStatus.FAILED, message)


class TargetCache:
    """The entries of the job a process is running, kept between its steps: a job of
    100,000 entries would otherwise load them again for every block."""

    def __init__(self) -> None:
        self._job_id: int | None = None
        self._targets: Targets | None = None

    def get(
        self, session: Session, job: RetrohuntJob, bank: Bank, settings: HuntSettings
    ) -> Targets:
        if self._job_id != job.id or self._targets is None or self._targets.settings != settings:
            self._targets = Targets(session, bank, job.first_entry_id, job.last_entry_id, settings)
            self._job_id = job.id
        return self._targets

    def forget(self, job_id: int) -> None:
        if self._job_id == job_id:
            self._job_id, self._targets = None, None


# Recovery.


def unfinished_jobs(session: Session, *, bank_id: int | None = None) -> list[int]:
    """The jobs not yet final (of one bank), oldest first."""
    query = select(RetrohuntJob.id).where(RetrohuntJob.status.not_in(FINAL_JOB_STATUSES))
    if bank_id is not None:
        query = query.where(RetrohuntJob.bank_id == bank_id)
    return list(session.scalars(query.order_by(RetrohuntJob.id)))


def find_due(session: Session, *, stalled_after_s: float, limit: int = 100) -> list[NextStep]:
    """Jobs to send now: those settling whose wait is over, and unfinished ones whose next
    step is overdue by `stalled_after_s` (their message or their worker was lost). Marks
    them sent now (so the next sweep leaves them alone for `stalled_after_s`) and returns
    the steps to send, after the caller commits. Jobs whose step is running hold their row
    lock and are skipped."""
    now = func.now()
    jobs = session.scalars(
        select(RetrohuntJob)
        .where(
            RetrohuntJob.status.not_in(FINAL_JOB_STATUSES),
            (RetrohuntJob.next_run_at < now - _seconds(stalled_after_s))
            | ((RetrohuntJob.status == JobStatus.SETTLING) & (RetrohuntJob.next_run_at <= now)),
        )
        .order_by(RetrohuntJob.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for job in jobs:
        if job.status is JobStatus.SETTLING:
            job.status = JobStatus.CATCHING_UP
        job.next_run_at = now
    return [NextStep(job.id, job.step) for job in jobs]


# Reading.


def get_job(session: Session, job_id: int) -> JobView:
    row = session.execute(
        select(RetrohuntJob, Bank.name)
        .join(Bank, Bank.id == RetrohuntJob.bank_id)
        .where(RetrohuntJob.id == job_id)
    ).one_or_none()
    if row is None:
        raise JobNotFound(job_id)
    return _view(*row)


def list_jobs(
    session: Session, *, status: JobStatus | None = None, limit: int | None = 100
) -> list[JobView]:
    """Jobs, newest first."""
    query = (
        select(RetrohuntJob, Bank.name)
        .join(Bank, Bank.id == RetrohuntJob.bank_id)
        .order_by(RetrohuntJob.id.desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(RetrohuntJob.status == status)
    return [_view(job, bank) for job, bank in session.execute(query)]


def _view(job: RetrohuntJob, bank: str) -> JobView:
    return JobView(
        id=job.id,
        bank=bank,
        status=job.status.value,
        entries=job.entries,
        first_entry_id=job.first_entry_id,
        last_entry_id=job.last_entry_id,
        uploads_scanned=job.uploads_scanned,
        uploads_total=job.uploads_total,
        vectors_scanned=job.vectors_scanned,
        hits_found=job.hits_found,
        created_by=job.created_by,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
    )


def _seconds(seconds: float) -> ColumnElement[timedelta]:
    return func.make_interval(0, 0, 0, 0, 0, 0, seconds)
