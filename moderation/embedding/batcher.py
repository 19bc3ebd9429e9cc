"""Dynamic batching: many concurrent tasks, one forward pass.

Each Celery task (one per upload, in a thread of the worker) decodes its own image and hands
the preprocessed pixels to the batcher. Each of `streams` model threads takes whatever has
queued up, up to `max_batch`, waiting at most `max_wait_s` for a partial batch to fill, and
runs it. While they run, the task threads fetch and decode the next images, so decoding
overlaps inference without any stage having to know about the others.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)


class Embeds(Protocol):
    def embed(self, pixels: np.ndarray) -> np.ndarray: ...


@dataclass
class _Request:
    pixels: np.ndarray
    future: Future[np.ndarray] = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0

    @property
    def mean_batch(self) -> float:
        return self.images / self.batches if self.batches else 0.0


class EmbeddingBatcher:
    def __init__(
        self, embedder: Embeds, *, max_batch: int, max_wait_s: float, streams: int = 1
    ) -> None:
        self._embedder = embedder
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._stats_lock = threading.Lock()
        self.stats = BatchStats()
        self._threads = [
            threading.Thread(target=self._run, name=f"embedding-stream-{i}", daemon=True)
            for i in range(streams)
        ]
        for thread in self._threads:
            thread.start()

    def embed(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Embed some images (the frames of one upload) and wait for the result."""
        if not any(thread.is_alive() for thread in self._threads):
            raise RuntimeError("the embedding batcher has stopped")
        requests = [_Request(p) for p in pixels]
        for request in requests:
            self._queue.put(request)
        return np.stack([request.future.result() for request in requests])

    def close(self) -> None:
        self._queue.put(None)  # each stream passes it on to the next as it stops
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                vectors = self._embedder.embed(np.stack([r.pixels for r in batch]))
            except BaseException as exc:
                logger.exception("embedding a batch of %d failed", len(batch))
                for request in batch:
                    request.future.set_exception(exc)
            else:
                with self._stats_lock:
                    self.stats.batches += 1
                    self.stats.images += len(batch)
                for request, vector in zip(batch, vectors, strict=True):
                    request.future.set_result(vector)

    def _next_batch(self) -> list[_Request] | None:
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
                    else (self._queue.get_nowait())
                )
            except queue.Empty:
                break
            if request is None:  # closing: finish this batch, then stop
                self._queue.put(None)
                break
            batch.append(request)
        return batch
