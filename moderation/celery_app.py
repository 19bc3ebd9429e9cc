"""The Celery application: Redis as transport, PostgreSQL as the source of truth."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from celery import Celery

from moderation.config import Settings, get_settings

# The screening tasks' names: producers and the recovery sweeper publish by name, without
# importing the task module (which imports the worker). One upload per message, or many.
SCREEN_UPLOAD = "moderation.screen_upload"
SCREEN_UPLOADS = "moderation.screen_uploads"
# One step of a retro-hunt job, on its own queue (`Settings.resolved_retrohunt_queue`).
RETROHUNT_STEP = "moderation.retrohunt_step"
# Uploads per message when many are sent at once. Celery costs about 0.75 ms of the
# worker's interpreter per message (receive, dispatch, acknowledge: a third of a worker's
# Python time at one upload per message, measured with py-spy), which a GPU worker
# screening 1,000 uploads/s cannot spare; 16 per message make it a few percent, while a
# worker never holds more than 16 times its task threads.
UPLOADS_PER_MESSAGE = 16


def create_app(settings: Settings) -> Celery:
    app = Celery(
        "moderation",
        broker=settings.redis_url,
        include=["moderation.screening.tasks", "moderation.retrohunt.tasks"],
    )
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


app = create_app(get_settings())


def send_screening(upload_ids: Sequence[int], queue: str | None = None) -> None:
    """Send screening messages for uploads whose rows are committed, `UPLOADS_PER_MESSAGE`
    to a message, to the configured queue unless told otherwise."""
    with app.producer_or_acquire() as producer, _one_round_trip(producer):
        for start in range(0, len(upload_ids), UPLOADS_PER_MESSAGE):
            chunk = list(upload_ids[start : start + UPLOADS_PER_MESSAGE])
            app.send_task(
                SCREEN_UPLOADS,
                args=(chunk,),
                queue=queue,
                producer=producer,
                # Celery's own argsrepr walks the ids through `saferepr`, and it declares the
                # queue again for each message: together half of the time a message took to
                # send (cProfile, 7 messages of 100 uploads). A list of ints is safe to
                # `repr`, and the queue is declared once a call, with the first message.
                argsrepr=repr((chunk,)),
                kwargsrepr="{}",
                **({} if start == 0 else {"declare": []}),
            )


def _one_round_trip(producer: Any) -> AbstractContextManager[Any]:
    """Buffer the producer's messages and send them together on leaving (a Redis pipeline),
    where kombu can (5.7 and later): sent one at a time, the seven messages of 100 uploads
    were a third of `POST /v1/uploads`'s time, one Redis round trip each (py-spy)."""
    batch = getattr(producer, "batch", None)
    if batch is None or not getattr(producer, "supports_batch_publish", False):
        return nullcontext()
    context: AbstractContextManager[Any] = batch()
    return context
