"""Waiting for uploads to be screened, and saying why, when nothing moves.

`submit --wait` polls the uploads' statuses in PostgreSQL. When none has changed for a
while, the likely cause is found where it can be seen from outside a worker: whether any
worker consumes the queue (asked over the broker, as `celery inspect active_queues`
does), which workers keep a heartbeat (the `workers` table), how many messages wait on
the queue, and which uploads wait for a retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.runtime import Runtime
from moderation.screening.models import Upload, UploadStatus
from moderation.screening.service import live_workers

logger = logging.getLogger(__name__)

# Seconds a broadcast waits for workers to say which queues they consume.
INSPECT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Tally:
    """Where a set of uploads stands."""

    total: int
    queued: int = 0
    processing: int = 0
    screened: int = 0
    failed: int = 0
    # Queued again after a transient fault, waiting for their retry.
    retrying: int = 0

    @property
    def finished(self) -> int:
        return self.screened + self.failed

    def summary(self) -> str:
        return (
            f"{self.finished} of {self.total} finished: {self.screened} screened, "
            f"{self.failed} failed, {self.processing} processing, {self.queued} queued"
            + (f" ({self.retrying} retrying)" if self.retrying else "")
        )


def tally(session: Session, upload_ids: Sequence[int]) -> Tally:
    counts = dict.fromkeys(UploadStatus, 0)
    retrying = 0
    rows = session.execute(
        select(Upload.status, Upload.error_code.is_not(None), func.count())
        .where(Upload.id.in_(set(upload_ids)))
        .group_by(Upload.status, Upload.error_code.is_not(None))
    )
    for status, has_error, count in rows:
        counts[status] += count
        if status is UploadStatus.QUEUED and has_error:
            retrying += count
    return Tally(
        total=len(set(upload_ids)),
        queued=counts[UploadStatus.QUEUED],
        processing=counts[UploadStatus.PROCESSING],
        screened=counts[UploadStatus.SCREENED],
        failed=counts[UploadStatus.FAILED],
        retrying=retrying,
    )


def wait_for(
    runtime: Runtime,
    upload_ids: Sequence[int],
    *,
    timeout_s: float,
    on_progress: Callable[[Tally], None] = lambda _: None,
    on_stall: Callable[[str], None] = lambda _: None,
    stall_after_s: float = 30.0,
    poll_s: float = 0.2,
) -> Tally:
    """Poll until every upload is screened or failed, or `timeout_s` passes; the last tally.

    `on_progress` sees every change; `on_stall` the likely cause, each time nothing has
    changed for `stall_after_s` (and not again until something changes or the cause does).
    """
    start = time.monotonic()
    deadline = start + timeout_s
    last: Tally | None = None
    moved_at = start
    told: str | None = None
    while True:
        with runtime.session() as session:
            now_tally = tally(session, upload_ids)
        now = time.monotonic()
        if now_tally != last:
            last, moved_at, told = now_tally, now, None
            on_progress(now_tally)
        if now_tally.finished == now_tally.total or now >= deadline:
            return now_tally
        if now - moved_at >= stall_after_s:
            cause = why_stalled(runtime, now_tally)
            if cause != told:
                on_stall(cause)
                told = cause
            moved_at = now  # look again after another quiet spell
        time.sleep(min(poll_s, max(0.0, deadline - now)))


def why_stalled(runtime: Runtime, stalled: Tally) -> str:
    """The likely reason these uploads have not moved, in one sentence with what to do."""
    settings = runtime.settings
    queue = settings.queue
    consumers = consumers_of(runtime, queue)
    with runtime.session() as session:
        alive = live_workers(session, settings.worker_dead_after_s)
    if consumers is not None and not consumers:
        cause = f"no worker is consuming queue {queue}: start one with `moderation worker`"
        if alive:
            cause += (
                f" ({alive} worker(s) keep a heartbeat: still loading their model, or "
                "consuming another queue; MODERATION_QUEUE must be the same for both)"
            )
        return cause
    waiting = queue_length(runtime, queue)
    if stalled.retrying and stalled.retrying == stalled.queued and not stalled.processing:
        return (
            f"{stalled.retrying} upload(s) wait to retry after a transient fault "
            "(see `moderation uploads --status queued`)"
        )
    if stalled.queued and waiting == 0 and not stalled.processing:
        return (
            f"{stalled.queued} upload(s) are queued but queue {queue} has no message for "
            "them (lost with a Redis restart, or never sent): a worker's sweeper re-sends "
            f"them after MODERATION_STUCK_AFTER_S ({settings.stuck_after_s:g} s), or run "
            "`moderation sweep`"
        )
    workers = f"{len(consumers)} worker(s)" if consumers else "workers"
    return (
        f"{workers} consume queue {queue}, with {waiting} message(s) waiting: busy or slow; "
        "see the workers' logs and `moderation uploads --status processing`"
    )


def consumers_of(runtime: Runtime, queue: str) -> list[str] | None:
    """The workers that consume `queue`, by node name; None if the broker cannot be asked."""
    try:
        replies = (
            runtime.producer.app.control.inspect(timeout=INSPECT_TIMEOUT_S).active_queues() or {}
        )
    except Exception as error:
        logger.info("could not ask the workers which queues they consume: %s", error)
        return None
    return sorted(
        node for node, queues in replies.items() if any(q["name"] == queue for q in queues)
    )


def queue_length(runtime: Runtime, queue: str) -> int:
    """Messages waiting on `queue`: Celery on Redis keeps each queue as a list."""
    with runtime.producer.app.connection_for_read() as connection:
        return int(connection.default_channel.client.llen(queue))
