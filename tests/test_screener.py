"""The screener in this process, with a stub model: fast feedback on the pipeline's stages
(claim, intake in processes or in the thread, embed, search, record, timeouts, a dead
intake process) without a worker subprocess."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select

from moderation.banks import service as banks
from moderation.banks.models import BankEntryEmbedding
from moderation.config import Settings
from moderation.embedding.families import preprocessing_of
from moderation.embedding.models import Embedding, EmbeddingModel
from moderation.embedding.preprocessing import Preprocessing
from moderation.embedding.service import vector_from_bytes, vector_to_bytes
from moderation.images.budget import PEAK_BYTES_PER_PIXEL
from moderation.images.errors import UriRefused
from moderation.images.hashing import sha256
from moderation.review.models import Hit
from moderation.screening import service
from moderation.screening.models import Upload, UploadStatus
from moderation.worker.intake.jobs import IntakeProcessLost, IntakeStalled
from moderation.worker.intake.pool import IntakePool
from moderation.worker.pipeline import Screener, StageTimeout
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS
from tests.images import encode, textured, write
from tests.servers import http_server, image_handler

pytestmark = pytest.mark.usefixtures("clean_db")


class StubEmbedder:
    """The model's interface without a model: each crop's vector is its mean colour
    (so equal crops get equal vectors), normalised. `gate` holds forward passes back."""

    name = "stub-embedder"
    family = "stub"
    fingerprint = "stub"
    dim = 3
    device = torch.device("cpu")

    def __init__(self, preprocess: Preprocessing) -> None:
        self.preprocess = preprocess
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def embed(self, crops: np.ndarray) -> np.ndarray:
        self.gate.wait()
        self.batches.append(len(crops))
        means = crops.reshape(len(crops), -1, 3).mean(axis=1) + 1.0
        vectors: np.ndarray = (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(
            np.float32
        )
        return vectors


def _settings(**overrides: object) -> Settings:
    return TEST_SETTINGS.model_copy(update=overrides)


@pytest.fixture
def preprocess(tiny_model: Path) -> Preprocessing:
    return preprocessing_of(str(tiny_model))


@pytest.fixture(params=[1, 0], ids=["intake-processes", "intake-in-thread"])
def screener(request: pytest.FixtureRequest, preprocess: Preprocessing) -> Iterator[Screener]:
    settings = _settings(intake_processes=request.param, stage_timeout_s=5.0)
    built = Screener(settings, TEST_RUNTIME.session, StubEmbedder(preprocess), slots=4)  # type: ignore[arg-type]
    yield built
    built.close()


def _submit(*uris: str) -> list[int]:
    with TEST_RUNTIME.session() as session:
        return [service.submit(session, uri)[0].id for uri in uris]


def _upload(upload_id: int) -> Upload:
    with TEST_RUNTIME.session() as session:
        upload = session.get_one(Upload, upload_id)
        session.expunge(upload)
        return upload


def _in_threads(screener: Screener, upload_ids: Sequence[int]) -> None:
    threads = [threading.Thread(target=screener.run, args=(i,)) for i in upload_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()


def test_uploads_are_screened_and_recorded_with_their_vectors(
    screener: Screener, tmp_path: Path
) -> None:
    images = [textured(seed) for seed in range(6)]
    paths = [write(tmp_path / f"{i}.jpg", encode(image)) for i, image in enumerate(images)]
    banked = paths[0].read_bytes()
    with TEST_RUNTIME.session() as session:
        bank = banks.create_bank(session, "known-bad")
        banks.add_entries(session, bank, [banks.NewEntry(sha256=sha256(banked))], added_by="t")
    upload_ids = _submit(*(p.as_uri() for p in paths))

    _in_threads(screener, upload_ids)

    uploads = [_upload(i) for i in upload_ids]
    assert [u.status for u in uploads] == [UploadStatus.SCREENED] * 6
    assert [(u.width, u.height, u.frames_hashed) for u in uploads] == [(640, 480, 1)] * 6
    with TEST_RUNTIME.session() as session:
        hits = session.scalars(select(Hit.upload_id)).all()
        stored = {
            e.upload_id: vector_from_bytes(e.vector) for e in session.scalars(select(Embedding))
        }
    assert hits == [upload_ids[0]]
    # The crop that reached the model is the one the reference preprocessing makes: its
    # vector (the crop's mean colour) is the one stored.
    for upload_id, path in zip(upload_ids, paths, strict=True):
        crop = screener.embedder.preprocess(Image.open(path).convert("RGB"))
        expected = StubEmbedder(screener.embedder.preprocess).embed(crop[np.newaxis])[0]
        np.testing.assert_allclose(stored[upload_id], expected, atol=1e-6)
    assert sum(screener.embedder.batches) == 6  # type: ignore[attr-defined]


def test_bad_input_fails_the_upload_with_its_code(screener: Screener, tmp_path: Path) -> None:
    truncated = encode(textured(3))[:2000]
    (upload_id,) = _submit(write(tmp_path / "cut.jpg", truncated).as_uri())

    screener.run(upload_id)

    upload = _upload(upload_id)
    assert (upload.status, upload.error_code) == (UploadStatus.FAILED, "truncated_image")


def test_a_stalled_forward_pass_is_a_retried_stage_timeout(
    preprocess: Preprocessing, tmp_path: Path
) -> None:
    embedder = StubEmbedder(preprocess)
    embedder.gate.clear()  # the model never answers
    settings = _settings(intake_processes=0, stage_timeout_s=0.5)
    screener = Screener(settings, TEST_RUNTIME.session, embedder, slots=2)  # type: ignore[arg-type]
    (upload_id,) = _submit(write(tmp_path / "a.jpg", encode(textured(4))).as_uri())
    try:
        started = time.monotonic()
        with pytest.raises(
            StageTimeout, match=r"embed\+search gave no answer within 0\.5 s"
        ) as fault:
            screener.run(upload_id)
        assert time.monotonic() - started < 5
        assert screener.defer(upload_id, fault.value) is not None
        upload = _upload(upload_id)
        assert (upload.status, upload.error_code) == (UploadStatus.QUEUED, "stage_timeout")
    finally:
        embedder.gate.set()
        screener.close()


SLOW_IMAGE = encode(textured(7))


@pytest.fixture
def slow_server() -> Iterator[str]:
    """Serves an image after 3 s: intake is mid-fetch for that long."""
    with http_server(image_handler(SLOW_IMAGE, 3.0)) as url:
        yield url


def _pool(preprocess: Preprocessing, **overrides: object) -> IntakePool:
    return IntakePool(
        _settings(**overrides),
        processes=1,
        slots=2,
        timeout_s=float(overrides.get("intake_timeout_s", 30.0)),  # type: ignore[arg-type]
    )


def test_an_intake_process_killed_mid_upload_fails_only_that_upload_and_is_replaced(
    preprocess: Preprocessing, slow_server: str
) -> None:
    pool = _pool(preprocess)
    try:
        (victim,) = pool.pids
        killer = threading.Timer(1.0, os.kill, args=(victim, signal.SIGKILL))
        killer.start()
        with (
            pytest.raises(IntakeProcessLost),
            pool.screened(f"{slow_server}/a.jpg", None, [preprocess]),
        ):
            pass
        killer.join()
        assert pool.replaced == 1
        (replacement,) = pool.pids
        assert replacement != victim
        # The replacement screens the next upload, its crop in the shared slot.
        with pool.screened(f"{slow_server}/b.jpg", None, [preprocess]) as (signals, _):
            (crop,) = signals.embedding_inputs()
            assert crop.shape == (preprocess.crop_height, preprocess.crop_width, 3)
            assert signals.sha256 == sha256(SLOW_IMAGE)
    finally:
        pool.close()


@pytest.mark.parametrize("fault", ["killed", "stalled"])
def test_a_lost_intake_process_costs_only_the_job_it_was_on_not_the_one_queued_behind(
    preprocess: Preprocessing, slow_server: str, tmp_path: Path, fault: str
) -> None:
    """One process holding two jobs: the slow fetch it is working on, and behind it in its
    pipe a file it has not started. The process is SIGKILLed, or stalls past its timeout:
    the first job's upload gets the fault, the second is screened by the replacement."""
    quick = write(tmp_path / "quick.jpg", encode(textured(8)))
    timeout_s = 30.0 if fault == "killed" else 1.0
    pool = _pool(preprocess, intake_timeout_s=timeout_s, fetch_timeout_s=20.0)
    outcomes: dict[str, object] = {}

    def screen(name: str, uri: str) -> None:
        try:
            with pool.screened(uri, None, [preprocess]) as (signals, _):
                outcomes[name] = signals.sha256
        except Exception as error:
            outcomes[name] = error

    try:
        (victim,) = pool.pids
        running = threading.Thread(target=screen, args=("running", f"{slow_server}/a.jpg"))
        running.start()
        _wait_until(lambda: pool.in_flight == 1)
        queued = threading.Thread(target=screen, args=("queued", quick.as_uri()))
        queued.start()
        _wait_until(lambda: pool.in_flight == 2)  # both in the one process's pipe
        if fault == "killed":
            time.sleep(0.5)  # mid-fetch
            os.kill(victim, signal.SIGKILL)
        for thread in (running, queued):
            thread.join(timeout=30)
            assert not thread.is_alive()
        expected = IntakeProcessLost if fault == "killed" else IntakeStalled
        assert isinstance(outcomes["running"], expected)
        assert outcomes["queued"] == sha256(quick.read_bytes())
        assert pool.replaced == 1
        assert pool.pids != [victim]
        assert pool.in_flight == 0
    finally:
        pool.close()


