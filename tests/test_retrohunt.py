"""Retro-hunt: bank entries added later find the uploads screened before them, exactly,
as retroactive hits; jobs resume from their checkpoint and never duplicate a hit.

Against the real PostgreSQL, calling the service and task functions directly; one test at
the end runs the whole path through Redis and a real worker process.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from moderation.banks import service as banks
from moderation.banks.matcher import Match
from moderation.banks.models import BankChange, BankEntry
from moderation.config import Settings
from moderation.embedding.models import EmbeddingModel
from moderation.embedding.service import get_or_create_model
from moderation.images.hashing import PdqHash
from moderation.images.signals import FrameSignals, ImageSignals, SignalType
from moderation.main.cli import main
from moderation.retrohunt import service as retrohunt
from moderation.retrohunt import tasks as retrohunt_tasks
from moderation.retrohunt.models import JobStatus, RetrohuntJob
from moderation.review.models import Hit
from moderation.runtime import Runtime
from moderation.screening import service as screening
from moderation.screening.models import UploadStatus
from moderation.worker.results import record_results
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS, settings_for_tests
from tests.images import encode, textured, write
from tests.vectors import at_cosine_distance

DIM = 8
ANCHOR = np.eye(DIM, dtype=np.float32)[0]
# Settled at once: the tests place the race themselves (see the catch-up test).
SETTINGS = settings_for_tests(bank_refresh_s=0, retrohunt_settle_s=0)
# Long enough for the transactions of a busy test server to end (see `settled_value`).
SETTLE_WAIT_S = 30.0


def _flip(bits: int) -> bytes:
    """A PDQ hash that differs from all-zeros in `bits` bits."""
    return (int("1" * bits, 2) if bits else 0).to_bytes(32, "big")


@pytest.fixture
def model(session: Session) -> EmbeddingModel:
    return get_or_create_model(session, "retrohunt-test-model", DIM)


@pytest.fixture(autouse=True)
def log_read_through(session: Session) -> None:
    """The bank change log's end before the test: its own rows are those after it."""
    session.info[_HUNTED_THROUGH] = session.scalar(select(func.max(BankChange.id))) or 0


_HUNTED_THROUGH = "test_hunted_through"


def new_jobs(session: Session) -> list[int]:
    """The jobs the starter makes of the entries this test added since the last call: what
    `start_from_changes` does, in the test's own transaction (the starter reads only
    committed rows)."""
    through = session.scalar(select(func.max(BankChange.id))) or 0
    jobs = retrohunt.jobs_for_changes(session, session.info[_HUNTED_THROUGH], through)
    session.info[_HUNTED_THROUGH] = through
    return [job.id for job in jobs]


def screened_upload(
    session: Session,
    model: EmbeddingModel,
    *,
    sha256: bytes = b"\x01" * 32,
    pdq: list[tuple[bytes, int]] | None = None,
    vectors: list[np.ndarray] | None = None,
    matches: list[Match] | None = None,
    pdq_as_stored: PdqHash | None = None,
) -> int:
    """An upload recorded as screening records it: its signals, one embedding per vector
    (frames 0, 1, ...), and the hits screening found (`matches`)."""
    pdq = pdq or [(_flip(200), 100)]
    vectors = vectors if vectors is not None else [np.roll(-ANCHOR, 1)]
    (upload_id,) = screening.submit_many(session, [f"file:///uploads/{time.time_ns()}.jpg"])
    screening.claim(session, upload_id, max_attempts=5)
    frames = [
        FrameSignals(
            index=index,
            pdq=PdqHash(bits, quality),
            pixels=np.zeros(1) if index < len(vectors) else None,
        )
        for index, (bits, quality) in enumerate(
            pdq + [(_flip(200), 100)] * (len(vectors) - len(pdq))
        )
    ]
    signals = ImageSignals(
        sha256=sha256,
        format="JPEG",
        width=10,
        height=10,
        frame_count=len(frames),
        frames=frames,
        pdq_as_stored=pdq_as_stored,
    )
    result = screening.Screened(
        upload_id, signals, {model.id: np.array(vectors, np.float32)}, matches or []
    )
    assert record_results(session, TEST_SETTINGS, [result]) == [True]
    return upload_id


