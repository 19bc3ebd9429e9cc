from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import InternalError
from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.audit.models import AuditEvent
from moderation.banks import service as banks
from moderation.banks.matcher import Match
from moderation.embedding.models import Embedding
from moderation.embedding.service import get_or_create_model
from moderation.images.hashing import PdqHash
from moderation.images.signals import FrameSignals, ImageSignals, SignalType
from moderation.review.models import Hit
from moderation.screening import service
from moderation.screening.models import Signal, Upload, UploadStatus
from moderation.worker.results import record_results
from tests.conftest import TEST_SETTINGS


def _signals() -> ImageSignals:
    return ImageSignals(
        sha256=b"\x02" * 32,
        format="JPEG",
        width=640,
        height=480,
        frame_count=1,
        frames=[FrameSignals(index=0, pdq=PdqHash(b"\x00" * 32, 90), pixels=np.zeros(1))],
    )


def _count(
    session: Session, model: type[Hit] | type[Signal] | type[Embedding], upload_id: int
) -> int:
    return (
        session.scalar(select(func.count()).select_from(model).where(model.upload_id == upload_id))
        or 0
    )


def _reload(session: Session, upload: Upload) -> None:
    session.flush()
    session.refresh(upload)


def test_submit_is_idempotent_per_external_id(session: Session) -> None:
    first, created = service.submit(session, "file:///a.jpg", external_id="ext-1")
    again, created_again = service.submit(session, "file:///a.jpg", external_id="ext-1")
    other, _ = service.submit(session, "file:///a.jpg")
    assert created
    assert not created_again
    assert again.id == first.id != other.id
    assert first.status is UploadStatus.QUEUED
    assert first.enqueued_at is not None


def test_an_external_id_with_another_uri_or_other_bytes_is_a_conflict(session: Session) -> None:
    digest, other_digest = bytes(range(32)), bytes(32)
    first, _ = service.submit(session, "file:///a.jpg", "ext-2", declared_sha256=digest)
    with pytest.raises(service.ExternalIdConflict, match=r"already names upload \d+"):
        service.submit(session, "file:///b.jpg", "ext-2", declared_sha256=digest)
    with pytest.raises(service.ExternalIdConflict, match="bytes differ"):
        service.submit(session, "file:///a.jpg", "ext-2", declared_sha256=other_digest)
    # The same event again, with or without its bytes declared, is the same upload.
    assert service.submit(session, "file:///a.jpg", "ext-2", declared_sha256=digest)[0] is first
    assert service.submit(session, "file:///a.jpg", "ext-2")[0] is first


def test_an_external_id_conflicts_with_the_bytes_screened_too(session: Session) -> None:
    """Submitted without declared bytes, the upload's screened SHA-256 is what it names."""
    model = get_or_create_model(session, "m", 4)
    upload, _ = service.submit(session, "file:///a.jpg", "ext-3")
    service.claim(session, upload.id, max_attempts=3)
    screened = service.Screened(upload.id, _signals(), {model.id: np.zeros((1, 4), np.float32)}, [])
    record_results(session, TEST_SETTINGS, [screened])
    with pytest.raises(service.ExternalIdConflict, match="bytes differ"):
        service.submit(session, "file:///a.jpg", "ext-3", declared_sha256=bytes(range(32)))
    assert service.submit(session, "file:///a.jpg", "ext-3", declared_sha256=b"\x02" * 32)[0]


def test_resubmitting_a_failed_upload_queues_it_afresh_and_is_audited(session: Session) -> None:
    upload, _ = service.submit(session, "file:///a.jpg", "ext-4")
    service.claim(session, upload.id, max_attempts=3)
    service.record_failed(session, upload.id, "fetch_timeout", "slow")
    service.resubmit(session, upload.id, actor="cli:alice")
    _reload(session, upload)
    assert (upload.status, upload.attempts, upload.error_code) == (UploadStatus.QUEUED, 0, None)
    (event,) = audit.events_for(session, "upload", upload.id)
    assert (event.actor, event.action) == ("cli:alice", "upload.resubmit")
    assert event.before == {
        "status": "failed",
        "error_code": "fetch_timeout",
        "error_message": "slow",
        "attempts": 1,
    }
    assert event.after == {"status": "queued", "attempts": 0}
    with pytest.raises(service.NotResubmittable, match="is queued"):
        service.resubmit(session, upload.id, actor="cli:alice")


