"""The worker's tasks, thin: hand the message's ids to the process's screener, or a
retro-hunt step to the hunting thread (registered in `celery_app`)."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from celery import Task

from moderation.config import get_settings
from moderation.messages import send_reembed_step, send_screening_retry
from moderation.retrohunt import tasks as retrohunt
from moderation.worker import reembed
from moderation.worker.process import get_screener

logger = logging.getLogger(__name__)


def screen_uploads(task: Task, upload_ids: list[int]) -> None:
    """Screen uploads; each transient fault is retried alone, in a message of its own
    after its backoff. The message is acknowledged (acks_late) once every upload in it is
    recorded or has its retry sent."""
    retries = get_screener().run_many(upload_ids)
    queue = (task.request.delivery_info or {}).get("routing_key")
    for upload_id, delay in retries.items():
        send_screening_retry(upload_id, delay, queue)


def screen_upload(task: Task, upload_id: int) -> None:
    """One upload per message, as producers sent before `screen_uploads`."""
    screen_uploads(task, [upload_id])


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


# One hunt step at a time per worker process, on this thread, whatever the task threads:
# the task thread that took the message waits for it without using the CPU (see
# `moderation.retrohunt.tasks` for what a step costs screening).
_hunter = ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="retrohunt", initializer=_lower_priority
)


def retrohunt_step(task: Task, job_id: int, step: int) -> None:
    _hunter.submit(retrohunt.run_step, job_id, step).result()


# One re-embedding step at a time per worker process, on this thread. Not niced, unlike
# the hunt's (whose work is Faiss, outside the GIL): its threads mostly hand items on under
# the GIL, and a niced thread descheduled while holding it stalls the whole worker (a
# first try took 88 s for 64 images on a loaded machine). Its duty keeps it below live
# screening (see `moderation.worker.reembed`).
_reembedder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reembed")


def reembed_step(task: Task, job_id: int, step: int) -> None:
    retry_in = _reembedder.submit(
        reembed.run_step, get_screener(), get_settings(), job_id, step
    ).result()
    if retry_in is not None:  # this worker does not compute the job's model yet
        send_reembed_step(job_id, step, countdown_s=retry_in)