def run_to_end(
    session: Session, job_id: int, settings: Settings = SETTINGS, **options: Any
) -> RetrohuntJob:
    """Every step of a job, as the worker runs them; the job as it ended."""
    cache = retrohunt.TargetCache()
    step: retrohunt.NextStep | None = retrohunt.NextStep(job_id, 0)
    while step is not None:
        step = retrohunt.run_step(session, job_id, step.step, settings, cache, **options)
    return session.get_one(RetrohuntJob, job_id, populate_existing=True)


def only_job(session: Session) -> int:
    (job_id,) = new_jobs(session)
    return job_id


def hits_of(session: Session, upload_id: int) -> dict[tuple[int, str], Hit]:
    rows = session.scalars(select(Hit).where(Hit.upload_id == upload_id)).all()
    return {(hit.bank_entry_id, hit.signal.value): hit for hit in rows}


def test_clip_hits_inside_the_radius_and_exactly_on_it_but_not_beyond(
    session: Session, model: EmbeddingModel
) -> None:
    # An animation whose second frame is the anchor: the hit names that frame.
    upload = screened_upload(session, model, vectors=[np.roll(-ANCHOR, 1), ANCHOR])
    bank = banks.create_bank(session, "clip-edge")
    wide = banks.create_bank(session, "clip-wide", radius=0.08)
    inside, on_radius, just_outside = banks.add_entries(
        session,
        bank,
        [
            banks.NewEntry(embedding=at_cosine_distance(ANCHOR, 0.03, seed=1), model=model),
            banks.NewEntry(embedding=at_cosine_distance(ANCHOR, 0.05, seed=2), model=model),
            banks.NewEntry(embedding=at_cosine_distance(ANCHOR, 0.0501, seed=3), model=model),
        ],
        added_by="test",
    )
    (in_wide,) = banks.add_entries(
        session,
        wide,
        [banks.NewEntry(embedding=at_cosine_distance(ANCHOR, 0.06, seed=4), model=model)],
        added_by="test",
    )
    first, second = new_jobs(session)
    assert run_to_end(session, first).hits_found == 2
    assert run_to_end(session, second).hits_found == 1

    found = hits_of(session, upload)
    assert set(found) == {(e.id, "clip") for e in (inside, on_radius, in_wide)}
    assert just_outside.id not in {entry for entry, _ in found}
    expected = ((inside, 0.03, 0.05), (on_radius, 0.05, 0.05), (in_wide, 0.06, 0.08))
    for entry, distance, radius in expected:
        hit = found[(entry.id, "clip")]
        assert hit.distance == pytest.approx(distance, abs=1e-6)
        assert hit.threshold == radius
        assert (hit.retroactive, hit.frame_index, hit.model_id) == (True, 1, model.id)


def test_pdq_hits_at_the_threshold_not_one_bit_beyond_and_not_below_quality(
    session: Session, model: EmbeddingModel
) -> None:
    upload = screened_upload(session, model, pdq=[(_flip(100), 100), (_flip(0), 90)])
    flat = screened_upload(session, model, pdq=[(_flip(0), 40)])  # below pdq_min_quality
    bank = banks.create_bank(session, "pdq-edge")
    at_threshold, beyond, low_quality_entry = banks.add_entries(
        session,
        bank,
        [
            banks.NewEntry(pdq=PdqHash(_flip(31), None)),
            banks.NewEntry(pdq=PdqHash(_flip(32), None)),
            banks.NewEntry(pdq=PdqHash(_flip(0), 30)),
        ],
        added_by="test",
    )
    job = run_to_end(session, only_job(session))

    found = hits_of(session, upload)
    assert set(found) == {(at_threshold.id, "pdq")}
    hit = found[(at_threshold.id, "pdq")]
    assert (hit.distance, hit.frame_index, hit.model_id, hit.retroactive) == (31, 1, None, True)
    assert hit.threshold == 31
    assert hits_of(session, flat) == {}
    assert {beyond.id, low_quality_entry.id}.isdisjoint(e for e, _ in found)
    assert job.status is JobStatus.DONE
    assert job.hits_found == 1