@pytest.mark.parametrize("fault", ["killed", "stalled"])
def test_a_job_sent_as_an_idle_process_is_lost_goes_to_another_process_at_no_cost(
    preprocess: Preprocessing, tmp_path: Path, fault: str
) -> None:
    """A job reaches an idle process's pipe, and the process is lost before taking it:
    the job never began, so the replacement screens it and its upload is charged nothing.
    To hold the process in that moment, it is stopped (SIGSTOP) before the job is sent,
    then killed once the job is in its pipe, or left stopped until the pool finds it
    silent past its timeout and kills it."""
    images = [write(tmp_path / f"{n}.jpg", encode(textured(10 + n))) for n in range(2)]
    # Long enough, when stalled, for the replacement to start and screen the job in time.
    pool = _pool(preprocess, intake_timeout_s=30.0 if fault == "killed" else 5.0)
    outcomes: dict[str, object] = {}

    def screen() -> None:
        try:
            with pool.screened(images[1].as_uri(), None, [preprocess]) as (signals, _):
                outcomes["sent"] = signals.sha256
        except Exception as error:
            outcomes["sent"] = error

    try:
        # One job answered first: the process has taken a job before, and now waits idle.
        with pool.screened(images[0].as_uri(), None, [preprocess]):
            pass
        (victim,) = pool.pids
        os.kill(victim, signal.SIGSTOP)
        _wait_until(partial(_stopped, victim))
        thread = threading.Thread(target=screen)
        thread.start()
        _wait_until(lambda: pool.in_flight == 1)  # in the stopped process's pipe
        if fault == "killed":
            os.kill(victim, signal.SIGKILL)
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert outcomes["sent"] == sha256(images[1].read_bytes())
        assert pool.replaced == 1
        assert pool.pids != [victim]
    finally:
        pool.close()


