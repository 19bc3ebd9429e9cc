"""The lifecycle of an upload in the database: submitted, claimed, screened or failed.

Every function takes a session and leaves committing to the caller, so each state change
is one transaction. Messages that announce a change are sent by the caller after commit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    LargeBinary,
    String,
    Text,
    Update,
    bindparam,
    cast,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from moderation.audit import service as audit
from moderation.bulk_insert import ArrayRows, insert_rows_statement
from moderation.embedding.models import Embedding
from moderation.embedding.service import vector_to_bytes
from moderation.errors import Conflict, NotFound
from moderation.images.signals import ImageSignals, SignalType
from moderation.screening.models import AS_STORED_FRAME, Signal, Upload, UploadStatus, Worker

if TYPE_CHECKING:
    from moderation.banks.matcher import Match

FINAL_STATUSES = (UploadStatus.SCREENED, UploadStatus.FAILED)


class UploadNotFound(NotFound):
    code = "upload_not_found"

    def __init__(self, upload_id: int) -> None:
        super().__init__(f"no upload with id {upload_id}")


class ExternalIdConflict(Conflict):
    """An external id names one event: submitting it with another URI or other bytes is
    refused, never answered with the first image's result (that would let an uploader
    swap a clean image's verdict onto another image)."""

    code = "external_id_conflict"

    def __init__(self, external_id: str, upload: Upload, reason: str) -> None:
        super().__init__(
            f"external id {external_id!r} already names upload {upload.id}, {reason}; "
            "use a new external id for a new image",
            upload_id=upload.id,
        )
        self.upload_id = upload.id


class NotResubmittable(Conflict):
    """Only a failed upload is submitted again."""

    code = "not_resubmittable"


@dataclass(frozen=True)
class Claim:
    """What a worker needs to screen a claimed upload."""

    uri: str
    # The bytes' SHA-256 as the submitter declared it; other bytes are refused.
    declared_sha256: bytes | None = None
    # Who submitted it (`Upload.submitted_by`): its fetch counts against their slots.
    submitted_by: str | None = None


@dataclass(frozen=True)
class NewUpload:
    """One upload event as a producer sends it."""

    uri: str
    # The producer's own id for the event; submitting it again returns the same upload.
    external_id: str | None = None
    # The SHA-256 the producer declares for the bytes; the worker refuses other bytes.
    declared_sha256: bytes | None = None
    # The producer's own fields, stored with the upload and returned as given.
    metadata: dict[str, Any] | None = None
    # Who submits it: an API key (`Principal.actor`) or the operator (`cli:USER`).
    submitted_by: str | None = None


@dataclass(frozen=True)
class Submitted:
    upload_id: int
    # False when the external id named an upload already recorded (nothing new to screen).
    created: bool


def _insert_named_statement() -> ReturningInsert[int, str | None]:
    """Insert events with external ids, their columns as one array each, unnested by
    PostgreSQL: the statement is the same for every batch, so SQLAlchemy compiles it once
    (a VALUES list of 100 rows was compiled again for each batch: 7 of the 12 ms that
    `submit_uploads` took for 100 events, measured with pyinstrument)."""
    rows = (
        func.unnest(
            bindparam("uris", type_=ARRAY(Text)),
            bindparam("external_ids", type_=ARRAY(String)),
            bindparam("sha256s", type_=ARRAY(LargeBinary)),
            bindparam("metadata", type_=ARRAY(Text)),
            bindparam("submitted_by", type_=ARRAY(String)),
        )
        .table_valued("uri", "external_id", "declared_sha256", "metadata", "submitted_by")
        .render_derived(name="events")
    )
    events = select(
        rows.c.uri,
        rows.c.external_id,
        rows.c.declared_sha256,
        cast(rows.c.metadata, JSONB),
        rows.c.submitted_by,
        literal(UploadStatus.QUEUED.value),
        func.now(),
    )
    return (
        insert(Upload)
        .from_select(
            [
                Upload.uri,
                Upload.external_id,
                Upload.declared_sha256,
                Upload.event_metadata,
                Upload.submitted_by,
                Upload.status,
                Upload.enqueued_at,
            ],
            events,
        )
        .on_conflict_do_nothing(index_elements=[Upload.external_id])
        .returning(Upload.id, Upload.external_id)
    )