def test_a_photo_stored_turned_is_hunted_on_its_hash_as_stored_too(
    session: Session, model: EmbeddingModel
) -> None:
    # A phone photo stored sideways: hash lists made without applying EXIF orientation
    # (ThreatExchange's hasher, HMA) hold the hash of the pixels as stored.
    turned = screened_upload(
        session, model, pdq=[(_flip(100), 90)], pdq_as_stored=PdqHash(_flip(203), 90)
    )
    (as_stored,) = [s for s in screening.upload_signals(session, turned) if s.frame_index < 0]
    assert (as_stored.value, as_stored.quality) == (_flip(203), 90)
    bank = banks.create_bank(session, "hash-list")
    (entry,) = banks.add_entries(
        session, bank, [banks.NewEntry(pdq=PdqHash(_flip(200), None))], added_by="import"
    )
    assert run_to_end(session, only_job(session)).hits_found == 1
    hit = hits_of(session, turned)[(entry.id, "pdq")]
    assert (hit.distance, hit.frame_index, hit.retroactive) == (3, 0, True)


def test_sha256_hits_the_same_bytes_only_and_keeps_what_screening_found(
    session: Session, model: EmbeddingModel
) -> None:
    bank = banks.create_bank(session, "sha")
    (known,) = banks.add_entries(
        session, bank, [banks.NewEntry(sha256=b"\xaa" * 32)], added_by="test"
    )
    run_to_end(session, only_job(session))
    # Screened after that entry: screening found it, and the hunt must leave it as it is.
    seen_at_screening = screened_upload(
        session,
        model,
        sha256=b"\xaa" * 32,
        matches=[Match(known.id, bank.id, SignalType.SHA256, 0.0, 0, 0.0)],
    )
    old = screened_upload(session, model, sha256=b"\xbb" * 32)
    other = screened_upload(session, model, sha256=b"\xcc" * 32)
    (later,) = banks.add_entries(
        session, bank, [banks.NewEntry(sha256=b"\xbb" * 32)], added_by="test"
    )
    job = run_to_end(session, only_job(session))

    assert job.hits_found == 1
    (hit,) = hits_of(session, old).values()
    assert (hit.bank_entry_id, hit.signal, hit.distance, hit.retroactive) == (
        later.id,
        SignalType.SHA256,
        0.0,
        True,
    )
    assert hits_of(session, other) == {}
    (screening_hit,) = hits_of(session, seen_at_screening).values()
    assert screening_hit.retroactive is False


def test_running_a_job_again_or_a_redelivered_step_adds_no_hit(
    session: Session, model: EmbeddingModel
) -> None:
    upload = screened_upload(session, model, sha256=b"\x11" * 32, vectors=[ANCHOR])
    bank = banks.create_bank(session, "again")
    banks.add_entries(
        session,
        bank,
        [banks.NewEntry(sha256=b"\x11" * 32, embedding=ANCHOR, model=model)],
        added_by="test",
    )
    job_id = only_job(session)
    assert run_to_end(session, job_id).hits_found == 2
    # A message for a step already taken, delivered again, does nothing.
    assert retrohunt.run_step(session, job_id, 0, SETTINGS, retrohunt.TargetCache()) is None
    # A whole new hunt of the bank finds the same hits and records none again.
    again = retrohunt.hunt_bank(session, bank, created_by="test")
    assert run_to_end(session, again.id).hits_found == 0
    assert len(hits_of(session, upload)) == 2


