"""Group commit: the same kind of write from many threads, many per transaction.

A worker screens dozens of uploads at once, each in its own task thread, and each upload
changes its row twice (claimed, then screened). As one transaction apiece that is two
commits and a handful of statements per upload, which on a small worker costs as much CPU
as decoding the image, and on a GPU worker holds the GIL long enough to starve the model.

A `GroupCommit` is a `Batcher` (see `moderation.worker.batching`) with one writer thread. A caller
hands it an item and blocks until the transaction that wrote it has committed, so a task
still acknowledges its message only after its effects are durable. The writer takes
whatever has queued up while the previous transaction ran and writes it all with one call
of `write_many`: under load a transaction carries many items, and a lone item is written
at once, with no added wait.

If a group fails, each of its items is retried in a transaction of its own, so that one
item's error (a missing row, a deadlock with a duplicate delivery elsewhere) is reported to
that item's caller alone, and the others still commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

from moderation.worker.batching import Batcher, BatchStats

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class _Failed:
    error: Exception


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
        self._batcher: Batcher[Item, Result | _Failed] = Batcher(
            self._write, name=name, max_batch=max_group
        )

    def __call__(self, item: Item, timeout_s: float | None = None) -> Result:
        """Write one item, waiting until it is committed; raises what writing it raised, or
        `BatchTimeout` after `timeout_s`. A write that timed out may still commit later:
        `write_many` must make a repeat harmless."""
        (outcome,) = self._batcher.submit([item], timeout_s)
        if isinstance(outcome, _Failed):
            raise outcome.error
        return outcome

    def many(
        self, items: Sequence[Item], timeout_s: float | None = None
    ) -> list[Result | Exception]:
        """Write several items (committed together where they fit in one group), waiting
        until all are committed; each one's result, or the error that writing it raised."""
        outcomes = self._batcher.submit(items, timeout_s)
        return [o.error if isinstance(o, _Failed) else o for o in outcomes]

    @property
    def name(self) -> str:
        return self._batcher.name

    @property
    def stats(self) -> BatchStats:
        """Items written and transactions that wrote them."""
        return self._batcher.stats

    @property
    def waiting(self) -> int:
        """Items handed in that the writer has not yet taken up."""
        return self._batcher.waiting

    def close(self) -> None:
        """Write everything already handed in, then stop."""
        self._batcher.close()

    def _write(self, group: list[Item]) -> list[Result | _Failed]:
        try:
            return list(self._commit(group))
        except Exception as exc:
            if len(group) == 1:
                return [_Failed(exc)]
            logger.warning("a group of %d writes failed (%s); writing each alone", len(group), exc)
            return [outcome for item in group for outcome in self._write([item])]

    def _commit(self, items: list[Item]) -> Sequence[Result]:
        with self._sessions() as session:
            results = self._write_many(session, items)
            if len(results) != len(items):  # a bug in write_many: roll back, write nothing
                raise RuntimeError(f"wrote {len(items)} items but got {len(results)} results")
        return results