def _stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T in /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def _replaced(pool: IntakePool, count: int) -> bool:
    return pool.replaced == count and len(pool.pids) == 1


def test_processes_that_keep_dying_are_replaced_at_a_paced_rate(
    preprocess: Preprocessing, tmp_path: Path
) -> None:
    """Processes that die as soon as they start are not restarted in a loop: after four
    replacements within the window, the next waits for the first to leave it, and then
    screens as usual."""
    quick = write(tmp_path / "quick.jpg", encode(textured(9)))
    pool = _pool(preprocess)
    pool.replacement_window_s = 3.0
    try:
        started = time.monotonic()
        for replacements in range(1, 6):
            (pid,) = pool.pids
            os.kill(pid, signal.SIGKILL)
            _wait_until(partial(_replaced, pool, replacements))
            if replacements == 4:
                assert time.monotonic() - started < 2.0  # the first four at once
        assert time.monotonic() - started >= 3.0  # the fifth waited
        with pool.screened(quick.as_uri(), None, [preprocess]) as (signals, _):
            assert signals.sha256 == sha256(quick.read_bytes())
    finally:
        pool.close()


def _wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_an_intake_process_that_does_not_answer_in_time_is_killed_and_replaced(
    preprocess: Preprocessing, slow_server: str
) -> None:
    # The fetch would wait longer than intake allows.
    pool = _pool(preprocess, intake_timeout_s=1.0, fetch_timeout_s=20.0)
    try:
        (stalled,) = pool.pids
        started = time.monotonic()
        with (
            pytest.raises(IntakeStalled),
            pool.screened(f"{slow_server}/a.jpg", None, [preprocess]),
        ):
            pass
        assert time.monotonic() - started < 2.5
        assert pool.replaced == 1
        assert pool.pids != [stalled]
        with pytest.raises(ProcessLookupError):
            os.kill(stalled, 0)
    finally:
        pool.close()


