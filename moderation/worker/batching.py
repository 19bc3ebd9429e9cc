"""Dynamic batching: requests from many threads, one call per batch.

A worker screens each upload in its own task thread, but several of its steps are far
cheaper done for many uploads at once: a forward pass of the model, a search of the bank
index (one pass over the bank's memory for all the queries), a database transaction. A
`Batcher` lets each task thread hand in its own items and wait for its own results, while
`streams` threads take whatever has queued up, up to `max_batch` items, and make one call
for all of it. A stream waits at most `max_wait_s` for a partial batch to fill; with no
wait it takes only what is already there, so a lone request is never delayed and batches
grow by themselves under load.

A stage can hand its results on to the next (`hand_on_to`): each caller's request moves on
with its future, so a caller waiting for two stages in a row (a forward pass, then the
bank search of its vectors) is woken once, when the last is done, not once per stage.
Each wake of a waiting thread costs the worker's interpreter a hand-off of the GIL; on two
cores with the tiny model the screening threads' waits and wakes were half of their
samples (py-spy).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Request(Generic[In, Out]):
    item: In
    future: Future[Out] = field(default_factory=Future)
    # False: the result is this stage's own, never handed on (see `submit_async`).
    hand_on: bool = True


class BatchTimeout(TimeoutError):
    """A caller waited longer than it allowed for its batch's results."""


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    # Seconds spent inside `run`, and from the first batch's start to the last one's end:
    # their ratio is how busy the stage (the model, for the embedding batcher) was.
    busy_s: float = 0.0
    first_started: float | None = None
    last_finished: float | None = None

    @property
    def utilisation(self) -> float:
        if self.first_started is None or self.last_finished is None:
            return 0.0
        span = self.last_finished - self.first_started
        return self.busy_s / span if span > 0 else 1.0

    @property
    def mean_batch(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class Batcher(Generic[In, Out]):
    def __init__(
        self,
        run: Callable[[list[In]], Sequence[Out]],
        *,
        name: str,
        max_batch: int,
        max_wait_s: float = 0.0,
        streams: int = 1,
    ) -> None:
        """`run` takes a batch of items and returns one result per item, in order."""
        self.name = name
        self._run_batch = run
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        # queue.Queue, not SimpleQueue: with several streams, SimpleQueue.get(timeout=...)
        # can block past its timeout (until the next put) when another stream takes the
        # item it woke for. Seen here as a batch stuck in a stream until new work arrived.
        self._queue: queue.Queue[_Request[In, Out] | None] = queue.Queue()
        # One stream gathers a batch at a time. Two gathering at once would share out the
        # requests arriving meanwhile, and run two batches of half the size: each call has
        # a cost of its own (measured: a tiny model's forward pass costs 0.85 ms per call
        # and 0.06 per image on CPU).
        self._gathering = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats = BatchStats()
        # Where each result goes next instead of to its caller (see `hand_on_to`).
        self._next: Batcher[Out, Any] | None = None
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(streams)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, items: Sequence[In], timeout_s: float | None = None) -> list[Out]:
        """Run some items (one caller's, such as the frames of one upload) and wait for
        their results; raises what the batch that ran them raised, or `BatchTimeout` if
        they are not all back within `timeout_s` (None: wait for ever)."""
        return self.submit_async(items).result(timeout_s)

    def submit_async(self, items: Sequence[In], *, this_stage_only: bool = False) -> Pending[Out]:
        """Hand in some items and return at once: the caller may hand items to other
        stages (another model's forward pass) before it waits for all of them.
        `this_stage_only`: this stage's results, even where it hands its results on (a
        re-embedding wants the vectors, not their bank search)."""
        if not any(thread.is_alive() for thread in self._threads):
            raise RuntimeError(f"{self.name} has stopped")
        requests: list[_Request[In, Out]] = [
            _Request(item, hand_on=not this_stage_only) for item in items
        ]
        for request in requests:
            self._queue.put(request)
        return Pending(self, [request.future for request in requests])

    def hand_on_to(self, next_stage: Batcher[Out, Any]) -> None:
        """From now on, give each result to `next_stage` as an item, with its caller's
        request: the caller's `submit` returns what `next_stage` made of it (see `Chain`).
        Close this stage before `next_stage`, so that what it hands on is run."""
        self._next = next_stage

    @property
    def waiting(self) -> int:
        """Items handed in that no stream has taken up yet."""
        return self._queue.qsize()

    def close(self) -> None:
        """Run everything already handed in, then stop."""
        self._queue.put(None)  # each stream passes it on to the next as it stops
        for thread in self._threads:
            thread.join()

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            try:
                results = self._run_batch([request.item for request in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(batch)} items in a batch, {len(results)} results")
            except BaseException as exc:
                logger.exception("%s: a batch of %d failed", self.name, len(batch))
                for request in batch:
                    request.future.set_exception(exc)
                continue
            finished = time.perf_counter()
            with self._stats_lock:
                self.stats.batches += 1
                self.stats.items += len(batch)
                self.stats.busy_s += finished - started
                if self.stats.first_started is None:
                    self.stats.first_started = started
                self.stats.last_finished = finished
            for request, result in zip(batch, results, strict=True):
                if self._next is not None and request.hand_on:
                    self._next._queue.put(_Request(result, request.future))
                else:
                    request.future.set_result(result)

    def _next_batch(self) -> list[_Request[In, Out]] | None:
        with self._gathering:
            return self._gather()

    def _gather(self) -> list[_Request[In, Out]] | None:
        first = self._queue.get()
        if first is None:
            self._queue.put(None)  # for the other streams
            return None
        batch = [first]
        deadline = time.monotonic() + self._max_wait_s
        while len(batch) < self._max_batch:
            remaining = deadline - time.monotonic()
            try:
                request = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if request is None:  # closing: finish this batch, then stop
                self._queue.put(None)
                break
            batch.append(request)
        return batch


class Pending(Generic[Out]):
    """Items handed to a stage, their results to come."""

    def __init__(self, stage: Batcher[Any, Any], futures: list[Future[Out]]) -> None:
        self._stage = stage
        self._futures = futures

    def result(self, timeout_s: float | None = None) -> list[Out]:
        """The results, in order; raises what the batch that ran them raised, or
        `BatchTimeout` if they are not all back within `timeout_s` (None: for ever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results = []
        for future in self._futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                results.append(future.result(timeout=remaining))
            except FutureTimeout:
                raise BatchTimeout(
                    f"{self._stage.name}: no result within {timeout_s:g} s "
                    f"({self._stage.waiting} items waiting)"
                ) from None
        return results


Mid = TypeVar("Mid")


class Chain(Generic[In, Mid, Out]):
    """Two batched stages run one after the other for each item, the caller waiting once
    (see `Batcher.hand_on_to`); the second stage may also take items of its own."""

    def __init__(self, first: Batcher[In, Mid], second: Batcher[Mid, Out]) -> None:
        first.hand_on_to(second)
        self.first = first
        self.second = second

    def submit(self, items: Sequence[In], timeout_s: float | None = None) -> list[Out]:
        """Each item through both stages; raises what either stage raised on it, or
        `BatchTimeout` if the results are not all back within `timeout_s`."""
        return self.submit_async(items).result(timeout_s)

    def submit_async(self, items: Sequence[In]) -> Pending[Out]:
        pending: Pending[Any] = self.first.submit_async(items)  # the second's, handed on
        return pending
