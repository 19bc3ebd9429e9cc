"""Group commit against the real database: grouping, isolation of failures, durability."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy.orm import Session

from moderation.screening import service
from moderation.worker.group_commit import GroupCommit
from tests.conftest import TEST_RUNTIME

pytestmark = pytest.mark.usefixtures("clean_db")


class Recorder:
    """Submits uploads (one per URI) and remembers the size of every group it was given.
    `gate`, while cleared, holds the writer inside its first transaction."""

    def __init__(self) -> None:
        self.groups: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.in_first_group = threading.Event()

    def __call__(self, session: Session, uris: Sequence[str]) -> list[int]:
        self.groups.append(len(uris))
        self.in_first_group.set()
        self.gate.wait(timeout=10)
        if any("bad" in uri for uri in uris):
            raise ValueError(f"refusing {[u for u in uris if 'bad' in u]}")
        return service.submit_many(session, uris)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def writer(recorder: Recorder) -> Iterator[GroupCommit[str, int]]:
    group_commit: GroupCommit[str, int] = GroupCommit(
        TEST_RUNTIME.session, recorder, name="test-writer"
    )
    yield group_commit
    group_commit.close()


def _until_waiting(writer: GroupCommit[str, int], count: int) -> None:
    deadline = time.monotonic() + 10
    while writer.waiting < count:
        assert time.monotonic() < deadline, f"{writer.waiting} of {count} writes were handed in"
        time.sleep(0.01)


def _uris_of(upload_ids: list[int]) -> list[str]:
    with TEST_RUNTIME.session() as session:
        return [upload.uri for upload in service.get_uploads(session, upload_ids)]


def test_writes_that_queue_up_meanwhile_share_one_transaction(
    writer: GroupCommit[str, int], recorder: Recorder
) -> None:
    recorder.gate.clear()
    uris = [f"file:///{i}.jpg" for i in range(11)]
    with ThreadPoolExecutor(len(uris)) as pool:
        first = pool.submit(writer, uris[0])
        assert recorder.in_first_group.wait(timeout=10)
        rest = [pool.submit(writer, uri) for uri in uris[1:]]
        _until_waiting(writer, len(rest))  # all ten wait behind the first
        recorder.gate.set()
        upload_ids = [first.result(timeout=10)] + [f.result(timeout=10) for f in rest]

    assert recorder.groups == [1, 10]
    # Each caller got its own item's result, and it was committed before the call returned.
    assert _uris_of(upload_ids) == uris


def test_a_failing_group_is_retried_one_item_at_a_time(
    writer: GroupCommit[str, int], recorder: Recorder
) -> None:
    recorder.gate.clear()
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(writer, "file:///first.jpg")
        assert recorder.in_first_group.wait(timeout=10)
        calls = [
            pool.submit(writer, uri)
            for uri in ("file:///a.jpg", "file:///bad.jpg", "file:///c.jpg")
        ]
        _until_waiting(writer, len(calls))
        recorder.gate.set()
        blocker.result(timeout=10)
        a, bad, c = calls

        with pytest.raises(ValueError, match=r"bad\.jpg"):
            bad.result(timeout=10)
        assert _uris_of([a.result(timeout=10), c.result(timeout=10)]) == [
            "file:///a.jpg",
            "file:///c.jpg",
        ]
    assert recorder.groups == [1, 3, 1, 1, 1]


def test_close_writes_what_was_handed_in_then_refuses_more(recorder: Recorder) -> None:
    writer: GroupCommit[str, int] = GroupCommit(TEST_RUNTIME.session, recorder, name="test-writer")
    recorder.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(writer, "file:///1.jpg")
        assert recorder.in_first_group.wait(timeout=10)
        second = pool.submit(writer, "file:///2.jpg")
        _until_waiting(writer, 1)
        closing = pool.submit(writer.close)
        recorder.gate.set()
        closing.result(timeout=10)
        assert _uris_of([first.result(timeout=10), second.result(timeout=10)]) == [
            "file:///1.jpg",
            "file:///2.jpg",
        ]
    with pytest.raises(RuntimeError, match="test-writer has stopped"):
        writer("file:///3.jpg")


def test_a_write_many_that_miscounts_commits_nothing(recorder: Recorder) -> None:
    def one_short(session: Session, uris: Sequence[str]) -> list[int]:
        return service.submit_many(session, uris)[:-1]

    writer: GroupCommit[str, int] = GroupCommit(TEST_RUNTIME.session, one_short, name="test-writer")
    try:
        with pytest.raises(RuntimeError, match="wrote 1 items but got 0 results"):
            writer("file:///lost.jpg")
    finally:
        writer.close()
    with TEST_RUNTIME.session() as session:
        assert service.list_uploads(session) == []
