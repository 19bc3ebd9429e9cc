"""Celery tasks of retro-hunt. Thin: one step of a job per message, then the next step's
message after the step's commit.

Hunts run in the screening worker, from their own queue (`retrohunt_queue`), one step at
a time per process, on one thread of their own at a lower CPU priority (nice +10 over
the worker's), while the task thread that took the message waits for it without using
the CPU. Faiss runs on that thread; the CLIP products run on the CPU with the worker's
torch threads (one per inference stream on a CPU worker), never on the GPU the model
uses. A step lasts about `retrohunt_step_s` and is followed by a rest, so that the hunt
computes at most `retrohunt_duty` of the time. Steps of other jobs wait for the running
one, each holding a task thread while it waits. What a hunt costs screening is measured
by `bench/retrohunt.py` (README, Performance).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from celery import Task
from sqlalchemy.exc import DBAPIError

from moderation.celery_app import RETROHUNT_STEP, app
from moderation.config import get_settings
from moderation.db import session_scope
from moderation.retrohunt import service

logger = logging.getLogger(__name__)

# How much lower than screening's the hunting thread's CPU priority is (Linux nice).
_NICENESS = 10


def _lower_priority() -> None:
    """On Linux a thread is scheduled as a task of its own: nice this one only, once (a
    thread may lower its own priority but not raise it again)."""
    try:
        thread = threading.get_native_id()
        # setpriority sets a nice value, not an increment: add to the worker's own.
        niceness = min(19, os.getpriority(os.PRIO_PROCESS, thread) + _NICENESS)
        os.setpriority(os.PRIO_PROCESS, thread, niceness)
    except (AttributeError, OSError) as error:  # not Linux, or not allowed
        logger.info("retro-hunt runs at the worker's priority: %s", error)


# One hunt step at a time per worker process, on this thread, whatever the task threads.
_hunter = ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="retrohunt", initializer=_lower_priority
)
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
    following = _hunter.submit(_run_step, job_id, step).result()
    if following is not None:
        publish_step(following)


def _run_step(job_id: int, step: int) -> service.NextStep | None:
    settings = get_settings()
    started = time.monotonic()
    try:
        with session_scope() as session:
            following = service.run_step(session, job_id, step, settings, _targets)
        # Rest in proportion, so the hunt computes at most `retrohunt_duty` of the time:
        # niced, it still takes cores' caches and, on two vCPUs that share a physical
        # core, the core itself (see the README, Performance).
        worked = time.monotonic() - started
        time.sleep(worked * (1 - settings.retrohunt_duty) / settings.retrohunt_duty)
        return following
    except DBAPIError:
        _targets.forget(job_id)
        raise
    except Exception as error:
        logger.exception("retro-hunt job %d failed at step %d", job_id, step)
        _targets.forget(job_id)
        with session_scope() as session:
            service.record_failure(session, job_id, f"{type(error).__name__}: {error}")
        return None


def publish_step(step: service.NextStep) -> None:
    """Send a job's step; only after the transaction that made it due has committed."""
    app.send_task(
        RETROHUNT_STEP,
        args=(step.job_id, step.step),
        queue=get_settings().resolved_retrohunt_queue(),
    )


def send_due() -> list[service.NextStep]:
    """Send the jobs whose wait is over, and again those whose message or worker was lost
    (see `service.find_due`); run by each worker's sweeper."""
    with session_scope() as session:
        due = service.find_due(session, stalled_after_s=get_settings().retrohunt_stalled_after_s)
    if due:
        logger.info("sending %d due retro-hunt job(s): %s", len(due), due[:20])
    for step in due:
        publish_step(step)
    return due
