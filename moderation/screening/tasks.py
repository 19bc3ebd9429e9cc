"""Celery tasks of the screening domain. Thin: hand the id to the worker's screener.

Producers import this module to publish, so it imports nothing heavy (no torch, no Faiss);
the screener is imported where it runs, in the worker.
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import timedelta

from celery import Task
from sqlalchemy.exc import DBAPIError

from moderation.celery_app import app
from moderation.config import get_settings
from moderation.db import session_scope
from moderation.images.errors import TransientFault
from moderation.screening.service import UploadNotFound, find_stuck

logger = logging.getLogger(__name__)


@app.task(
    bind=True,
    name="moderation.screen_upload",
    # The database is unreachable: nothing can be recorded, so retry the message itself.
    # If this runs out too, the sweeper re-enqueues the upload once the database is back.
    autoretry_for=(DBAPIError,),
    retry_backoff=2,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=10,
)
def screen_upload(self: Task, upload_id: int) -> None:
    from moderation.screening.worker import get_screener

    screener = get_screener()
    try:
        screener.run(upload_id)
    except UploadNotFound:
        logger.error("upload %d does not exist; dropping its message", upload_id)
    except TransientFault as fault:
        delay = screener.defer(upload_id, fault)
        if delay is not None:
            raise self.retry(countdown=delay, max_retries=None) from fault


def sweep_once(queue: str | None = None) -> list[int]:
    """Re-enqueue uploads stuck in queued or processing (see `find_stuck`) on the
    configured queue unless told otherwise; returns their ids."""
    settings = get_settings()
    queue = queue or settings.queue
    oldest_waiting = oldest_waiting_upload(queue)
    with session_scope() as session:
        stuck = find_stuck(
            session,
            older_than=timedelta(seconds=settings.stuck_after_s),
            oldest_waiting=oldest_waiting,
        )
    if stuck:
        logger.warning("re-enqueueing %d stuck upload(s): %s", len(stuck), stuck[:20])
        publish_screening(stuck, queue=queue)
    return stuck


def oldest_waiting_upload(queue: str) -> int | None:
    """The upload of the message next in line on the queue; None if the queue is empty
    or that message is not a screening message. Celery on Redis keeps a queue as a list
    that producers push on the left and workers pop from the right."""
    with app.connection_for_read() as connection:
        raw = connection.default_channel.client.lindex(queue, -1)
    if raw is None:
        return None
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, _kwargs, _embed = json.loads(body)
        return int(args[0])
    except (ValueError, KeyError, TypeError, IndexError):
        logger.warning("the message next in line on %s is not a screening message", queue)
        return None


def publish_screening(upload_ids: list[int], queue: str | None = None) -> None:
    """Send one screening message per upload (to the configured queue unless told otherwise).
    Call only after the rows are committed."""
    with app.producer_or_acquire() as producer:
        for upload_id in upload_ids:
            screen_upload.apply_async(args=(upload_id,), producer=producer, queue=queue)
