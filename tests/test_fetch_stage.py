"""Fetching apart from the CPU work (`moderation/worker/intake/fetches.py`): uploads whose
servers trickle their answers hold only their own fetches, and a normal upload is screened
meanwhile by a real worker with one intake process."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from moderation.embedding.families import preprocessing_of
from moderation.images.errors import BadInput, ContentMismatch
from moderation.images.hashing import sha256
from moderation.screening import service
from moderation.screening.cli import wait_until_final
from moderation.screening.models import Upload, UploadStatus
from moderation.worker.child import WorkerProcess
from moderation.worker.intake.fetches import FetchGate, fetched_here
from moderation.worker.intake.jobs import IntakeStalled
from moderation.worker.intake.pool import IntakePool
from tests.conftest import TEST_ENV, TEST_FETCH_NETWORK, TEST_RUNTIME, TEST_SETTINGS
from tests.images import encode, textured
from tests.servers import Listener, http_server, image_handler, read_request, tcp_listener

IMAGE = encode(textured(300))
# The slow servers live on a host of their own, so that the normal upload's host has its
# own per-host slots (any 127/8 address is this machine's loopback).
SLOW_HOST = "127.0.0.2"


def test_fetch_gate_limits_a_host_and_lets_other_hosts_through() -> None:
    gate = FetchGate(total=3, per_host=1)
    entered = threading.Event()
    release = threading.Event()

    def hold_slow_host() -> None:
        with gate.held("slow.example", timeout_s=10):
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold_slow_host)
    holder.start()
    assert entered.wait(10)
    # Another host is not held back by the slow one.
    with gate.held("fast.example", timeout_s=0.01):
        assert gate.in_flight == 2
    # The slow host's slot is taken: a second fetch to it waits, then gives up, retried.
    with (
        pytest.raises(IntakeStalled, match="WORKER_FETCHES_PER_HOST"),
        gate.held("slow.example", timeout_s=0.05),
    ):
        pass
    # A waiter is let in when the holder lets go.
    let_in = threading.Event()

    def wait_for_slow_host() -> None:
        with gate.held("slow.example", timeout_s=10):
            let_in.set()

    waiter = threading.Thread(target=wait_for_slow_host)
    waiter.start()
    assert gate.in_flight_to("slow.example") == 1
    release.set()
    assert let_in.wait(10)
    holder.join()
    waiter.join()
    assert gate.in_flight == 0


def test_fetch_gate_bounds_fetches_in_all() -> None:
    gate = FetchGate(total=1, per_host=5)
    with (
        gate.held("a.example", timeout_s=1),
        pytest.raises(IntakeStalled, match="MODERATION_WORKER_FETCHES\\)"),
        gate.held("b.example", timeout_s=0.05),
    ):
        pass


def _shared_blocks() -> set[str]:
    return {entry.name for entry in Path("/dev/shm").iterdir()}


def test_fetched_bytes_reach_an_intake_process_and_their_block_is_freed(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The bytes the worker fetched are what the process screens (the URI itself answers
    nothing: a fetch there would fail), declared bytes are checked against them, and the
    shared memory that carried them is gone once the upload is through intake."""
    preprocess = preprocessing_of(str(tiny_model))
    pool = IntakePool(TEST_SETTINGS, processes=1, slots=2, timeout_s=30)
    nowhere = "http://127.0.0.1:9/never-fetched.jpg"
    try:
        pool.slots_for((preprocess.crop_shape,))  # the crop slots' block, made before
        before = _shared_blocks()
        with pool.screened(nowhere, sha256(IMAGE), [preprocess], IMAGE) as (signals, _):
            assert signals.sha256 == sha256(IMAGE)
            (crop,) = signals.embedding_inputs()
            assert crop.shape == (preprocess.crop_height, preprocess.crop_width, 3)
        with (
            pytest.raises(ContentMismatch),
            pool.screened(nowhere, sha256(b"other bytes"), [preprocess], IMAGE),
        ):
            pass
        # An empty body is handed over too (a block cannot be empty), and refused as such.
        with pytest.raises(BadInput), pool.screened(nowhere, None, [preprocess], b""):
            pass
        assert _shared_blocks() - before == set()
    finally:
        pool.close()


