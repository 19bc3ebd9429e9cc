"""The worker's Celery application: the service's Celery configuration
(`moderation.messages`) with the tasks registered on it, all on one base task.

Built by the entry point (`moderation worker`), not at import: importing this module
changes nothing.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready, worker_shutdown
from sqlalchemy.exc import DBAPIError

from moderation.config import Settings
from moderation.messages import (
    REEMBED_STEP,
    RETROHUNT_STEP,
    SCREEN_UPLOAD,
    SCREEN_UPLOADS,
    create_celery,
)
from moderation.worker import process, tasks


class ModerationTask(Task):  # type: ignore[misc]
    """What every task shares. The database is unreachable: nothing can be recorded, so
    the message itself is tried again with backoff (what it already recorded is skipped
    the next time: every effect is idempotent). If that runs out too, the sweeper sends
    the work again once the database is back. Messages a task sends announce rows it has
    committed, so they are sent after its transaction (`moderation.db.after_commit`)."""

    autoretry_for = (DBAPIError,)
    retry_backoff = 2
    retry_backoff_max = 300
    retry_jitter = True
    max_retries = 10


def create_app(settings: Settings) -> Celery:
    app = create_celery(settings, current=True)
    app.task(bind=True, base=ModerationTask, name=SCREEN_UPLOADS)(tasks.screen_uploads)
    app.task(bind=True, base=ModerationTask, name=SCREEN_UPLOAD)(tasks.screen_upload)
    app.task(bind=True, base=ModerationTask, name=RETROHUNT_STEP)(tasks.retrohunt_step)
    app.task(bind=True, base=ModerationTask, name=REEMBED_STEP)(tasks.reembed_step)
    # The worker process starts its sweeper once it consumes, and stops what it runs when
    # Celery has finished the last task.
    worker_ready.connect(_on_ready, weak=False)
    worker_shutdown.connect(_on_shutdown, weak=False)
    return app


def _on_ready(**_: Any) -> None:
    process.start_sweeper()


def _on_shutdown(**_: Any) -> None:
    process.stop()