def test_an_interrupted_job_resumes_from_its_checkpoint(
    session: Session, model: EmbeddingModel
) -> None:
    uploads = [screened_upload(session, model, sha256=bytes([i]) * 32) for i in range(7)]
    bank = banks.create_bank(session, "resume")
    banks.add_entries(
        session,
        bank,
        [banks.NewEntry(sha256=bytes([i]) * 32) for i in range(7)],
        added_by="test",
    )
    job_id = only_job(session)
    one_block = {"budget_s": 0, "block_uploads": 3}
    first = retrohunt.run_step(session, job_id, 0, SETTINGS, retrohunt.TargetCache(), **one_block)
    assert first == retrohunt.NextStep(job_id, 1)
    job = session.get_one(RetrohuntJob, job_id)
    checkpoint = job.scanned_through_upload_id
    assert job.status is JobStatus.SCANNING
    assert job.uploads_scanned == 3
    assert job.uploads_total is not None
    assert job.uploads_total >= 7

    # The worker dies in the middle of the next step: its transaction never commits.
    crashed = session.begin_nested()
    retrohunt.run_step(session, job_id, 1, SETTINGS, retrohunt.TargetCache(), **one_block)
    crashed.rollback()
    job = session.get_one(RetrohuntJob, job_id, populate_existing=True)
    assert (job.step, job.scanned_through_upload_id, job.uploads_scanned) == (1, checkpoint, 3)

    # Redelivered (to another process, with nothing cached): it goes on from the checkpoint.
    cache = retrohunt.TargetCache()
    step: retrohunt.NextStep | None = retrohunt.NextStep(job_id, 1)
    while step is not None:
        step = retrohunt.run_step(session, job_id, step.step, SETTINGS, cache, **one_block)
    job = session.get_one(RetrohuntJob, job_id, populate_existing=True)
    assert job.status is JobStatus.DONE
    assert job.uploads_scanned == job.uploads_total
    assert job.hits_found == 7
    assert all(len(hits_of(session, upload)) == 1 for upload in uploads)


def test_an_upload_screened_while_the_entry_was_added_is_caught_up(
    session: Session, model: EmbeddingModel
) -> None:
    """The race: a worker whose bank snapshot predates the entry screens an upload, and
    commits it after the hunt's scan has passed. The job's final pass finds it."""
    screened_upload(session, model)
    bank = banks.create_bank(session, "race")
    (entry,) = banks.add_entries(
        session, bank, [banks.NewEntry(pdq=PdqHash(_flip(3), None))], added_by="test"
    )
    job_id = only_job(session)
    settling = Settings(bank_refresh_s=5, retrohunt_settle_s=30)
    cache = retrohunt.TargetCache()
    # Scanned up to the newest upload, then waits for every worker to see the entry, with
    # no message in flight: the sweeper sends the job when its wait is over.
    assert retrohunt.run_step(session, job_id, 0, settling, cache) is None
    job = session.get_one(RetrohuntJob, job_id)
    assert job.status is JobStatus.SETTLING
    assert job.scanned_through_upload_id == job.horizon_upload_id
    waits = session.scalars(select(func.extract("epoch", job.next_run_at - func.now()))).one()
    assert float(waits) == pytest.approx(35, abs=1)
    assert retrohunt.find_due(session, stalled_after_s=120) == []

    missed = screened_upload(session, model, pdq=[(_flip(0), 100)])  # matched by no one
    assert job.horizon_upload_id is not None
    assert missed > job.horizon_upload_id
    # A message that comes early (redelivered) finds the job still settling.
    assert retrohunt.run_step(session, job_id, 1, settling, cache) is None
    assert session.get_one(RetrohuntJob, job_id).status is JobStatus.SETTLING
    # The wait is over: the sweeper sends it, once.
    job.settle_until = job.next_run_at = func.now() - timedelta(seconds=1)
    session.flush()
    (due,) = retrohunt.find_due(session, stalled_after_s=120)
    assert retrohunt.find_due(session, stalled_after_s=120) == []
    assert session.get_one(RetrohuntJob, job_id).status is JobStatus.CATCHING_UP
    assert retrohunt.run_step(session, job_id, due.step, settling, cache) is None

    job = session.get_one(RetrohuntJob, job_id, populate_existing=True)
    assert job.status is JobStatus.DONE
    assert job.hits_found == 1
    (hit,) = hits_of(session, missed).values()
    assert (hit.bank_entry_id, hit.distance, hit.retroactive) == (entry.id, 3, True)