def test_only_http_is_fetched_by_the_worker() -> None:
    assert fetched_here("http://example.com/a.jpg")
    assert fetched_here("HTTPS://example.com/a.jpg")
    assert not fetched_here("file:///srv/uploads/a.jpg")
    assert not fetched_here("/srv/uploads/a.jpg")


class TricklingServer:
    """Reads each request, then sends its answer's head a byte at a time until released:
    the fetch stays in flight, holding whatever it holds, for as long as the test wants."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def handle(self, conn: socket.socket) -> None:
        read_request(conn)
        head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000
        sent = 0
        while sent < len(head) and not self.released.wait(0.2):
            conn.sendall(head[sent : sent + 1])
            sent += 1
        rest = b"\r\nContent-Length: " + str(len(IMAGE)).encode() + b"\r\n\r\n" + IMAGE
        conn.sendall(head[sent:] + rest)


@pytest.fixture
def trickling() -> Iterator[tuple[TricklingServer, Listener]]:
    server = TricklingServer()
    with tcp_listener(SLOW_HOST, server.handle) as listener:
        try:
            yield server, listener
        finally:
            server.released.set()


def _submit_each_in_a_message(uris: list[str], queue: str) -> list[int]:
    with TEST_RUNTIME.session() as session:
        ids = [service.submit(session, uri)[0].id for uri in uris]
    for upload_id in ids:  # a message each: as many task threads held as uploads
        TEST_RUNTIME.producer.send_screening([upload_id], queue=queue)
    return ids


def _processing(ids: list[int]) -> int:
    with TEST_RUNTIME.session() as session:
        query = select(func.count()).where(
            Upload.id.in_(ids), Upload.status == UploadStatus.PROCESSING
        )
        return session.scalar(query) or 0


def _wait_for_connections(listener: Listener, count: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while (seen := listener.connections) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


@pytest.mark.e2e
@pytest.mark.usefixtures("clean_db")
def test_a_normal_upload_is_screened_while_slow_servers_hold_their_fetches(
    trickling: tuple[TricklingServer, Listener], tmp_path: Path
) -> None:
    """Eight uploads whose server trickles its headers, a message each, then a normal one.
    Before fetching had slots of its own, the one intake process held two of the slow
    fetches in its pipe and the worker's task threads the rest: the normal upload waited
    for the slow ones' deadline. Now the slow ones hold four fetch slots for their host
    (the other four wait for one), and the normal upload is screened while they trickle."""
    server, listener = trickling
    queue = f"screening-fetch-stage-{os.getpid()}"
    env = {
        **TEST_ENV,
        "MODERATION_QUEUE": queue,
        "MODERATION_FETCH_ALLOWED_NETWORKS": f"{TEST_FETCH_NETWORK},{SLOW_HOST}/32",
        # Longer than the test: the slow fetches end when the test releases them.
        "MODERATION_FETCH_TIMEOUT_S": "120",
        "MODERATION_INTAKE_TIMEOUT_S": "180",
        "MODERATION_INTAKE_PROCESSES": "1",
        "MODERATION_WORKER_CONCURRENCY": "4",
        "MODERATION_WORKER_FETCHES": "16",
        "MODERATION_WORKER_FETCHES_PER_HOST": "4",
        "MODERATION_STUCK_AFTER_S": "3600",
    }
    with (
        http_server(image_handler(IMAGE)) as normal_server,
        WorkerProcess(tmp_path / "worker.log", env) as worker,
    ):
        worker.wait_ready()
        slow = _submit_each_in_a_message([f"{listener.url}/{i}.jpg" for i in range(8)], queue)
        # Four fetches to the slow host at once, and no more: the others wait for its slots.
        assert _wait_for_connections(listener, 4) == 4
        (normal,) = _submit_each_in_a_message([f"{normal_server}/normal.jpg"], queue)
        (screened,) = wait_until_final(TEST_RUNTIME, [normal], timeout_s=60)
        assert screened.status == UploadStatus.SCREENED, worker.log()
        # The slow ones were in flight all along, and still held only their host's slots.
        assert not server.released.is_set()
        assert _processing(slow) == len(slow)
        assert listener.connections_so_far() == 4

        server.released.set()
        final = wait_until_final(TEST_RUNTIME, slow, timeout_s=120)
        log = worker.log()
        fetched = listener.connections_so_far()
    assert [u.status for u in final] == [UploadStatus.SCREENED] * len(slow), log
    assert fetched == len(slow)  # each fetched once, none retried
