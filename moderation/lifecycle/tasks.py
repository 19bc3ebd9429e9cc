"""Re-embedding's work outside a request: sending steps, and the chore that sends the
jobs that are due (their settle time over, or their message or worker lost). A step itself
runs in the worker, on its screening pipeline (`moderation.worker.reembed`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from moderation.chores import Chore
from moderation.lifecycle import reembed
from moderation.runtime import Runtime

logger = logging.getLogger(__name__)


def send_steps(
    runtime: Runtime, steps: Sequence[reembed.NextStep], *, countdown_s: float | None = None
) -> None:
    """Send steps whose transaction has committed (to run `countdown_s` from now, if
    given), with the runtime's producer. A step that cannot be sent is left to the
    sweeper, which sends a job once its next step is overdue."""
    for step in steps:
        try:
            runtime.producer.send_reembed_step(step.job_id, step.step, countdown_s=countdown_s)
        except Exception as error:
            logger.warning(
                "could not send re-embedding job %d (the sweeper will): %s", step.job_id, error
            )


def send_due(runtime: Runtime) -> list[reembed.NextStep]:
    with runtime.session() as session:
        due = reembed.find_due(session, stalled_after_s=runtime.settings.reembed_stalled_after_s)
    if due:
        logger.info("sending %d due re-embedding job(s): %s", len(due), due[:20])
    send_steps(runtime, due)
    return due


def _due_chore(runtime: Runtime, *, complete: bool) -> Mapping[str, object]:
    return {"reembed_jobs_sent": [step.job_id for step in send_due(runtime)]}


CHORES = (Chore("sending re-embedding jobs that are due", _due_chore),)