def test_disabled_banks_are_not_hunted(session: Session, model: EmbeddingModel) -> None:
    upload = screened_upload(session, model, sha256=b"\x22" * 32)
    bank = banks.create_bank(session, "switched")
    banks.add_entries(session, bank, [banks.NewEntry(sha256=b"\x22" * 32)], added_by="test")
    job_id = only_job(session)
    bank.enabled = False
    session.flush()
    # Disabled before the job ran: skipped, saying why.
    assert retrohunt.run_step(session, job_id, 0, SETTINGS, retrohunt.TargetCache()) is None
    job = retrohunt.get_job(session, job_id)
    assert job.status == "skipped"
    assert job.error is not None
    assert "disabled" in job.error
    # Entries added while disabled make no job; hunting the bank needs it enabled.
    banks.add_entries(session, bank, [banks.NewEntry(sha256=b"\x33" * 32)], added_by="test")
    assert new_jobs(session) == []
    with pytest.raises(retrohunt.NothingToHunt, match="disabled"):
        retrohunt.hunt_bank(session, bank, created_by="test")
    # Enabled again, a hunt of the whole bank finds what it missed.
    bank.enabled = True
    whole_bank = retrohunt.hunt_bank(session, bank, created_by="test")
    assert run_to_end(session, whole_bank.id).hits_found == 1
    assert hits_of(session, upload)


def test_a_job_whose_message_was_lost_is_sent_again_once(
    session: Session, model: EmbeddingModel
) -> None:
    bank = banks.create_bank(session, "lost")
    banks.add_entries(session, bank, [banks.NewEntry(sha256=b"\x44" * 32)], added_by="test")
    job = session.get_one(RetrohuntJob, only_job(session))
    assert retrohunt.find_due(session, stalled_after_s=120) == []
    job.next_run_at = func.now() - timedelta(minutes=5)
    session.flush()
    assert retrohunt.find_due(session, stalled_after_s=120) == [retrohunt.NextStep(job.id, 0)]
    # Marked as sent: the next sweep leaves it alone.
    assert retrohunt.find_due(session, stalled_after_s=120) == []


def test_an_import_of_100000_hashes_hunts_in_the_background_with_progress(
    session: Session, model: EmbeddingModel
) -> None:
    # Within 0.3 of ANCHOR: at least 0.17 from the entry placed at 0.02, and more than
    # 0.28 from the far side, where the other entries are.
    uploads = [
        screened_upload(session, model, vectors=[at_cosine_distance(ANCHOR, 0.3, seed=k)])
        for k in range(4)
    ]
    matching = screened_upload(session, model, pdq=[(_flip(0), 100)], vectors=[ANCHOR])
    bank = banks.create_bank(session, "imported")
    count = 100_000
    rng = np.random.default_rng(0)
    # Random hashes are about 128 bits from anything; vectors on the far side of ANCHOR.
    hashes = rng.integers(0, 256, (count, 32), dtype=np.uint8)
    vectors = rng.standard_normal((count, DIM)).astype(np.float32)
    vectors[:, 0] = -np.abs(vectors[:, 0])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    hashes[12_345] = np.frombuffer(_flip(30), np.uint8)
    vectors[54_321] = at_cosine_distance(ANCHOR, 0.02)
    started = time.monotonic()
    assert (
        banks.copy_entries(
            session, bank, model=model, vectors=vectors, pdq=hashes, added_by="import"
        )
        == count
    )
    added_in = time.monotonic() - started

    # The import made one job and hunted nothing yet: that happens in the worker.
    job_id = only_job(session)
    view = retrohunt.get_job(session, job_id)
    assert (view.status, view.entries, view.progress, view.hits_found) == (
        "queued",
        count,
        "not started",
        0,
    )
    assert (
        session.scalar(
            select(func.count()).select_from(Hit).where(Hit.upload_id.in_([*uploads, matching]))
        )
        == 0
    )

    cache = retrohunt.TargetCache()
    step = retrohunt.run_step(session, job_id, 0, SETTINGS, cache, budget_s=0, block_uploads=2)
    view = retrohunt.get_job(session, job_id)
    assert step is not None
    assert view.status == "scanning"
    assert view.uploads_total is not None
    assert view.uploads_scanned == 2 < view.uploads_total
    assert view.progress == f"2 of {view.uploads_total:,} uploads"
    while step is not None:
        step = retrohunt.run_step(session, job_id, step.step, SETTINGS, cache, block_uploads=2)
    view = retrohunt.get_job(session, job_id)
    assert view.status == "done"
    assert view.uploads_scanned == view.uploads_total
    assert view.vectors_scanned >= 5
    found = {signal: hit.distance for (_, signal), hit in hits_of(session, matching).items()}
    assert found == {"pdq": 30.0, "clip": pytest.approx(0.02, abs=1e-6)}
    assert all(hits_of(session, upload) == {} for upload in uploads)
    print(f"100,000 entries added by copy_entries in {added_in:.1f} s")


