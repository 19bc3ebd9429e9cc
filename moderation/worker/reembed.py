"""A re-embedding step in the worker, on the screening pipeline itself: the same intake
pool (fetch under the URI policy, the recorded SHA-256 checked, decode, one crop for the
job's model) and the model's own batched forward passes (`lanes`), without the bank
search, matching and hit writing that screening adds.

Below live screening's priority: one step at a time per process (`tasks`), at most
`reembed_concurrency` items in intake and forward passes at once, and a rest after each
step in proportion to its work, so that the job computes at most its duty of the time
(`reembed_duty`, or the job's own). The job's side (blocks, checkpoints, failures) is in
`moderation.lifecycle.reembed`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from moderation.config import Settings
from moderation.db import session_scope
from moderation.images.errors import IntakeError
from moderation.lifecycle import reembed
from moderation.lifecycle.tasks import send_steps
from moderation.worker.lanes import ModelLane
from moderation.worker.pipeline import Screener

logger = logging.getLogger(__name__)

# How long a step whose model this worker does not compute yet waits before it is sent
# again (the registry follower picks a candidate up within `model_poll_s`).
_NOT_LOADED_RETRY_S = 2.0


def run_step(screener: Screener, settings: Settings, job_id: int, step: int) -> float | None:
    """Take a job's step, embed its block and record it, then send the next step. Returns
    seconds after which the same step is to be sent again (this worker does not compute
    the job's model yet), else None."""
    started = time.monotonic()
    with session_scope() as session:
        block = reembed.take(
            session,
            job_id,
            step,
            block_size=settings.reembed_block,
            settle_s=settings.reembed_settle_s,
        )
        lane = None if block is None else screener.lineup.lane(block.model_id)
        if block is not None and lane is None:
            session.rollback()  # the step is not taken: sent again, here or elsewhere
            return _NOT_LOADED_RETRY_S
    if block is None:
        return None
    assert lane is not None
    outcomes = embed_block(screener, lane, block.items, settings)
    with session_scope() as session:
        following = reembed.record(session, block, outcomes)
    worked = time.monotonic() - started
    logger.info(
        "re-embedding job %d step %d: %d item(s) under %s in %.2f s",
        job_id,
        step,
        len(block.items),
        lane.name,
        worked,
    )
    # The rest keeps re-embedding to at most its duty of this worker's time.
    duty = block.duty or settings.reembed_duty
    time.sleep(worked * (1 - duty) / duty)
    if following is not None:
        send_steps([following])
    return None


def embed_block(
    screener: Screener, lane: ModelLane, items: list[reembed.Item], settings: Settings
) -> list[reembed.Outcome]:
    """Each item through intake and the lane's forward passes, a few at a time."""
    if not items:
        return []
    workers = min(len(items), settings.resolved_reembed_concurrency())
    with ThreadPoolExecutor(workers, thread_name_prefix="reembed-item") as pool:
        return list(pool.map(lambda item: _embed(screener, lane, item, settings), items))


def _embed(
    screener: Screener, lane: ModelLane, item: reembed.Item, settings: Settings
) -> reembed.Outcome:
    try:
        with screener.intake.screened(item.uri, item.sha256, (lane.preprocess,)) as (signals, _):
            pending = lane.embedding.submit_async(signals.embedding_inputs(), this_stage_only=True)
            vectors = pending.result(settings.stage_timeout_s)
            frames = [frame.index for frame in signals.embedded_frames]
        return reembed.Outcome(item, list(zip(frames, vectors, strict=True)))
    except IntakeError as error:
        # Gone, refused, or not the bytes screened: recorded with its code, never fatal.
        return reembed.Outcome(item, reason=error.code, message=error.message)
    except Exception as error:
        logger.exception("re-embedding %s %d failed unexpectedly", item.kind, item.id)
        return reembed.Outcome(item, reason="internal_error", message=f"{type(error).__name__}")
