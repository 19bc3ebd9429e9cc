"""Dynamic batching: requests from many threads, one call per batch.

A worker screens each upload in its own task thread, but several of its steps are far
cheaper done for many uploads at once: a forward pass of the model, a search of the bank
index (one pass over the bank's memory for all the queries), a database transaction. A
`Batcher` lets each task thread hand in its own items and wait for its own results, while
`streams` threads take whatever has queued up, up to `max_batch` items, and make one call
for all of it. A stream waits at most `max_wait_s` for a partial batch to fill; with no
wait it takes only what is already there, so a lone request is never delayed and batches
grow by themselves under load.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Request(Generic[In, Out]):
    item: In
    future: Future[Out] = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0

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
        self._stats_lock = threading.Lock()
        self.stats = BatchStats()
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(streams)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, items: Sequence[In]) -> list[Out]:
        """Run some items (one caller's, such as the frames of one upload) and wait for
        their results; raises what the batch that ran them raised."""
        if not any(thread.is_alive() for thread in self._threads):
            raise RuntimeError(f"{self.name} has stopped")
        requests: list[_Request[In, Out]] = [_Request(item) for item in items]
        for request in requests:
            self._queue.put(request)
        return [request.future.result() for request in requests]

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
            try:
                results = self._run_batch([request.item for request in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(batch)} items in a batch, {len(results)} results")
            except BaseException as exc:
                logger.exception("%s: a batch of %d failed", self.name, len(batch))
                for request in batch:
                    request.future.set_exception(exc)
                continue
            with self._stats_lock:
                self.stats.batches += 1
                self.stats.items += len(batch)
            for request, result in zip(batch, results, strict=True):
                request.future.set_result(result)

    def _next_batch(self) -> list[_Request[In, Out]] | None:
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