# Through Redis and a real worker: `moderation bank add` after the upload was screened.


def cli(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False, obj=TEST_RUNTIME)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else result.output


@pytest.mark.usefixtures("clean_db")
def test_entries_committed_anyhow_start_one_hunt_per_bank_once(runtime: Runtime) -> None:
    """The starter reads the bank change log: entries added by the service or by plain SQL
    start a hunt (one job per enabled bank, over their ids), once; a disabled bank's do
    not. Jobs begin from the adding transaction's start (the catch-up's base)."""
    with TEST_RUNTIME.session() as session:
        one = banks.create_bank(session, "starter-one")
        two = banks.create_bank(session, "starter-two")
        off = banks.create_bank(session, "starter-off")
        off.enabled = False
        first = banks.add_entries(
            session, one, [banks.NewEntry(sha256=bytes([i]) * 32) for i in (1, 2)], added_by="a"
        )
        began = session.scalar(select(func.now()))
        one_id, two_id, first_id, last_id = one.id, two.id, first[0].id, first[1].id
        banks.add_entries(session, off, [banks.NewEntry(sha256=b"\x09" * 32)], added_by="a")
    with TEST_RUNTIME.session() as session:
        session.execute(
            text("INSERT INTO bank_entries (bank_id, sha256, added_by) VALUES (:b, :s, 'sql')"),
            {"b": two_id, "s": b"\x03" * 32},
        )
    # A worker's sweeper may start them first (a test worker may be running): either way,
    # once.
    retrohunt_tasks.start_hunts(runtime, settle_wait_s=SETTLE_WAIT_S)
    with TEST_RUNTIME.session() as session:
        jobs = {j.bank_id: j for j in session.scalars(select(RetrohuntJob))}
        assert set(jobs) == {one_id, two_id}
        assert (jobs[one_id].first_entry_id, jobs[one_id].last_entry_id) == (first_id, last_id)
        assert (jobs[one_id].entries, jobs[one_id].created_by) == (2, "a")
        assert jobs[one_id].created_at == began
        assert (jobs[two_id].entries, jobs[two_id].created_by) == (1, "sql")
    assert retrohunt_tasks.start_hunts(runtime, settle_wait_s=SETTLE_WAIT_S) == []
    with TEST_RUNTIME.session() as session:
        assert session.scalar(select(func.count()).select_from(RetrohuntJob)) == 2


@pytest.mark.usefixtures("clean_db")
def test_the_starter_waits_for_a_transaction_that_may_still_add_entries(
    runtime: Runtime,
) -> None:
    """Entries whose transaction took its log id before a later one committed are not
    skipped: the starter does not move past an id a running transaction may still commit."""
    with TEST_RUNTIME.session() as session:
        bank_id = banks.create_bank(session, "starter-race").id
    retrohunt_tasks.start_hunts(runtime, settle_wait_s=SETTLE_WAIT_S)
    with Session(TEST_RUNTIME.engine) as slow, slow.begin():
        slow.add(BankEntry(bank_id=bank_id, sha256=b"\x01" * 32, added_by="slow"))
        slow.flush()  # its log row takes the lower id now
        with TEST_RUNTIME.session() as session:
            session.add(BankEntry(bank_id=bank_id, sha256=b"\x02" * 32, added_by="fast"))
        # Waited for `slow`, which is still open.
        assert not retrohunt_tasks.start_hunts(runtime, settle_wait_s=0.5)
        with TEST_RUNTIME.session() as session:
            assert session.scalar(select(func.count()).select_from(RetrohuntJob)) == 0
    retrohunt_tasks.start_hunts(runtime, settle_wait_s=SETTLE_WAIT_S)
    with TEST_RUNTIME.session() as session:
        (job,) = session.scalars(select(RetrohuntJob))
        assert job.entries == 2