def test_typed_errors_cross_back_from_an_intake_process(
    preprocess: Preprocessing, tmp_path: Path
) -> None:
    pool = _pool(preprocess)
    try:
        refused = "file:///etc/shadow"
        with pytest.raises(UriRefused) as error, pool.screened(refused, None, [preprocess]):
            pass
        assert error.value.code == "uri_refused"
        # A refusal costs no process.
        assert pool.replaced == 0
    finally:
        pool.close()


def test_intake_processes_share_one_decode_budget_and_a_dead_one_keeps_none(
    preprocess: Preprocessing, tmp_path: Path
) -> None:
    large = Image.linear_gradient("L").resize((5000, 4000)).convert("RGB")
    path = write(tmp_path / "large.png", encode(large, "PNG", compress_level=1))
    pool = _pool(preprocess, decode_memory_mb=1024)
    try:
        outcome: list[BaseException] = []

        def screen() -> None:
            try:
                with pool.screened(path.as_uri(), None, [preprocess]):
                    pass
            except BaseException as error:
                outcome.append(error)

        thread = threading.Thread(target=screen)
        thread.start()
        # 20 megapixels: more than a process may decode without asking the worker.
        deadline = time.monotonic() + 30
        while pool.decode_memory.used_bytes == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert pool.decode_memory.used_bytes == 20_000_000 * PEAK_BYTES_PER_PIXEL
        (decoding,) = pool.pids
        os.kill(decoding, signal.SIGKILL)
        thread.join(timeout=30)
        assert [type(error) for error in outcome] == [IntakeProcessLost]
        assert pool.decode_memory.used_bytes == 0
        # And a large image decodes in the replacement, reserving and releasing again.
        with pool.screened(path.as_uri(), None, [preprocess]) as (signals, _):
            assert (signals.width, signals.height) == (5000, 4000)
        assert pool.decode_memory.used_bytes == 0
    finally:
        pool.close()