def test_the_audit_log_is_append_only(session: Session) -> None:
    audit.record(session, actor="t", action="test", subject_type="upload", subject_id=1)
    with pytest.raises(InternalError, match="append-only"), session.begin_nested():
        session.execute(update(AuditEvent).values(actor="someone else"))
    with pytest.raises(InternalError, match="append-only"), session.begin_nested():
        session.execute(delete(AuditEvent))


def test_submit_many_queues_every_uri_and_returns_ids_in_order(session: Session) -> None:
    uris = [f"file:///images/{i}.jpg" for i in range(250)]
    ids = service.submit_many(session, uris)
    assert len(set(ids)) == 250
    uploads = service.get_uploads(session, ids)
    assert [u.uri for u in uploads] == uris
    assert {(u.status, u.attempts, u.external_id) for u in uploads} == {
        (UploadStatus.QUEUED, 0, None)
    }
    assert all(u.enqueued_at is not None for u in uploads)
    assert service.submit_many(session, []) == []


def test_recording_twice_writes_once(session: Session) -> None:
    model = get_or_create_model(session, "m", 4)
    bank = banks.create_bank(session, "b")
    (entry,) = banks.add_entries(session, bank, [banks.NewEntry(sha256=b"\x02" * 32)], added_by="t")
    upload, _ = service.submit(session, "file:///a.jpg")
    # A threshold no SHA-256 hit has, so that the test sees it is the one recorded.
    matches = [Match(entry.id, bank.id, SignalType.SHA256, 0.0, 0, 0.25)]
    vectors = {model.id: np.ones((1, 4), np.float32) / 2}

    screened = service.Screened(upload.id, _signals(), vectors, matches)
    assert service.claim(session, upload.id, max_attempts=3) is not None
    assert record_results(session, TEST_SETTINGS, [screened]) == [True]
    # A redelivered message: nothing left to claim, and recording again is a no-op.
    assert service.claim(session, upload.id, max_attempts=3) is None
    assert record_results(session, TEST_SETTINGS, [screened]) == [False]

    assert _count(session, Hit, upload.id) == 1
    assert session.scalar(select(Hit.threshold).where(Hit.upload_id == upload.id)) == 0.25
    assert _count(session, Signal, upload.id) == 2  # SHA-256 and one PDQ frame
    assert _count(session, Embedding, upload.id) == 1
    _reload(session, upload)
    assert (upload.status, upload.attempts, upload.media_format) == (
        UploadStatus.SCREENED,
        1,
        "JPEG",
    )


def test_a_group_of_results_is_recorded_per_upload(session: Session) -> None:
    """Several uploads in one call, as the worker's group commit writes them."""
    model = get_or_create_model(session, "m", 4)
    bank = banks.create_bank(session, "b")
    (entry,) = banks.add_entries(session, bank, [banks.NewEntry(sha256=b"\x02" * 32)], added_by="t")
    a, b, done = (service.submit(session, f"file:///{n}.jpg")[0] for n in "abc")
    vectors = {model.id: np.ones((1, 4), np.float32) / 2}
    hit = [Match(entry.id, bank.id, SignalType.SHA256, 0.0, 0, 0.0)]
    record_results(session, TEST_SETTINGS, [service.Screened(done.id, _signals(), vectors, hit)])

    outcome = record_results(
        session,
        TEST_SETTINGS,
        [
            service.Screened(a.id, _signals(), vectors, hit),
            service.Screened(b.id, _signals(), vectors, []),
            service.Screened(a.id, _signals(), vectors, hit),  # a duplicate delivery
            service.Screened(done.id, _signals(), vectors, hit),  # already final
        ],
    )

    assert outcome == [True, True, False, False]
    assert [_count(session, Hit, u.id) for u in (a, b, done)] == [1, 0, 1]
    assert [_count(session, Signal, u.id) for u in (a, b, done)] == [2, 2, 2]
    assert [_count(session, Embedding, u.id) for u in (a, b, done)] == [1, 1, 1]
    for upload in (a, b):
        _reload(session, upload)
        assert (upload.status, upload.width, upload.frame_count) == (UploadStatus.SCREENED, 640, 1)


