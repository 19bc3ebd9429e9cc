"""The worker's Celery application: the service's Celery configuration
(`moderation.messages`) with the tasks registered on it, all on one base task, holding
the worker process's state (`process.WorkerState`) that the tasks reach through it.

Built by the entry point (`moderation worker`) on the runtime it passes down, not at
import: importing this module changes nothing.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready, worker_shutdown
from sqlalchemy.exc import DBAPIError

from moderation.messages import (
    REEMBED_STEP,
    RETROHUNT_STEP,
    SCREEN_UPLOAD,
    SCREEN_UPLOADS,
    create_celery,
)
from moderation.runtime import Runtime
from moderation.worker import tasks
from moderation.worker.process import WorkerState


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


def create_app(runtime: Runtime) -> Celery:
    """The worker's application on `runtime`'s broker, holding a new `WorkerState` on
    `runtime` (`WorkerState.of(app)`)."""
    app = create_celery(runtime.settings, current=True)
    state = WorkerState(runtime)
    state.hold_on(app)
    app.task(bind=True, base=ModerationTask, name=SCREEN_UPLOADS)(tasks.screen_uploads)
    app.task(bind=True, base=ModerationTask, name=SCREEN_UPLOAD)(tasks.screen_upload)
    app.task(bind=True, base=ModerationTask, name=RETROHUNT_STEP)(tasks.retrohunt_step)
    app.task(bind=True, base=ModerationTask, name=REEMBED_STEP)(tasks.reembed_step)

    # The worker process starts its sweeper once it consumes, and stops what it runs when
    # Celery has finished the last task.
    def on_ready(**_: Any) -> None:
        state.start_sweeper()

    def on_shutdown(**_: Any) -> None:
        state.stop()

    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
    return app
