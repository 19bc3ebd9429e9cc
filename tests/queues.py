"""What waits on a broker queue, read from Redis as kombu leaves it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from moderation.runtime import Runtime
from moderation.worker.recovery import uploads_of_message


@pytest.fixture
def queue_runtime(
    make_runtime: Callable[..., Runtime], redis_client: redis.Redis
) -> Iterator[Runtime]:
    """The tests' runtime on a queue of the test's own, which no worker consumes (an
    end-to-end test's worker, once started, consumes the usual one): messages stay where
    the test counts them. The `api` fixture (`tests.api_fixtures`) serves on it when the
    test takes `queue`; commands take it as `obj`."""
    runtime = make_runtime(queue=f"test-queue-{uuid.uuid4().hex[:8]}")
    yield runtime
    redis_client.delete(runtime.settings.queue)


@pytest.fixture
def queue(queue_runtime: Runtime) -> str:
    """The name of the test's own queue (`queue_runtime`'s)."""
    return queue_runtime.settings.queue


def queued_uploads(redis_client: redis.Redis, queue: str) -> list[int]:
    """The uploads named by the messages waiting on the queue, oldest first (uploads sent
    together share a message)."""
    messages = [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)][::-1]
    return [upload_id for message in messages for upload_id in uploads_of_message(message)]