@pytest.mark.usefixtures("clean_db")
def test_retrohunt_wait_starts_the_hunt_and_waits_within_a_timeout() -> None:
    cli("bank", "create", "waited")
    added = cli("bank", "add", "waited", "--sha256", "ab" * 32)
    assert "moderation retrohunt wait --bank waited" in added
    result = CliRunner().invoke(
        main, ["retrohunt", "wait", "--bank", "waited", "--timeout", "1"], obj=TEST_RUNTIME
    )
    # A hunt settles for `retrohunt_settle_s` (30 s here), so it cannot finish in 1 s.
    assert result.exit_code == 3, result.output
    assert "timed out waiting for the retro-hunt" in result.stderr
    (job,) = cli("retrohunt", "list", "--json")
    assert (job["bank"], job["entries"]) == ("waited", 1)
    started = cli("retrohunt", "start", "waited", "--json")
    assert (started["bank"], started["entries"], started["status"]) == ("waited", 1, "queued")
    assert started["id"] != job["id"]
    missing = CliRunner().invoke(
        main, ["retrohunt", "show", str(started["id"] + 1000)], obj=TEST_RUNTIME
    )
    assert missing.exit_code == 1
    assert "no retro-hunt job with id" in missing.output


@pytest.mark.e2e
@pytest.mark.usefixtures("clean_db", "worker")
def test_a_worker_hunts_an_entry_added_after_the_upload_was_screened(tmp_path: Path) -> None:
    from moderation.screening.cli import submit_uris, wait_until_final

    image = write(tmp_path / "later-known-bad.jpg", encode(textured(300)))
    (upload,) = wait_until_final(
        TEST_RUNTIME, submit_uris(TEST_RUNTIME, [image.resolve().as_uri()]), timeout_s=60
    )
    assert upload.status is UploadStatus.SCREENED
    cli("bank", "create", "later")
    (entry,) = cli("bank", "add", "later", str(image), "--json")

    # The worker's sweeper starts the hunt from the bank change log, then runs it.
    deadline = time.monotonic() + 60
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        listed = cli("retrohunt", "list", "--json")
        job = listed[0] if listed else {}
        if job.get("hits_found") == 3:
            break
        time.sleep(0.2)
    job_id = job["id"]
    # The worker's settings wait `retrohunt_settle_s` before the final pass.
    assert job["status"] in ("settling", "catching_up", "done"), job
    assert job["uploads_scanned"] == job["uploads_total"] >= 1
    hits = cli("hits", "--upload", str(upload.id), "--json")
    assert {(h["signal"], h["retroactive"], h["bank_entry_id"]) for h in hits} == {
        (signal, True, entry["id"]) for signal in ("sha256", "pdq", "clip")
    }
    listed = cli("retrohunt", "list", "--json")
    assert [(j["id"], j["bank"]) for j in listed] == [(job_id, "later")]


def test_retroactive_hits_are_announced_when_screening_hits_are(
    session: Session, model: EmbeddingModel
) -> None:
    from moderation.webhooks.models import EventType, WebhookEvent

    old = screened_upload(session, model, sha256=b"\x5a" * 32)
    quiet = screened_upload(session, model, sha256=b"\x5b" * 32)
    bank = banks.create_bank(session, "announced")
    hook = {"webhook_url": "https://uploads.example/hook"}
    announcing = settings_for_tests(
        bank_refresh_s=0, retrohunt_settle_s=0, webhook_on_screening_hit=True, **hook
    )
    banks.add_entries(session, bank, [banks.NewEntry(sha256=b"\x5a" * 32)], added_by="test")
    run_to_end(session, only_job(session), announcing)
    # Off again: hits found now are recorded but not announced.
    quiet_hook = settings_for_tests(bank_refresh_s=0, retrohunt_settle_s=0, **hook)
    banks.add_entries(session, bank, [banks.NewEntry(sha256=b"\x5b" * 32)], added_by="test")
    run_to_end(session, only_job(session), quiet_hook)

    assert len(hits_of(session, quiet)) == 1
    (event,) = session.scalars(select(WebhookEvent))
    assert (event.event_type, event.upload_id) == (EventType.HIT, old)
    (hit,) = event.payload["hits"]
    assert hit["retroactive"] is True
