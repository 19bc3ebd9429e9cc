"""The Celery application: Redis as transport, PostgreSQL as the source of truth."""

from __future__ import annotations

from celery import Celery

from moderation.config import Settings, get_settings


def create_app(settings: Settings) -> Celery:
    app = Celery("moderation", broker=settings.redis_url, include=["moderation.screening.tasks"])
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
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
    )
    return app


app = create_app(get_settings())