def test_recording_a_group_with_a_missing_upload_raises(session: Session) -> None:
    model = get_or_create_model(session, "m", 4)
    upload, _ = service.submit(session, "file:///a.jpg")
    vectors = {model.id: np.ones((1, 4), np.float32) / 2}
    with pytest.raises(service.UploadNotFound, match="999999999"):
        record_results(
            session,
            TEST_SETTINGS,
            [
                service.Screened(upload.id, _signals(), vectors, []),
                service.Screened(999_999_999, _signals(), vectors, []),
            ],
        )


def test_claim_many_claims_what_is_left_to_do(session: Session) -> None:
    fresh, twice, exhausted, final = (
        service.submit(session, f"file:///{n}.jpg")[0] for n in "abcd"
    )
    service.claim(session, exhausted.id, max_attempts=1)
    service.record_failed(session, final.id, "bad_image", "broken")
    session.flush()  # claims are Core statements: the ORM's pending change must be written

    claims = service.claim_many(
        session, [fresh.id, twice.id, exhausted.id, twice.id, final.id], max_attempts=1
    )

    assert [c and c.uri for c in claims] == [
        "file:///a.jpg",
        "file:///b.jpg",
        None,
        "file:///b.jpg",
        None,
    ]
    for upload in (fresh, twice, exhausted, final):
        _reload(session, upload)
    assert (fresh.status, fresh.attempts) == (UploadStatus.PROCESSING, 1)
    assert (twice.status, twice.attempts) == (UploadStatus.PROCESSING, 1)  # claimed once
    assert (exhausted.status, exhausted.error_code) == (UploadStatus.FAILED, "too_many_attempts")
    assert (final.status, final.error_code) == (UploadStatus.FAILED, "bad_image")
    with pytest.raises(service.UploadNotFound):
        service.claim_many(session, [fresh.id, 999_999_999], max_attempts=5)


def test_attempts_are_bounded_across_redeliveries(session: Session) -> None:
    upload, _ = service.submit(session, "file:///poison.jpg")
    for _ in range(3):
        assert service.claim(session, upload.id, max_attempts=3) is not None
    assert service.claim(session, upload.id, max_attempts=3) is None
    _reload(session, upload)
    assert upload.status is UploadStatus.FAILED
    assert upload.error_code == "too_many_attempts"


def test_transient_faults_retry_then_fail_visibly(session: Session) -> None:
    upload, _ = service.submit(session, "http://example.invalid/a.jpg")
    service.claim(session, upload.id, max_attempts=2)
    assert (
        service.record_transient_fault(session, upload.id, "fetch_timeout", "slow", max_attempts=2)
        == 1
    )
    _reload(session, upload)
    assert (upload.status, upload.error_code) == (UploadStatus.QUEUED, "fetch_timeout")
    assert upload.error_message == "retrying: slow"
    service.claim(session, upload.id, max_attempts=2)
    assert (
        service.record_transient_fault(session, upload.id, "fetch_timeout", "slow", max_attempts=2)
        is None
    )
    _reload(session, upload)
    assert (upload.status, upload.error_code) == (UploadStatus.FAILED, "fetch_timeout")
    assert "gave up after 2 attempts" in (upload.error_message or "")


def test_failure_never_overwrites_a_final_state(session: Session) -> None:
    upload, _ = service.submit(session, "file:///a.jpg")
    service.record_failed(session, upload.id, "truncated_image", "ends early")
    service.record_failed(session, upload.id, "other", "later")
    _reload(session, upload)
    assert upload.error_code == "truncated_image"


def test_unknown_upload_is_a_typed_error(session: Session) -> None:
    with pytest.raises(service.UploadNotFound):
        service.claim(session, 999_999_999, max_attempts=3)