_INSERT_NAMED = _insert_named_statement()


def submit_uploads(session: Session, uploads: Sequence[NewUpload]) -> list[Submitted]:
    """Record upload events as queued, one INSERT for the events with an external id and
    one for those without; their ids, in order.

    An external id seen before (in an earlier call or earlier in `uploads`) returns that
    upload instead, if it is the same event: the same URI and, where both sides know them,
    the same bytes. Otherwise raises `ExternalIdConflict` and the caller rolls back.

    The caller publishes the screening messages after committing, for the created ones only.
    """
    results: list[Submitted | None] = [None] * len(uploads)
    named = [(i, u) for i, u in enumerate(uploads) if u.external_id is not None]
    anonymous = [(i, u) for i, u in enumerate(uploads) if u.external_id is None]
    if anonymous:
        anonymous_statement = (
            insert(Upload)
            .values(status=UploadStatus.QUEUED, enqueued_at=func.now())
            .returning(Upload.id, sort_by_parameter_order=True)
        )
        ids = session.connection().scalars(anonymous_statement, [_row(u) for _, u in anonymous])
        for (i, _), upload_id in zip(anonymous, ids, strict=True):
            results[i] = Submitted(upload_id, True)
    if named:
        # One statement: a row whose external id exists (or repeats within these rows) is
        # skipped by ON CONFLICT, and comes back through the lookup below.
        created = {
            external_id: id_
            for id_, external_id in session.connection().execute(
                _INSERT_NAMED,
                {
                    "uris": [u.uri for _, u in named],
                    "external_ids": [u.external_id for _, u in named],
                    "sha256s": [u.declared_sha256 for _, u in named],
                    "metadata": [
                        None if u.metadata is None else json.dumps(u.metadata) for _, u in named
                    ],
                    "submitted_by": [u.submitted_by for _, u in named],
                },
            )
        }
        seen: set[str] = set()
        repeated: list[tuple[int, NewUpload]] = []
        for i, upload in named:
            assert upload.external_id is not None
            if upload.external_id in created and upload.external_id not in seen:
                results[i] = Submitted(created[upload.external_id], True)
            else:
                repeated.append((i, upload))
            seen.add(upload.external_id)
        if repeated:
            existing = {
                row.external_id: row
                for row in session.scalars(
                    select(Upload).where(
                        Upload.external_id.in_({u.external_id for _, u in repeated})
                    )
                )
            }
            for i, upload in repeated:
                assert upload.external_id is not None
                row = existing[upload.external_id]
                _check_same_event(session, row, upload)
                results[i] = Submitted(row.id, False)
    return [result for result in results if result is not None]


def _row(upload: NewUpload) -> dict[str, Any]:
    return {
        "uri": upload.uri,
        "external_id": upload.external_id,
        "declared_sha256": upload.declared_sha256,
        "event_metadata": upload.metadata,
        "submitted_by": upload.submitted_by,
    }


def _check_same_event(session: Session, existing: Upload, upload: NewUpload) -> None:
    assert upload.external_id is not None
    if existing.uri != upload.uri:
        raise ExternalIdConflict(upload.external_id, existing, f"submitted as {existing.uri}")
    if upload.declared_sha256 is None:
        return
    known_sha256 = existing.declared_sha256 or screened_sha256(session, existing.id)
    if known_sha256 is None:
        # Accepting it would bind nothing: the worker screens what the first submit
        # declared (no bytes), whatever the URI serves when it gets there.
        raise ExternalIdConflict(
            upload.external_id,
            existing,
            "submitted without a declared SHA-256 and not yet screened, so these bytes "
            "cannot be bound to it",
        )
    if known_sha256 != upload.declared_sha256:
        raise ExternalIdConflict(upload.external_id, existing, "whose bytes differ from these")


def submit(
    session: Session,
    uri: str,
    external_id: str | None = None,
    declared_sha256: bytes | None = None,
) -> tuple[Upload, bool]:
    """`submit_uploads` for one upload: the upload and whether it was created."""
    (submitted,) = submit_uploads(session, [NewUpload(uri, external_id, declared_sha256)])
    return session.get_one(Upload, submitted.upload_id), submitted.created


