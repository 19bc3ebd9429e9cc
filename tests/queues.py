"""What waits on a broker queue, read from Redis as kombu leaves it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis

from moderation.config import get_settings
from moderation.worker.recovery import uploads_of_message


@pytest.fixture
def queue(monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis) -> Iterator[str]:
    """A queue of the test's own, made the configured one, which no worker consumes (an
    end-to-end test's worker, once started, consumes the usual one): messages stay where
    the test counts them."""
    name = f"test-queue-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MODERATION_QUEUE", name)
    get_settings.cache_clear()
    yield name
    redis_client.delete(name)
    monkeypatch.undo()
    get_settings.cache_clear()


def queued_uploads(redis_client: redis.Redis, queue: str) -> list[int]:
    """The uploads named by the messages waiting on the queue, oldest first (uploads sent
    together share a message)."""
    messages = [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)][::-1]
    return [upload_id for message in messages for upload_id in uploads_of_message(message)]
