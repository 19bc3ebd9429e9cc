"""A memory budget for decoded pixels, shared by a worker's task threads.

A worker decodes as many images at once as it has task threads (dozens), and a frame is
decoded at full resolution: one 50-megapixel image passes every limit and peaks at about
half a gigabyte while it is hashed and preprocessed. Each decode reserves its estimated
peak before touching pixel data and waits, in arrival order, while the budget is spent, so
a burst of large images slows a worker down instead of running it out of memory.

Freed pixels are not given back to the system by themselves (see `memory.py`): a large
reservation hands back the allocator's free memory when it ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from moderation.images.memory import release_free_memory

# Peak bytes per pixel of one frame from decoding through hashing and preprocessing,
# measured on 24-megapixel frames: 4.6 for an RGB JPEG, 8.4 with EXIF rotation (a turned
# copy), 11 for a 16-bit PNG (scaled through float32). The worst case, with some room.
PEAK_BYTES_PER_PIXEL = 12
# A reservation at least this large (a frame of 20 megapixels and more) releases the
# allocator's free memory when it ends; malloc_trim takes milliseconds, against a second
# or more to decode and hash such a frame. None: never.
RELEASE_AFTER_BYTES = 256 * 2**20


class Budget(Protocol):
    def reserve(self, nbytes: int) -> AbstractContextManager[None]:
        """Hold `nbytes` of the budget while the block runs."""
        ...


class MemoryBudget:
    def __init__(self, total_bytes: int, release_after_bytes: int | None = RELEASE_AFTER_BYTES):
        if total_bytes <= 0:
            raise ValueError("a memory budget must be positive")
        self.total_bytes = total_bytes
        self.release_after_bytes = release_after_bytes
        self._used = 0
        self.most_used_bytes = 0  # the high-water mark, for tests and metrics
        self._next_ticket = 0
        self._serving = 0
        self._changed = threading.Condition()

    @property
    def used_bytes(self) -> int:
        return self._used

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold `nbytes` of the budget for the duration; waits until they are free, after
        every earlier request. A request larger than the whole budget waits until nothing
        else is held, then runs alone."""
        nbytes = min(nbytes, self.total_bytes)
        with self._changed:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._changed.wait_for(
                lambda: self._serving == ticket and self._used + nbytes <= self.total_bytes
            )
            self._serving += 1
            self._used += nbytes
            self.most_used_bytes = max(self.most_used_bytes, self._used)
            self._changed.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._changed:
                self._used -= nbytes
                self._changed.notify_all()
            if self.release_after_bytes is not None and nbytes >= self.release_after_bytes:
                release_free_memory()


class DecodeGate:
    """A memory budget with a cap on how many decodes run at once: what a process that
    decodes on request threads (the API) holds, where a worker's budget alone would let
    every thread of its pool start a decode."""

    def __init__(self, total_bytes: int, max_decodes: int) -> None:
        if max_decodes < 1:
            raise ValueError("at least one decode must be allowed")
        self.memory = MemoryBudget(total_bytes)
        self.max_decodes = max_decodes
        self._slots = threading.BoundedSemaphore(max_decodes)
        self._lock = threading.Lock()
        self.decoding = 0
        self.most_decoding = 0  # the high-water mark, for tests and metrics

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self._slots:
            with self._lock:
                self.decoding += 1
                self.most_decoding = max(self.most_decoding, self.decoding)
            try:
                with self.memory.reserve(nbytes):
                    yield
            finally:
                with self._lock:
                    self.decoding -= 1
