"""Retro-hunt's work outside a request: one step of a job per message, and the chores
that start jobs and send those that are due. Plain functions on the runtime their caller
passes; the worker runs a step on a thread of its own (`moderation.worker.process`).

Hunts run in the screening worker, from their own queue (`retrohunt_queue`), one step at
a time per process, on one thread at a lower CPU priority (nice +10 over the worker's),
while the task thread that took the message waits for it without using the CPU. Faiss
runs on that thread; the CLIP products run on the CPU with the worker's torch threads
(one per inference stream on a CPU worker), never on the GPU the model uses. A step
lasts about `retrohunt_step_s` and is followed by a rest, so that the hunt computes at
most `retrohunt_duty` of the time. Steps of other jobs wait for the running one, each
holding a task thread while it waits. What a hunt costs screening is measured by
`bench/retrohunt.py` (bench/README.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from sqlalchemy.exc import DBAPIError

from moderation.chores import Chore
from moderation.retrohunt import service
from moderation.runtime import Runtime

logger = logging.getLogger(__name__)


def run_step(runtime: Runtime, targets: service.TargetCache, job_id: int, step: int) -> None:
    """Run a job's step, rest in proportion, then send the next step (its transaction has
    committed). `targets`: the entries of the job this process hunted last, kept between
    its steps by the caller (the worker process). The rest keeps the hunt to at most
    `retrohunt_duty` of the time, in this worker or another: niced, it still takes cores'
    caches and, on two vCPUs that share a physical core, the core itself (see
    bench/README.md). A database fault is raised, for the message to be tried again; any
    other failure fails the job."""
    settings = runtime.settings
    started = time.monotonic()
    try:
        with runtime.session() as session:
            following = service.run_step(session, job_id, step, settings, targets)
    except DBAPIError:
        targets.forget(job_id)
        raise
    except Exception as error:
        logger.exception("retro-hunt job %d failed at step %d", job_id, step)
        targets.forget(job_id)
        with runtime.session() as session:
            service.record_failure(session, job_id, f"{type(error).__name__}: {error}")
        return
    worked = time.monotonic() - started
    time.sleep(worked * (1 - settings.retrohunt_duty) / settings.retrohunt_duty)
    if following is not None:
        runtime.producer.send_retrohunt_step(following.job_id, following.step)


def send_steps(runtime: Runtime, steps: Sequence[service.NextStep]) -> None:
    """Send steps whose transaction has committed, with the runtime's producer. A step
    that cannot be sent is left to the sweeper, which sends a job once its next step is
    overdue."""
    for step in steps:
        try:
            runtime.producer.send_retrohunt_step(step.job_id, step.step)
        except Exception as error:
            logger.warning(
                "could not send retro-hunt job %d (the sweeper will): %s", step.job_id, error
            )


def start_hunts(runtime: Runtime, *, settle_wait_s: float = 1.0) -> list[service.NextStep] | None:
    """Jobs for the entries added since the last start (`service.start_from_changes`),
    their first steps sent; None if the log could not be read now (the next sweep tries
    again)."""
    with runtime.session() as session:
        started = service.start_from_changes(session, settle_wait_s=settle_wait_s)
    if started:
        send_steps(runtime, started)
    return started


def send_due(runtime: Runtime) -> list[service.NextStep]:
    """Send the jobs whose wait is over, and again those whose message or worker was lost
    (see `service.find_due`)."""
    with runtime.session() as session:
        due = service.find_due(session, stalled_after_s=runtime.settings.retrohunt_stalled_after_s)
    if due:
        logger.info("sending %d due retro-hunt job(s): %s", len(due), due[:20])
    send_steps(runtime, due)
    return due


def _start_chore(runtime: Runtime, *, complete: bool) -> Mapping[str, object]:
    return {"retrohunt_jobs_started": [step.job_id for step in start_hunts(runtime) or []]}


def _due_chore(runtime: Runtime, *, complete: bool) -> Mapping[str, object]:
    return {"retrohunt_jobs_sent": [step.job_id for step in send_due(runtime)]}


CHORES = (
    Chore("starting retro-hunts for new bank entries", _start_chore),
    Chore("sending retro-hunt jobs that are due", _due_chore),
)