def test_a_job_that_arrives_while_its_process_waits_for_decode_memory_waits_its_turn(
    preprocess: Preprocessing, tmp_path: Path
) -> None:
    """Two large images in one process's pipe: the second arrives while the process waits
    for the worker to grant the first one's decode memory, and is screened after it."""
    large = Image.linear_gradient("L").resize((5000, 4000)).convert("RGB")
    paths = [
        write(tmp_path / f"large-{n}.png", encode(large, "PNG", compress_level=n)) for n in (1, 2)
    ]
    pool = _pool(preprocess, decode_memory_mb=1024)
    sizes: list[tuple[int, int]] = []

    def screen(path: Path) -> None:
        with pool.screened(path.as_uri(), None, [preprocess]) as (signals, _):
            sizes.append((signals.width, signals.height))

    try:
        threads = [threading.Thread(target=screen, args=(path,)) for path in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive()
        assert sizes == [(5000, 4000)] * 2
        assert pool.replaced == 0
        assert pool.decode_memory.used_bytes == 0
    finally:
        pool.close()


def test_a_stalled_claim_sends_the_messages_uploads_again(
    preprocess: Preprocessing, tmp_path: Path
) -> None:
    """Another transaction holds the rows' locks, so the claim cannot commit in time: the
    uploads come back as retries due (the task sends each again), not as a lost message."""
    settings = _settings(intake_processes=0, stage_timeout_s=0.5)
    screener = Screener(settings, TEST_RUNTIME.session, StubEmbedder(preprocess), slots=2)  # type: ignore[arg-type]
    upload_ids = _submit(
        *(write(tmp_path / f"{i}.jpg", encode(textured(i))).as_uri() for i in range(2))
    )
    try:
        with TEST_RUNTIME.session() as blocker:
            blocker.execute(select(Upload).where(Upload.id.in_(upload_ids)).with_for_update())
            retries = screener.run_many(upload_ids)
        assert retries == dict.fromkeys(upload_ids, settings.retry_backoff_s)
        # Once the locks are gone, the same message's uploads are screened.
        assert screener.run_many(upload_ids) == {}
        assert [_upload(i).status for i in upload_ids] == [UploadStatus.SCREENED] * 2
    finally:
        screener.close()


class OtherStub(StubEmbedder):
    """A second model: its own name and identity, its own (smaller) crops, and vectors
    that differ from the first model's for the same image."""

    name = "stub-embedder-2"
    fingerprint = "stub-2"

    def embed(self, crops: np.ndarray) -> np.ndarray:
        vectors: np.ndarray = super().embed(crops)[:, ::-1].copy()
        return vectors


@pytest.mark.parametrize("intake_processes", [1, 0], ids=["intake-processes", "intake-in-thread"])
def test_two_models_from_one_intake_each_embedding_and_matching_its_own(
    preprocess: Preprocessing, tmp_path: Path, intake_processes: int
) -> None:
    """During a model change: one intake per upload gives each model its own crop; each
    model's vectors are recorded under it; a bank entry embedded only by the second model
    still hits, under that model, and one embedded by both hits under the first."""
    small = dataclasses.replace(preprocess, crop_height=32, crop_width=32, shortest_edge=32)
    first, second = StubEmbedder(preprocess), OtherStub(small)
    settings = _settings(intake_processes=intake_processes, stage_timeout_s=10.0)
    screener = Screener(settings, TEST_RUNTIME.session, [first, second], slots=4)  # type: ignore[list-item]
    try:
        paths = [write(tmp_path / f"{i}.jpg", encode(textured(40 + i))) for i in range(3)]
        crops = [p(Image.open(paths[0]).convert("RGB")) for p in (preprocess, small)]
        vector_1 = StubEmbedder(preprocess).embed(crops[0][np.newaxis])[0]
        vector_2 = OtherStub(small).embed(crops[1][np.newaxis])[0]
        first_id, second_id = screener.lineup.model_ids
        with TEST_RUNTIME.session() as session:
            bank = banks.create_bank(session, "two-models")
            only_second, both = banks.add_entries(
                session,
                bank,
                [
                    banks.NewEntry(
                        embedding=vector_2, model=session.get_one(EmbeddingModel, second_id)
                    ),
                    banks.NewEntry(
                        embedding=vector_1, model=session.get_one(EmbeddingModel, first_id)
                    ),
                ],
                added_by="t",
            )
            session.add(
                BankEntryEmbedding(
                    bank_entry_id=both.id, model_id=second_id, vector=vector_to_bytes(vector_2)
                )
            )
            entry_ids = (only_second.id, both.id)
        upload_ids = _submit(*(p.as_uri() for p in paths))

        assert screener.run_many(upload_ids) == {}

        with TEST_RUNTIME.session() as session:
            stored = {
                (e.upload_id, e.model_id): vector_from_bytes(e.vector)
                for e in session.scalars(select(Embedding))
            }
            hits = sorted(
                (h.bank_entry_id, h.model_id)
                for h in session.scalars(select(Hit).where(Hit.upload_id == upload_ids[0]))
            )
        assert sorted(stored) == sorted((u, m) for u in upload_ids for m in (first_id, second_id))
        np.testing.assert_allclose(stored[(upload_ids[0], first_id)], vector_1, atol=1e-6)
        np.testing.assert_allclose(stored[(upload_ids[0], second_id)], vector_2, atol=1e-6)
        assert hits == sorted([(entry_ids[0], second_id), (entry_ids[1], first_id)])
        assert sum(first.batches) == sum(second.batches) == 3  # one forward pass each
    finally:
        screener.close()


@pytest.mark.parametrize("margin", [16, 0], ids=["rehashed", "margin-0"])
def test_an_entry_hashed_at_full_resolution_is_found_though_the_reduced_hash_misses_it(
    preprocess: Preprocessing, tmp_path: Path, margin: int
) -> None:
    """A hash list's entry 31 bits from the photo's full-resolution PDQ, and 31 plus the
    reduced decode's drift from its reduced PDQ: the near miss has the photo hashed again
    at full resolution, which matches at 31 bits. With a margin of 0 it is lost."""
    from moderation.images.decode import DecodeLimits
    from moderation.images.hashing import PdqHash
    from moderation.images.signals import extract_signals, full_resolution_pdq
    from tests.photos import PHONE

    settings = _settings(intake_processes=0, pdq_full_resolution_margin=margin)
    limits = DecodeLimits.from_settings(settings)
    data = encode(textured(1, PHONE), quality=90)
    reduced = extract_signals(data, limits, lambda frame: np.zeros((2, 2, 3), np.uint8))
    assert reduced.decode_scale == 4
    (full,) = full_resolution_pdq(data, limits)
    reduced_bits = np.unpackbits(np.frombuffer(reduced.frames[0].pdq.bits, np.uint8))
    full_bits = np.unpackbits(np.frombuffer(full.bits, np.uint8))
    drift = int((reduced_bits != full_bits).sum())
    assert 0 < drift <= 16
    # 31 bits flipped where the two hashes agree: 31 from full, 31 + drift from reduced.
    entry_bits = full_bits.copy()
    agree = np.flatnonzero(reduced_bits == full_bits)
    entry_bits[np.random.default_rng(4).choice(agree, 31, replace=False)] ^= 1
    listed = PdqHash(np.packbits(entry_bits).tobytes(), None)
    with TEST_RUNTIME.session() as session:
        bank = banks.create_bank(session, "hash list")
        (entry,) = banks.add_entries(session, bank, [banks.NewEntry(pdq=listed)], added_by="t")
        entry_id = entry.id
    (upload_id,) = _submit(write(tmp_path / "photo.jpg", data).as_uri())
    screener = Screener(settings, TEST_RUNTIME.session, StubEmbedder(preprocess), slots=1)  # type: ignore[arg-type]
    try:
        screener.run(upload_id)
    finally:
        screener.close()
    with TEST_RUNTIME.session() as session:
        hits = session.execute(select(Hit.bank_entry_id, Hit.signal, Hit.distance)).all()
    assert _upload(upload_id).status == UploadStatus.SCREENED
    assert [tuple(hit) for hit in hits] == ([(entry_id, "pdq", 31.0)] if margin else [])
    assert ("full_resolution_pdq" in screener.times.seconds) == bool(margin)
