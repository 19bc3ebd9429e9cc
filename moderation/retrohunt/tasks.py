"""Celery tasks of retro-hunt. Thin: one step of a job per message, then the next step's
message after the step's commit.

Hunts run in the screening worker, on its own queue (`retrohunt_queue`), one step at a
time per process: a step holds one task thread and, since its products and Faiss run on
the calling thread, about one core, for `retrohunt_step_s` at most, so screening keeps
the rest of the worker while a hunt runs. Steps of other jobs wait for the running one.
"""

from __future__ import annotations

import logging
import threading

from celery import Task
from sqlalchemy.exc import DBAPIError

from moderation.celery_app import RETROHUNT_STEP, app
from moderation.config import get_settings
from moderation.db import session_scope
from moderation.retrohunt import service

logger = logging.getLogger(__name__)

# One hunt step at a time per worker process, whatever its task threads.
_one_at_a_time = threading.Lock()
_targets = service.TargetCache()


@app.task(
    bind=True,
    name=RETROHUNT_STEP,
    # The database is unreachable: try the same step again; if this runs out too, the
    # sweeper sends the job again once it is overdue.
    autoretry_for=(DBAPIError,),
    retry_backoff=2,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=10,
)
def retrohunt_step(self: Task, job_id: int, step: int) -> None:
    settings = get_settings()
    with _one_at_a_time:
        try:
            with session_scope() as session:
                following = service.run_step(session, job_id, step, settings, _targets)
        except DBAPIError:
            _targets.forget(job_id)
            raise
        except Exception as error:
            logger.exception("retro-hunt job %d failed at step %d", job_id, step)
            _targets.forget(job_id)
            with session_scope() as session:
                service.record_failure(session, job_id, f"{type(error).__name__}: {error}")
            return
    if following is not None:
        publish_step(following)


def publish_step(step: service.NextStep) -> None:
    """Send a job's step; only after the transaction that made it due has committed."""
    app.send_task(
        RETROHUNT_STEP,
        args=(step.job_id, step.step),
        queue=get_settings().retrohunt_queue,
        countdown=step.countdown_s or None,
    )


def resend_overdue() -> list[service.NextStep]:
    """Send again the jobs whose message or worker was lost (see `service.find_overdue`);
    run by each worker's sweeper."""
    with session_scope() as session:
        overdue = service.find_overdue(
            session, stalled_after_s=get_settings().retrohunt_stalled_after_s
        )
    if overdue:
        logger.warning("re-sending %d overdue retro-hunt job(s): %s", len(overdue), overdue[:20])
    for step in overdue:
        publish_step(step)
    return overdue
