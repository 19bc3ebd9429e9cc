"""A budget of bytes for fetched bodies that a process holds at once.

A worker fetches up to `worker_fetches` bodies at once, each up to `max_bytes`, and keeps
each until its upload is screened; behind the fetches, more fetched bodies wait for an
intake process. Counted by slots alone, that is (fetches + waiting) x 50 MiB: gigabytes
that a burst of large files could really take. So a fetch reserves its body's bytes as
they arrive (all of a declared `Content-Length` at once, before reading), and waits, within
its own deadline, while the budget is spent: a burst of large bodies slows fetching down
instead of running the worker out of memory.

A reservation grows only while it is being fetched and is handed back whole when its
upload is done with the bytes, so a wait always ends: either another fetch finishes (and
its upload, which needs no more bytes, is screened and releases them), or the waiting
fetch's deadline passes and it gives up what it held. A body larger than the whole budget
is let through when it is the only one held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class BodyBudget:
    def __init__(self, total_bytes: int) -> None:
        if total_bytes <= 0:
            raise ValueError("a body budget must be positive")
        self.total_bytes = total_bytes
        self._used = 0
        self.most_used_bytes = 0  # the high-water mark, for tests and metrics
        self._changed = threading.Condition()

    @property
    def used_bytes(self) -> int:
        with self._changed:
            return self._used

    def reservation(self, refused: Callable[[int, float], Exception]) -> BodyReservation:
        """A reservation, empty until it grows; `refused(nbytes, waited_s)` is what it
        raises when the bytes did not free in time."""
        return BodyReservation(self, refused)

    def _grow(self, reservation: BodyReservation, nbytes: int, wait_s: float) -> None:
        extra = nbytes - reservation.nbytes
        if extra <= 0:
            return
        started = time.monotonic()
        deadline = started + wait_s
        with self._changed:
            # Alone, a body larger than the budget still goes through.
            while self._used + extra > self.total_bytes and self._used > reservation.nbytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise reservation.refused(nbytes, time.monotonic() - started)
                self._changed.wait(left)
            self._used += extra
            reservation.nbytes = nbytes
            self.most_used_bytes = max(self.most_used_bytes, self._used)

    def _release(self, reservation: BodyReservation) -> None:
        with self._changed:
            self._used -= reservation.nbytes
            reservation.nbytes = 0
            self._changed.notify_all()


class BodyReservation:
    """The bytes of one body, held from its first byte until `release` (a context manager
    too)."""

    def __init__(self, budget: BodyBudget, refused: Callable[[int, float], Exception]) -> None:
        self.budget = budget
        self.refused = refused
        self.nbytes = 0

    def grow_to(self, nbytes: int, wait_s: float) -> None:
        """Hold `nbytes` in all, waiting at most `wait_s` for the difference."""
        self.budget._grow(self, nbytes, wait_s)

    def release(self) -> None:
        self.budget._release(self)

    def __enter__(self) -> BodyReservation:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
