"""Celery tasks of the screening domain. Thin: hand the ids to the worker's screener.

Producers import this module to publish, so it imports nothing heavy (no torch, no Faiss);
the screener is imported where it runs, in the worker.
"""

from __future__ import annotations

import logging

from celery import Task
from sqlalchemy.exc import DBAPIError

from moderation.celery_app import SCREEN_UPLOAD, SCREEN_UPLOADS, app, send_screening

logger = logging.getLogger(__name__)

# The database is unreachable: nothing can be recorded, so retry the message itself (its
# uploads already final are skipped the next time). If this runs out too, the sweeper
# re-enqueues the uploads once the database is back.
_RETRY_DATABASE_ERRORS = {
    "autoretry_for": (DBAPIError,),
    "retry_backoff": 2,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": 10,
}


@app.task(bind=True, name=SCREEN_UPLOADS, **_RETRY_DATABASE_ERRORS)
def screen_uploads(self: Task, upload_ids: list[int]) -> None:
    """Screen uploads; each transient fault is retried alone, in a message of its own
    after its backoff. The message is acknowledged (acks_late) once every upload in it is
    recorded or has its retry sent."""
    _screen(self, upload_ids)


@app.task(bind=True, name=SCREEN_UPLOAD, **_RETRY_DATABASE_ERRORS)
def screen_upload(self: Task, upload_id: int) -> None:
    """One upload per message, as producers sent before `screen_uploads`."""
    _screen(self, [upload_id])


def _screen(task: Task, upload_ids: list[int]) -> None:
    from moderation.screening.worker import get_screener

    retries = get_screener().run_many(upload_ids)
    queue = (task.request.delivery_info or {}).get("routing_key")
    for upload_id, delay in retries.items():
        app.send_task(SCREEN_UPLOADS, args=([upload_id],), countdown=delay, queue=queue)


def publish_screening(upload_ids: list[int], queue: str | None = None) -> None:
    """Send screening messages (to the configured queue unless told otherwise). Call only
    after the rows are committed."""
    send_screening(upload_ids, queue)
