"""The worker's tasks, thin: hand the message's ids to the process's screener, or a
retro-hunt or re-embedding step to its thread (registered in `celery_app`). Each reaches
its process's state (`process.WorkerState`) through the Celery application it runs on."""

from __future__ import annotations

from celery import Task

from moderation.retrohunt import tasks as retrohunt
from moderation.worker import reembed
from moderation.worker.process import WorkerState


def screen_uploads(task: Task, upload_ids: list[int]) -> None:
    """Screen uploads; each transient fault is retried alone, in a message of its own
    after its backoff. The message is acknowledged (acks_late) once every upload in it is
    recorded or has its retry sent."""
    state = WorkerState.of(task.app)
    retries = state.screener().run_many(upload_ids)
    queue = (task.request.delivery_info or {}).get("routing_key")
    for upload_id, delay in retries.items():
        state.runtime.producer.send_screening_retry(upload_id, delay, queue)


def screen_upload(task: Task, upload_id: int) -> None:
    """One upload per message, as producers sent before `screen_uploads`."""
    screen_uploads(task, [upload_id])


def retrohunt_step(task: Task, job_id: int, step: int) -> None:
    state = WorkerState.of(task.app)
    state.hunter.submit(
        retrohunt.run_step, state.runtime, state.hunt_targets, job_id, step
    ).result()


def reembed_step(task: Task, job_id: int, step: int) -> None:
    state = WorkerState.of(task.app)
    retry_in = state.reembedder.submit(
        reembed.run_step, state.runtime, state.screener(), job_id, step
    ).result()
    if retry_in is not None:  # this worker does not compute the job's model yet
        state.runtime.producer.send_reembed_step(job_id, step, countdown_s=retry_in)
