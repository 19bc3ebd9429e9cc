"""Group commit: the same kind of write from many threads, many per transaction.

A worker screens dozens of uploads at once, each in its own task thread, and each upload
changes its row twice (claimed, then screened). As one transaction apiece that is two
commits and a handful of statements per upload, which on a small worker costs as much CPU
as decoding the image, and on a GPU worker holds the GIL long enough to starve the model.

A `GroupCommit` has one writer thread. A caller hands it an item and blocks until the
transaction that wrote it has committed, so a task still acknowledges its message only
after its effects are durable. The writer takes whatever has queued up while the previous
transaction ran and writes it all with one call of `write_many`: under load a transaction
carries many items, and a lone item is written at once, with no added wait.

If a group fails, each of its items is retried in a transaction of its own, so that one
item's error (a missing row, a deadlock with a duplicate delivery elsewhere) is reported to
that item's caller alone, and the others still commit.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Request(Generic[Item, Result]):
    item: Item
    future: Future[Result] = field(default_factory=Future)


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        sessions: Callable[[], AbstractContextManager[Session]],
        write_many: Callable[[Session, Sequence[Item]], Sequence[Result]],
        *,
        name: str,
        max_group: int = 64,
    ) -> None:
        """`write_many` writes a group of items in the session it is given and returns one
        result per item, in order; it must not commit (the group commit does)."""
        self._sessions = sessions
        self._write_many = write_many
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Request[Item, Result] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __call__(self, item: Item) -> Result:
        """Write one item, waiting until it is committed; raises what writing it raised."""
        if not self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} has stopped")
        request: _Request[Item, Result] = _Request(item)
        self._queue.put(request)
        return request.future.result()

    @property
    def waiting(self) -> int:
        """Items handed in that the writer has not yet taken up."""
        return self._queue.qsize()

    def close(self) -> None:
        """Write everything already handed in, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            self._write(group)

    def _next_group(self) -> list[_Request[Item, Result]] | None:
        first = self._queue.get()
        if first is None:
            return None
        group = [first]
        while len(group) < self._max_group:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is None:  # closing: write this group, then stop
                self._queue.put(None)
                break
            group.append(request)
        return group

    def _write(self, group: list[_Request[Item, Result]]) -> None:
        try:
            results = self._commit([request.item for request in group])
        except Exception as exc:
            if len(group) == 1:
                group[0].future.set_exception(exc)
                return
            logger.warning("a group of %d writes failed (%s); writing each alone", len(group), exc)
            for request in group:
                self._write([request])
            return
        for request, result in zip(group, results, strict=True):
            request.future.set_result(result)

    def _commit(self, items: list[Item]) -> Sequence[Result]:
        with self._sessions() as session:
            results = self._write_many(session, items)
            if len(results) != len(items):  # a bug in write_many: roll back, write nothing
                raise RuntimeError(f"wrote {len(items)} items but got {len(results)} results")
        return results