def screened_sha256(session: Session, upload_id: int) -> bytes | None:
    """The SHA-256 of the bytes the upload was screened as; None before screening."""
    return session.scalar(
        select(Signal.value).where(
            Signal.upload_id == upload_id, Signal.signal == SignalType.SHA256
        )
    )


def resubmit(session: Session, upload_id: int, *, actor: str) -> Upload:
    """Queue a failed upload to be screened again from scratch, and audit who did it.

    Only failed uploads: a screened one has its verdict, and one in flight will end by
    itself. The caller publishes the screening message after committing.
    """
    upload = _locked_upload(session, upload_id)
    if upload.status is not UploadStatus.FAILED:
        raise NotResubmittable(
            f"upload {upload_id} is {upload.status.value}; only failed uploads can be "
            "screened again"
        )
    before = {
        "status": upload.status.value,
        "error_code": upload.error_code,
        "error_message": upload.error_message,
        "attempts": upload.attempts,
    }
    upload.status = UploadStatus.QUEUED
    upload.error_code = None
    upload.error_message = None
    upload.attempts = 0
    upload.held_by = None
    upload.enqueued_at = func.now()
    upload.started_at = None
    upload.finished_at = None
    audit.record(
        session,
        actor=actor,
        action="upload.resubmit",
        subject_type="upload",
        subject_id=upload_id,
        before=before,
        after={"status": UploadStatus.QUEUED.value, "attempts": 0},
    )
    return upload


def submit_many(session: Session, uris: Sequence[str]) -> list[int]:
    """Record uploads without external ids as queued, in one statement; their ids, in order."""
    return [s.upload_id for s in submit_uploads(session, [NewUpload(uri) for uri in uris])]


def claim(
    session: Session, upload_id: int, *, max_attempts: int, worker: str | None = None
) -> Claim | None:
    """Mark an upload as being processed by `worker` and return what screening it needs,
    or None if nothing is left to do.

    The attempt counter survives crashes and redeliveries, so an image that kills the
    worker every time is failed after `max_attempts` instead of looping forever. The
    holder (`workers.name`; None for a claimer that keeps no heartbeat) lets the sweeper
    send the upload again as soon as that worker is dead (see `moderation.worker.recovery`).
    """
    return claim_many(session, [upload_id], max_attempts=max_attempts, worker=worker)[0]


def claim_many(
    session: Session,
    upload_ids: Sequence[int],
    *,
    max_attempts: int,
    worker: str | None = None,
) -> list[Claim | None]:
    """`claim` for many uploads at once: their claims, in order, None where nothing is left
    to do.

    An id given twice (two deliveries of one message) is claimed once and gets its claim
    twice; recording is what settles such duplicates.
    """
    # One statement in the common case; the row locks order concurrent duplicates. Core, on
    # the session's connection: the ORM's bulk-update machinery costs more than the query.
    unique_ids = set(upload_ids)
    statement = (
        update(Upload)
        .where(
            Upload.id.in_(unique_ids),
            Upload.status.not_in(FINAL_STATUSES),
            Upload.attempts < max_attempts,
        )
        .values(
            status=UploadStatus.PROCESSING,
            attempts=Upload.attempts + 1,
            held_by=worker,
            started_at=func.now(),
        )
        .returning(Upload.id, Upload.uri, Upload.declared_sha256, Upload.submitted_by)
    )
    claimed = {
        id_: Claim(uri, declared, submitter)
        for id_, uri, declared, submitter in session.connection().execute(statement)
    }
    for upload_id in unique_ids - claimed.keys():
        upload = _locked_upload(session, upload_id)
        if upload.status not in FINAL_STATUSES:
            _finish_failed(
                upload,
                "too_many_attempts",
                f"gave up after {upload.attempts} attempts; last error: "
                f"{upload.error_code or 'none recorded'}: {upload.error_message or ''}".rstrip(
                    ": "
                ),
            )
    return [claimed.get(upload_id) for upload_id in upload_ids]


@dataclass(frozen=True)
class Screened:
    """What screening found for one upload, ready to be recorded."""

    upload_id: int
    signals: ImageSignals
    # The embedded frames' vectors (n, dim) under each model computed, by model id.
    vectors: Mapping[int, np.ndarray]
    matches: Sequence[Match]


