"""Celery tasks of the screening domain. Thin: hand the id to the worker's screener.

Producers import this module to publish, so it imports nothing heavy (no torch, no Faiss);
the screener is imported where it runs, in the worker.
"""

from __future__ import annotations

import logging

from celery import Task
from sqlalchemy.exc import DBAPIError

from moderation.celery_app import SCREEN_UPLOAD, app
from moderation.images.errors import TransientFault
from moderation.screening.service import UploadNotFound

logger = logging.getLogger(__name__)


@app.task(
    bind=True,
    name=SCREEN_UPLOAD,
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


def publish_screening(upload_ids: list[int], queue: str | None = None) -> None:
    """Send one screening message per upload (to the configured queue unless told otherwise).
    Call only after the rows are committed."""
    with app.producer_or_acquire() as producer:
        for upload_id in upload_ids:
            screen_upload.apply_async(args=(upload_id,), producer=producer, queue=queue)
