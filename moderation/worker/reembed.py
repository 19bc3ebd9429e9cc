"""A re-embedding step in the worker, on the screening pipeline itself: the same fetch
(http(s) on this process's threads under its fetch slots), the same intake pool (the URI
policy, the recorded SHA-256 checked, decode, one crop for the job's model) and the
model's own batched forward passes (`lanes`), without the bank search, matching and hit
writing that screening adds.

Below live screening's priority: one step at a time per process (`tasks`), at most
`reembed_concurrency` items in fetch, intake and forward passes at once, and a rest after
each step in proportion to its work, so that the job computes at most its duty of the
time (`reembed_duty`, or the job's own). The job's side (blocks, checkpoints, failures) is
in `moderation.lifecycle.reembed`.

At full duty there is no rest, and a message runs steps back to back for up to `RUN_S`,
each block taken while the blocks before it are still in intake and forward passes
(`reembed.take_ahead`) and recorded in order. One block a message left the forward passes
waiting at every block's end and start: 15% of the model's time on two cores with ViT-B/32
(py-spy, bench/reembed.py), where screening kept it 98% busy.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from moderation.config import Settings
from moderation.images.errors import IntakeError
from moderation.lifecycle import reembed
from moderation.lifecycle.tasks import send_steps
from moderation.runtime import Runtime
from moderation.worker.lanes import ModelLane
from moderation.worker.pipeline import Screener

logger = logging.getLogger(__name__)

# How long a step whose model this worker does not compute yet waits before it is sent
# again (the registry follower picks a candidate up within `model_poll_s`).
_NOT_LOADED_RETRY_S = 2.0

# The submitter re-embedding's fetches count as: a job holds at most
# `worker_fetches_per_submitter` of the worker's fetch slots, leaving the rest to live
# screening.
FETCHES_AS = "re-embedding"

# At full duty, how long one message keeps taking blocks ahead before it lets its last
# ones finish and sends the next step: long enough that the pipeline empties rarely (once
# in about 30 s of work), short enough that a warm shutdown, which waits for the running
# task, is not held up for long.
RUN_S = 30.0


def run_step(runtime: Runtime, screener: Screener, job_id: int, step: int) -> float | None:
    """Take a job's step, embed its block and record it (at full duty, with the blocks
    taken ahead of it), then send the next step. Returns seconds after which the same step
    is to be sent again (this worker does not compute the job's model yet), else None."""
    settings = runtime.settings
    started = time.monotonic()
    with runtime.session() as session:
        taken = reembed.take(
            session,
            job_id,
            step,
            block_size=settings.reembed_block,
            settle_s=settings.reembed_settle_s,
        )
        lane = screener.lineup.lane(taken.model_id) if isinstance(taken, reembed.Block) else None
        if isinstance(taken, reembed.Block) and lane is None:
            session.rollback()  # the step is not taken: sent again, here or elsewhere
            return _NOT_LOADED_RETRY_S
    if isinstance(taken, reembed.Settling):
        # Sent for the end of the settle time rather than left for the sweeper's next
        # round, which may come `sweep_interval_s` later.
        send_steps(runtime, [taken.step], countdown_s=taken.after_s)
        return None
    if taken is None:
        return None
    assert lane is not None
    duty = taken.duty or settings.reembed_duty
    with BlockEmbedder(screener, lane, settings) as embedder:
        following = _embed_and_record(runtime, embedder, taken, ahead=duty >= 1)
    # The rest keeps re-embedding to at most its duty of this worker's time.
    time.sleep((time.monotonic() - started) * (1 - duty) / duty)
    if following is not None:
        send_steps(runtime, [following])
    return None


def _embed_and_record(
    runtime: Runtime, embedder: BlockEmbedder, first: reembed.Block, *, ahead: bool
) -> reembed.NextStep | None:
    """Embed and record `first` and, if `ahead`, the blocks taken after it for up to
    `RUN_S`; the step to send next, or None if the job finished meanwhile."""
    settings = runtime.settings
    started = time.monotonic()
    # Blocks in flight, enough that the threads have the next block's items queued
    # while the oldest block's last items finish: its own and a concurrency's worth.
    depth = 1 + math.ceil(embedder.concurrency / settings.reembed_block) if ahead else 1
    in_flight = deque([embedder.submit(first)])
    taking = ahead
    following: reembed.NextStep | None = None
    while in_flight:
        while taking and len(in_flight) < depth:
            with runtime.session() as session:
                block = reembed.take_ahead(
                    session, in_flight[-1].block, block_size=settings.reembed_block
                )
            taking = block is not None and time.monotonic() - started < RUN_S
            if block is not None:
                in_flight.append(embedder.submit(block))
        oldest = in_flight.popleft()
        outcomes = oldest.outcomes()
        with runtime.session() as session:
            following = reembed.record(session, oldest.block, outcomes)
        logger.info(
            "re-embedding job %d step %d: %d item(s) under %s in %.2f s",
            oldest.block.job_id,
            oldest.block.step,
            len(oldest.block.items),
            embedder.lane.name,
            time.monotonic() - oldest.submitted,
        )
        if following is None:  # the job finished (its model retired): drop the rest
            for rest in in_flight:
                rest.cancel()
            return None
    return following


class InFlight:
    """A block's items handed to the embedder, their outcomes to come."""

    def __init__(self, block: reembed.Block, futures: list[Future[reembed.Outcome]]) -> None:
        self.block = block
        self.submitted = time.monotonic()
        self._futures = futures

    def outcomes(self) -> list[reembed.Outcome]:
        # Each item's errors are its outcome (`_embed`): a future raises only if cancelled.
        return [future.result() for future in self._futures]

    def cancel(self) -> None:
        for future in self._futures:
            future.cancel()


class BlockEmbedder:
    """Blocks' items through fetch, intake and the lane's forward passes, at most
    `reembed_concurrency` at once, in the order handed in."""

    def __init__(self, screener: Screener, lane: ModelLane, settings: Settings) -> None:
        self.screener = screener
        self.lane = lane
        self.settings = settings
        self.concurrency = settings.resolved_reembed_concurrency()
        self._threads = ThreadPoolExecutor(self.concurrency, thread_name_prefix="reembed-item")

    def __enter__(self) -> BlockEmbedder:
        return self

    def __exit__(self, *_: object) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)

    def submit(self, block: reembed.Block) -> InFlight:
        return InFlight(block, [self._threads.submit(self._embed, item) for item in block.items])

    def _embed(self, item: reembed.Item) -> reembed.Outcome:
        screener, lane = self.screener, self.lane
        try:
            # As screening fetches: before an intake process is held (`intake/fetches.py`).
            with (
                screener.fetches.fetched(item.uri, FETCHES_AS) as fetched,
                screener.intake.screened(item.uri, item.sha256, (lane.preprocess,), fetched) as (
                    signals,
                    _,
                ),
            ):
                pending = lane.embedding.submit_async(
                    signals.embedding_inputs(), this_stage_only=True
                )
                vectors = pending.result(self.settings.stage_timeout_s)
                frames = [frame.index for frame in signals.embedded_frames]
            return reembed.Outcome(item, list(zip(frames, vectors, strict=True)))
        except IntakeError as error:
            # Gone, refused, or not the bytes screened: recorded with its code, never fatal.
            return reembed.Outcome(item, reason=error.code, message=error.message)
        except Exception as error:
            logger.exception("re-embedding %s %d failed unexpectedly", item.kind, item.id)
            return reembed.Outcome(item, reason="internal_error", message=f"{type(error).__name__}")
