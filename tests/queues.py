"""What waits on a broker queue, read from Redis as kombu leaves it."""

from __future__ import annotations

import json

import redis

from moderation.screening.recovery import uploads_of_message


def queued_uploads(redis_client: redis.Redis, queue: str) -> list[int]:
    """The uploads named by the messages waiting on the queue, oldest first (uploads sent
    together share a message)."""
    messages = [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)][::-1]
    return [upload_id for message in messages for upload_id in uploads_of_message(message)]
