"""The API's announcer: screening messages for committed uploads, sent from a thread."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence

import pytest
import redis

from moderation.messages import UPLOADS_PER_MESSAGE
from moderation.screening.announcer import Announcer
from tests.conftest import TEST_RUNTIME
from tests.queues import queued_uploads


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[str]:
    name = f"announcer-{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.delete(name)


def test_ids_from_many_requests_are_each_sent_once_sharing_messages(
    redis_client: redis.Redis, queue: str
) -> None:
    announcer = Announcer(TEST_RUNTIME.producer.send_screening)
    try:

        def one_request(first: int) -> None:
            for upload_id in range(first, first + 50):
                announcer.announce([upload_id], queue)

        requests = [threading.Thread(target=one_request, args=(n * 50,)) for n in range(8)]
        for request in requests:
            request.start()
        for request in requests:
            request.join()
        assert announcer.flush(10)
    finally:
        announcer.close()
    assert sorted(queued_uploads(redis_client, queue)) == list(range(400))
    messages = redis_client.llen(queue)
    # Requests of one upload each share messages, up to UPLOADS_PER_MESSAGE to one.
    assert 400 / UPLOADS_PER_MESSAGE <= messages < 400


class FlakyBroker:
    """Refuses the first `failures` sends, as kombu does while Redis is unreachable."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[tuple[list[int], str]] = []
        self.attempts = 0

    def send(self, upload_ids: Sequence[int], queue: str) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.sent.append((list(upload_ids), queue))


def test_ids_announced_while_it_gathers_go_in_one_send() -> None:
    # One client sending single events, one after another: without the gathering, each
    # request's id went to Redis in a send of its own.
    broker = FlakyBroker(failures=0)
    announcer = Announcer(broker.send, gather_s=2.0)
    try:
        for upload_id in range(20):
            announcer.announce([upload_id], "q")
            time.sleep(0.005)  # a request's time, about
        assert announcer.flush(10)
    finally:
        announcer.close()
    assert broker.sent == [(list(range(20)), "q")]


def test_closing_does_not_wait_out_the_gathering() -> None:
    broker = FlakyBroker(failures=0)
    announcer = Announcer(broker.send, gather_s=60.0)
    announcer.announce([1, 2], "q")
    started = time.monotonic()
    announcer.close(timeout_s=30)
    assert time.monotonic() - started < 10
    assert broker.sent == [([1, 2], "q")]
    assert announcer.pending == 0


def test_while_the_broker_is_down_ids_wait_in_order_and_go_once_it_is_back() -> None:
    broker = FlakyBroker(failures=3)
    announcer = Announcer(broker.send, retry_first_s=0.05, retry_max_s=0.1)
    try:
        announcer.announce([1, 2], "q")
        announcer.announce([3], "q")
        announcer.announce([10], "other")
        assert announcer.flush(10)
    finally:
        announcer.close()
    assert broker.attempts > 3
    by_queue: dict[str, list[int]] = {}
    for ids, queue in broker.sent:
        by_queue.setdefault(queue, []).extend(ids)
    assert by_queue == {"q": [1, 2, 3], "other": [10]}


def test_flush_says_when_the_broker_stays_down_and_close_gives_up() -> None:
    broker = FlakyBroker(failures=10**9)
    announcer = Announcer(broker.send, retry_first_s=0.05, retry_max_s=0.05)
    announcer.announce([1], "q")
    assert not announcer.flush(0.5)
    announcer.close(timeout_s=5)
    assert announcer.pending == 1  # left for the sweeper
    assert broker.sent == []


def test_beyond_its_bound_ids_are_left_to_the_sweeper() -> None:
    broker = FlakyBroker(failures=10**9)
    announcer = Announcer(broker.send, max_pending=5, retry_first_s=10, retry_max_s=10)
    try:
        announcer.announce([1, 2, 3], "q")
        announcer.announce([4, 5, 6, 7], "q")
        assert announcer.pending == 5
    finally:
        announcer.close(timeout_s=1)
