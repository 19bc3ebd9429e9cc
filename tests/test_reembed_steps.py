"""Re-embedding's steps against the real PostgreSQL: blocks taken ahead of the checkpoint
(the scan covered once, in order, a worker killed with blocks taken and not recorded
resuming from its last record), the catch-up's settling step, and a worker's step at full
duty running the whole scan in one message on the screening pipeline (stub models)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from moderation.embedding.families import preprocessing_of
from moderation.embedding.models import Embedding, EmbeddingModel, ModelState
from moderation.embedding.preprocessing import Preprocessing
from moderation.images.hashing import sha256
from moderation.images.signals import SignalType
from moderation.lifecycle import reembed
from moderation.lifecycle.models import ReembedFailure, ReembedJob, ReembedStatus
from moderation.runtime import Runtime
from moderation.screening.models import Signal, Upload, UploadStatus
from moderation.worker import reembed as worker_reembed
from moderation.worker.pipeline import Screener
from tests.conftest import TEST_RUNTIME, settings_for_tests
from tests.images import encode, textured, write
from tests.test_screener import OtherStub, StubEmbedder

pytestmark = pytest.mark.usefixtures("clean_db")

BLOCK = 2


def _candidate(session: Session, name: str = "reembed-steps-candidate") -> EmbeddingModel:
    model = EmbeddingModel(name=name, dim=3, state=ModelState.CANDIDATE)
    session.add(model)
    session.flush()
    return model


def _screened(session: Session, uris: list[str]) -> list[int]:
    uploads = [Upload(uri=uri, status=UploadStatus.SCREENED) for uri in uris]
    session.add_all(uploads)
    session.flush()
    return [upload.id for upload in uploads]


def _embedded(block: reembed.Block) -> list[reembed.Outcome]:
    return [reembed.Outcome(item, [(0, np.ones(3, np.float32))]) for item in block.items]


def _take(session: Session, job_id: int, *, settle_s: float = 0.0) -> reembed.Block:
    job = session.get_one(ReembedJob, job_id)
    taken = reembed.take(session, job_id, job.step, block_size=BLOCK, settle_s=settle_s)
    assert isinstance(taken, reembed.Block), taken
    return taken


def _ids(block: reembed.Block) -> list[int]:
    return [item.id for item in block.items]


def _three_blocks_taken(
    session: Session, uploads: int
) -> tuple[ReembedJob, list[int], list[reembed.Block]]:
    """A job over `uploads` screened uploads, its first block taken and two more ahead."""
    model = _candidate(session)
    upload_ids = _screened(session, [f"file:///nowhere/{i}.jpg" for i in range(uploads)])
    job, _ = reembed.start(session, model.name, actor="t", duty=1.0)
    blocks = [_take(session, job.id)]
    for _ in range(2):
        ahead = reembed.take_ahead(session, blocks[-1], block_size=BLOCK)
        assert ahead is not None
        blocks.append(ahead)
    return job, upload_ids, blocks


def _embeddings_per_upload(session: Session) -> list[tuple[int, int]]:
    rows = session.execute(
        select(Embedding.upload_id, func.count()).group_by(Embedding.upload_id)
    ).all()
    return sorted((upload_id, count) for upload_id, count in rows)


def test_blocks_taken_ahead_cover_the_scan_once_and_leave_the_phase_end_to_take(
    session: Session,
) -> None:
    job, uploads, (first, second, third) = _three_blocks_taken(session, 5)
    assert [_ids(first), _ids(second), _ids(third)] == [uploads[:2], uploads[2:4], uploads[4:]]
    assert (first.step, second.step, third.step) == (0, 1, 2)
    # The end of the phase is `take`'s, once the blocks before are recorded: nothing taken.
    assert reembed.take_ahead(session, third, block_size=BLOCK) is None
    assert (job.step, job.status, job.uploads_through) == (3, ReembedStatus.UPLOADS, 0)
    # A block that is not the job's latest step (taken elsewhere since) takes nothing.
    assert reembed.take_ahead(session, first, block_size=BLOCK) is None

    for block in (first, second, third):
        following = reembed.record(session, block, _embedded(block))
        assert following == reembed.NextStep(job.id, 3)
    assert (job.uploads_through, job.uploads_done, job.uploads_total) == (uploads[-1], 5, 5)
    assert _embeddings_per_upload(session) == [(upload_id, 1) for upload_id in uploads]


def test_a_worker_killed_with_blocks_taken_ahead_resumes_from_its_last_record(
    session: Session,
) -> None:
    job, uploads, (first, second, _) = _three_blocks_taken(session, 6)
    reembed.record(session, first, _embedded(first))
    # Killed here: the second and third blocks were taken and embedded, never recorded.
    # The sweeper sends the job's step once it is overdue; it starts from the checkpoint.
    again = _take(session, job.id)
    assert _ids(again) == _ids(second)
    assert again.step == 3
    while True:
        reembed.record(session, again, _embedded(again))
        if job.status is not ReembedStatus.UPLOADS:
            break
        taken = reembed.take(session, job.id, job.step, block_size=BLOCK, settle_s=0.0)
        if not isinstance(taken, reembed.Block) or taken.phase is not ReembedStatus.UPLOADS:
            break
        again = taken
    assert (job.uploads_done, job.uploads_total, job.embedded) == (6, 6, 6)
    assert _embeddings_per_upload(session) == [(upload_id, 1) for upload_id in uploads]


def test_the_catch_up_names_the_step_to_send_when_its_settle_time_is_over(
    session: Session,
) -> None:
    model = _candidate(session)
    job, _ = reembed.start(session, model.name, actor="t")
    taken = reembed.take(session, job.id, 0, block_size=BLOCK, settle_s=30.0)
    assert taken == reembed.Settling(reembed.NextStep(job.id, 1), 30.0)
    assert job.status is ReembedStatus.CATCHING_UP
    # The sweeper's cue stays, should the message sent for then be lost.
    assert job.next_run_at == job.settle_until


# A worker's step, on a screener of its own with two stub models.


@pytest.fixture
def preprocess(tiny_model: Path) -> Preprocessing:
    return preprocessing_of(str(tiny_model))


@pytest.fixture
def screener(preprocess: Preprocessing) -> Iterator[Screener]:
    small = dataclasses.replace(preprocess, crop_height=32, crop_width=32, shortest_edge=32)
    settings = settings_for_tests(reembed_block=BLOCK, intake_processes=1, stage_timeout_s=10.0)
    models = [StubEmbedder(preprocess), OtherStub(small)]
    built = Screener(settings, TEST_RUNTIME.session, models, slots=4)  # type: ignore[arg-type]
    yield built
    built.close()


def test_a_step_at_full_duty_embeds_the_whole_scan_in_one_message(
    screener: Screener, tmp_path: Path, make_runtime: Callable[..., Runtime]
) -> None:
    """The blocks are taken ahead and recorded in order by the one step, each readable
    upload embedded once under the candidate and each gone or changed one recorded; at a
    duty below one, a step is one block, as before."""
    _, candidate = screener.lineup.model_ids
    paths = [write(tmp_path / f"{i}.jpg", encode(textured(80 + i))) for i in range(5)]
    changed = write(tmp_path / "changed.jpg", encode(textured(90)))
    with TEST_RUNTIME.session() as session:
        session.execute(
            update(EmbeddingModel)
            .where(EmbeddingModel.id == candidate)
            .values(state=ModelState.CANDIDATE)
        )
        uploads = _screened(
            session, [p.as_uri() for p in paths] + [(tmp_path / "gone.jpg").as_uri()]
        )
        (changed_id,) = _screened(session, [changed.as_uri()])
        session.add(Signal(upload_id=changed_id, signal=SignalType.SHA256, value=sha256(b"x")))
        name = session.get_one(EmbeddingModel, candidate).name
        slow, _ = reembed.start(session, name, actor="t", duty=0.5)
        slow_id = slow.id

    runtime = make_runtime(reembed_block=BLOCK)
    worker_reembed.run_step(runtime, screener, slow_id, 0)
    with TEST_RUNTIME.session() as session:
        job = session.get_one(ReembedJob, slow_id)
        assert (job.uploads_done, job.step) == (BLOCK, 1)
        job.status = ReembedStatus.CANCELLED  # one unfinished job per model
        fast, _ = reembed.start(session, name, actor="t", duty=1.0)
        fast_id = fast.id

    worker_reembed.run_step(runtime, screener, fast_id, 0)

    with TEST_RUNTIME.session() as session:
        job = session.get_one(ReembedJob, fast_id)
        assert (job.status, job.uploads_done, job.uploads_total) == (
            ReembedStatus.UPLOADS,
            7,
            7,
        )
        assert job.failures == {"not_found": 1, "content_mismatch": 1}
        failed = dict(
            session.execute(
                select(ReembedFailure.upload_id, ReembedFailure.reason).where(
                    ReembedFailure.job_id == fast_id
                )
            ).all()
        )
        assert failed == {uploads[-1]: "not_found", changed_id: "content_mismatch"}
        counts = session.execute(
            select(Embedding.upload_id, func.count())
            .where(Embedding.model_id == candidate)
            .group_by(Embedding.upload_id)
        ).all()
        assert sorted(counts) == [(upload_id, 1) for upload_id in uploads[:-1]]
