"""What crosses Redis: the task names, the Celery configuration that producers and workers
share, and sending.

Redis is transport, PostgreSQL the source of truth: a message only announces rows that
are already committed, so it is sent after their transaction (`db.after_commit`, or
explicitly once the runtime's `session()` has committed). Producers (the API, the command line, a
worker's sweeper) send by task name, and so never import the worker runtime, which
registers the tasks themselves (`moderation.worker.celery_app`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from celery import Celery

from moderation.config import Settings

# The screening tasks: one upload per message, or many.
SCREEN_UPLOAD = "moderation.screen_upload"
SCREEN_UPLOADS = "moderation.screen_uploads"
# One step of a retro-hunt job, on its own queue (`Settings.resolved_retrohunt_queue`).
RETROHUNT_STEP = "moderation.retrohunt_step"
# One step of a re-embedding job, on its own queue (`Settings.resolved_reembed_queue`).
REEMBED_STEP = "moderation.reembed_step"
# Uploads per message when many are sent at once. Celery costs about 0.75 ms of the
# worker's interpreter per message (receive, dispatch, acknowledge: a third of a worker's
# Python time at one upload per message, measured with py-spy), which a GPU worker
# screening 1,000 uploads/s cannot spare; 16 per message make it a few percent, while a
# worker never holds more than 16 times its task threads.
UPLOADS_PER_MESSAGE = 16


def create_celery(settings: Settings, *, current: bool = False) -> Celery:
    """A Celery application configured for this service, with no tasks: what a producer
    sends with, and what the worker registers its tasks on (the worker's is `current`:
    Celery's own machinery looks that one up)."""
    app = Celery("moderation", broker=settings.redis_url, set_as_current=current)
    app.conf.update(
        # Acknowledge only after the upload's transaction has committed; a message taken by a
        # worker that dies is delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message per thread in flight; the thread pool is sized to keep the model busy.
        worker_prefetch_multiplier=1,
        # Results live in PostgreSQL; Redis carries only the messages.
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        # Redis is transport and may restart: a worker waits for it however long it takes
        # (Celery's default gives up after 100 tries, about 45 minutes, and exits).
        broker_connection_max_retries=None,
        # Found by restarting Redis under a busy worker (tests/test_faults.py): a thread pool
        # cannot cancel a running task, so asking it to on a lost connection only logged a
        # NotImplementedError traceback per task, which then ran on anyway. Running on is
        # what we want: the task records its upload in PostgreSQL, idempotently, and if its
        # message comes back (restored, or re-sent by the sweeper), that delivery finds the
        # upload final. Celery warns once per connection loss that the default will change.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
    )
    return app


class Producer:
    """What a process sends with: a Celery application for `settings`' broker (it holds the
    connection pool) and the queues the settings name. Built once by the process's
    `Runtime`; safe to share between threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_celery(settings)

    def send_screening(self, upload_ids: Sequence[int], queue: str | None = None) -> None:
        """Send screening messages for uploads whose rows are committed,
        `UPLOADS_PER_MESSAGE` to a message, to the configured queue unless told otherwise."""
        app = self.app
        queue = queue or self.settings.queue
        with app.producer_or_acquire() as connection, _one_round_trip(connection):
            for start in range(0, len(upload_ids), UPLOADS_PER_MESSAGE):
                chunk = list(upload_ids[start : start + UPLOADS_PER_MESSAGE])
                app.send_task(
                    SCREEN_UPLOADS,
                    args=(chunk,),
                    queue=queue,
                    producer=connection,
                    # Celery's own argsrepr walks the ids through `saferepr`, and it declares
                    # the queue again for each message: together half of the time a message
                    # took to send (cProfile, 7 messages of 100 uploads). A list of ints is
                    # safe to `repr`, and the queue is declared once a call, with the first.
                    argsrepr=repr((chunk,)),
                    kwargsrepr="{}",
                    **({} if start == 0 else {"declare": []}),
                )

    def send_screening_retry(self, upload_id: int, delay_s: float, queue: str | None) -> None:
        """Send one upload's screening again after `delay_s` (a transient fault's backoff),
        to `queue` (the one its message came from), else the configured one."""
        self.app.send_task(
            SCREEN_UPLOADS,
            args=([upload_id],),
            countdown=delay_s,
            queue=queue or self.settings.queue,
        )

    def send_retrohunt_step(self, job_id: int, step: int) -> None:
        """Send a retro-hunt job's step; only after the transaction that made it due commits."""
        self.app.send_task(
            RETROHUNT_STEP, args=(job_id, step), queue=self.settings.resolved_retrohunt_queue()
        )

    def send_reembed_step(
        self, job_id: int, step: int, *, countdown_s: float | None = None
    ) -> None:
        """Send a re-embedding job's step; only after the transaction that made it due
        commits."""
        self.app.send_task(
            REEMBED_STEP,
            args=(job_id, step),
            queue=self.settings.resolved_reembed_queue(),
            countdown=countdown_s,
        )

    def close(self) -> None:
        self.app.close()


def _one_round_trip(connection: Any) -> AbstractContextManager[Any]:
    """Buffer the producer's messages and send them together on leaving (a Redis pipeline),
    where kombu can (5.7 and later): sent one at a time, the seven messages of 100 uploads
    were a third of `POST /v1/uploads`'s time, one Redis round trip each (py-spy)."""
    batch = getattr(connection, "batch", None)
    if batch is None or not getattr(connection, "supports_batch_publish", False):
        return nullcontext()
    context: AbstractContextManager[Any] = batch()
    return context