def _mark_screened_statement() -> Update:
    """Mark many uploads screened, with their dimensions, in one statement whose rows
    arrive as one array per column, unnested by PostgreSQL: the statement is the same for
    every group, so SQLAlchemy compiles it once (a VALUES list of literal rows was compiled
    again for every group: a tenth of a worker's Python time, measured with py-spy)."""
    rows = (
        func.unnest(
            bindparam("ids", type_=ARRAY(BigInteger)),
            bindparam("formats", type_=ARRAY(String)),
            bindparam("widths", type_=ARRAY(Integer)),
            bindparam("heights", type_=ARRAY(Integer)),
            bindparam("frame_counts", type_=ARRAY(Integer)),
            bindparam("frames_hashed", type_=ARRAY(Integer)),
        )
        .table_valued("id", "media_format", "width", "height", "frame_count", "frames_hashed")
        .render_derived(name="screened")
    )
    # Not a final upload: the update takes the row locks first, so a concurrent duplicate
    # waits here, then finds its upload final and writes nothing.
    return (
        update(Upload)
        .where(Upload.id == rows.c.id, Upload.status.not_in(FINAL_STATUSES))
        .values(
            status=UploadStatus.SCREENED,
            error_code=None,
            error_message=None,
            media_format=rows.c.media_format,
            width=rows.c.width,
            height=rows.c.height,
            frame_count=rows.c.frame_count,
            frames_hashed=rows.c.frames_hashed,
            finished_at=func.now(),
        )
        .returning(Upload.id)
    )


_MARK_SCREENED = _mark_screened_statement()


def record_screened(session: Session, results: Sequence[Screened]) -> list[bool]:
    """Store signals and embeddings and mark the uploads screened, in the caller's
    transaction; the caller records the hits of those written in the same one
    (`moderation.review.service.record_hits`).

    Returns, per result, whether it was written: False when its upload was already final
    (a redelivered or concurrent duplicate, which writes nothing; the unique constraints
    would refuse duplicate rows regardless). Raises `UploadNotFound` for a missing upload.
    """
    first_of_each: dict[int, Screened] = {}
    for result in results:
        first_of_each.setdefault(result.upload_id, result)
    first = list(first_of_each.values())
    connection = session.connection()
    written_ids = set(
        connection.scalars(
            _MARK_SCREENED,
            {
                "ids": [r.upload_id for r in first],
                "formats": [r.signals.format for r in first],
                "widths": [r.signals.width for r in first],
                "heights": [r.signals.height for r in first],
                "frame_counts": [r.signals.frame_count for r in first],
                "frames_hashed": [len(r.signals.frames) for r in first],
            },
        )
    )
    unwritten = first_of_each.keys() - written_ids
    if unwritten:
        existing = set(session.scalars(select(Upload.id).where(Upload.id.in_(unwritten))))
        if missing := unwritten - existing:
            raise UploadNotFound(min(missing))
    written = [r for r in first_of_each.values() if r.upload_id in written_ids]
    if written:
        _insert_screening_rows(connection, written)
    reported: set[int] = set()
    outcome = []
    for result in results:  # a duplicate within the group is reported as not written
        outcome.append(result.upload_id in written_ids and result.upload_id not in reported)
        reported.add(result.upload_id)
    return outcome


_INSERT_SIGNALS = insert_rows_statement(
    Signal,
    {
        "upload_id": BigInteger,
        "signal": String,
        "frame_index": Integer,
        "value": LargeBinary,
        "quality": Integer,
    },
)
_INSERT_EMBEDDINGS = insert_rows_statement(
    Embedding,
    {
        "upload_id": BigInteger,
        "model_id": BigInteger,
        "frame_index": Integer,
        "vector": LargeBinary,
    },
)


def _insert_screening_rows(connection: Connection, results: Sequence[Screened]) -> None:
    signals = ArrayRows("upload_id", "signal", "frame_index", "value", "quality")
    embeddings = ArrayRows("upload_id", "model_id", "frame_index", "vector")
    for result in results:
        upload_id, found = result.upload_id, result.signals
        signals.add(upload_id, SignalType.SHA256.value, 0, found.sha256, None)
        for frame in found.frames:
            signals.add(
                upload_id, SignalType.PDQ.value, frame.index, frame.pdq.bits, frame.pdq.quality
            )
        if found.pdq_as_stored is not None:
            stored = found.pdq_as_stored
            signals.add(
                upload_id, SignalType.PDQ.value, AS_STORED_FRAME, stored.bits, stored.quality
            )
        for model_id, vectors in result.vectors.items():
            for frame, vector in zip(found.embedded_frames, vectors, strict=True):
                embeddings.add(upload_id, model_id, frame.index, vector_to_bytes(vector))
    for statement, rows in (
        (_INSERT_SIGNALS, signals),
        (_INSERT_EMBEDDINGS, embeddings),
    ):
        if rows:
            connection.execute(statement, rows.lists)


def record_failed(session: Session, upload_id: int, code: str, message: str) -> None:
    """A final failure: bad input, or a transient fault that outlived its retries."""
    upload = _locked_upload(session, upload_id)
    if upload.status not in FINAL_STATUSES:
        _finish_failed(upload, code, message)


def record_transient_fault(
    session: Session, upload_id: int, code: str, message: str, *, max_attempts: int
) -> int | None:
    """A fault that may pass. Returns the attempts so far if a retry is due, else None.

    While a retry is pending the upload is back to queued, with the error visible; once
    the attempts are spent it fails with that error.
    """
    upload = _locked_upload(session, upload_id)
    if upload.status in FINAL_STATUSES:
        return None
    if upload.attempts >= max_attempts:
        _finish_failed(upload, code, f"{message} (gave up after {upload.attempts} attempts)")
        return None
    upload.status = UploadStatus.QUEUED
    upload.error_code = code
    upload.error_message = f"retrying: {message}"
    upload.enqueued_at = func.now()
    return upload.attempts


def _locked_upload(session: Session, upload_id: int) -> Upload:
    """The upload, row-locked and freshly read: rows may have changed under Core updates."""
    upload = session.get(Upload, upload_id, with_for_update=True, populate_existing=True)
    if upload is None:
        raise UploadNotFound(upload_id)
    return upload


def _finish_failed(upload: Upload, code: str, message: str) -> None:
    upload.status = UploadStatus.FAILED
    upload.error_code = code
    upload.error_message = message
    upload.finished_at = func.now()


def get_upload(session: Session, upload_id: int) -> Upload:
    upload = session.get(Upload, upload_id)
    if upload is None:
        raise UploadNotFound(upload_id)
    return upload


def get_uploads(session: Session, upload_ids: Sequence[int]) -> list[Upload]:
    rows = session.scalars(select(Upload).where(Upload.id.in_(upload_ids))).all()
    by_id = {row.id: row for row in rows}
    return [by_id[i] for i in upload_ids if i in by_id]


def upload_by_external_id(session: Session, external_id: str) -> Upload | None:
    return session.scalar(select(Upload).where(Upload.external_id == external_id))


def upload_signals(session: Session, upload_id: int) -> list[Signal]:
    query = (
        select(Signal)
        .where(Signal.upload_id == upload_id)
        .order_by(Signal.signal, Signal.frame_index)
    )
    return list(session.scalars(query))


def list_uploads(
    session: Session, *, status: UploadStatus | None = None, limit: int | None = 100
) -> list[Upload]:
    """Uploads, newest first; at most `limit` of them."""
    query = select(Upload).order_by(Upload.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Upload.status == status)
    return list(session.scalars(query))


def count_uploads(session: Session, *, status: UploadStatus | None = None) -> int:
    query = select(func.count()).select_from(Upload)
    if status is not None:
        query = query.where(Upload.status == status)
    return session.scalar(query) or 0


def live_workers(session: Session, dead_after_s: float) -> int:
    """Screening workers that are running: a heartbeat within `dead_after_s`, and no clean
    stop (see `moderation.worker.recovery`)."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, dead_after_s)
    query = select(func.count()).where(Worker.stopped_at.is_(None), Worker.heartbeat_at >= cutoff)
    return session.scalar(query) or 0
