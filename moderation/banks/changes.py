"""Following the `bank_changes` log: what changed in the banks since a worker last looked.

Triggers write a row to `bank_changes` (see `BankChange`) in the same transaction as any
change to banks, entries or their embeddings, so a change and its row become visible
together. A worker reads the rows above its checkpoint that it has not yet applied, by
id, as `moderation.commit_horizon` says, so that a row whose transaction commits after a
higher one is not skipped: each check is an index range scan over the few rows of the
last moments, whatever the banks' size.

Rows here are inserted by triggers after the change they report, so their transaction
has an xid before it takes the row's id: the xid rule needs no commit lag.

Reads run in the caller's session at READ COMMITTED, each statement with a snapshot of
its own: the sequence is read before the snapshot bounds, and the bounds before the ids,
so every later statement (the entries the changes name) sees at least what those saw.

Old rows are pruned (`moderation.banks.pruning`) below a recorded horizon. A tail whose
checkpoint is below it cannot tell what it missed: its read says `everything`, and once
the banks are loaded whole its checkpoint jumps to the horizon.

Other domains that act on bank changes read the log as durable readers (`read_as`,
`advance`), with a checkpoint kept in the database that pruning never passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from moderation.banks.models import BankChange, BankChangeReader
from moderation.banks.pruning import pruned_through
from moderation.commit_horizon import (
    Horizon,
    SnapshotBounds,
    sequence_value,
    settle,
    settled_value,
    snapshot_bounds,
)

_NO_IDS = np.empty(0, np.int64)
# How long a full load waits for the transactions running when it starts, so that its
# checkpoint can start at the log's end instead of its beginning (see `ChangeTail.start`).
_START_WAIT_S = 1.0
# Rows a check reads at first, beyond those it already applied. A small LIMIT keeps the
# plan an index range scan even before the table has statistics (after a bulk import,
# until autovacuum analyses it, PostgreSQL would scan and sort the whole log for a
# LIMIT in the hundred thousands: 90-170 ms at 2,000,000 rows).
_FEW = 1000


@dataclass(frozen=True)
class Changes:
    """The rows one read found above the checkpoint that were not yet applied."""

    ids: np.ndarray
    banks: frozenset[int]  # banks whose own row changed (enabled, radius, created, deleted)
    entries: frozenset[int]  # entries whose hashes, bank or embeddings changed
    # Everything must be read again: a table was truncated, there were more changes than
    # the read's limit, or the log was pruned above the checkpoint (`banks` and `entries`
    # are then empty).
    everything: bool
    bounds: SnapshotBounds
    horizon: Horizon
    pruned_through: int  # the log's horizon, read after the rows (see `pruning`)

    def __bool__(self) -> bool:
        return bool(len(self.ids))


@dataclass
class ChangeTail:
    """Where a worker's index stands in the log, for one model (other models' embedding
    changes are not its business)."""

    model_id: int
    checkpoint: int = 0
    known: np.ndarray = field(default_factory=lambda: _NO_IDS)  # applied, above checkpoint
    pending: list[Horizon] = field(default_factory=list)

    @classmethod
    def start(cls, session: Session, model_id: int) -> ChangeTail:
        """A tail for a full load about to be read in `session`. Its checkpoint starts at
        the log's last id if every transaction that could still commit a row below it
        ends within `_START_WAIT_S` (usually at once), so that later reads take only the
        newer rows; else at 0, and the first read takes every id the log holds."""
        settled = settled_value(session, "bank_changes", _START_WAIT_S)
        return cls(model_id, checkpoint=settled or 0)

    def read(self, session: Session, limit: int) -> Changes:
        """The rows not yet applied; `everything` if there are more than `limit`, or if the
        log was pruned above the checkpoint (rows this tail never read may be gone)."""
        allocated, read_at = sequence_value(session, "bank_changes")
        bounds = snapshot_bounds(session)
        horizon = Horizon(allocated=allocated, xmax=bounds.xmax, read_at=read_at)
        ids, banks, entries, everything = self._unapplied(session, limit)
        # Read after the rows: a prune that committed before they were read is seen here.
        pruned = pruned_through(session)
        everything = everything or pruned > self.checkpoint
        if everything:
            banks, entries = frozenset(), frozenset()
        return Changes(ids, banks, entries, everything, bounds, horizon, pruned)

    def _unapplied(
        self, session: Session, limit: int
    ) -> tuple[np.ndarray, frozenset[int], frozenset[int], bool]:
        above = select(BankChange.id).where(
            BankChange.id > self.checkpoint,
            or_(BankChange.model_id.is_(None), BankChange.model_id == self.model_id),
        )
        rows = session.execute(
            above.add_columns(BankChange.bank_id, BankChange.bank_entry_id)
            .order_by(BankChange.id)
            .limit(len(self.known) + _FEW)
        ).all()
        if len(rows) == len(self.known) + _FEW:
            # Many: their ids first (ids only), then the rows if there are not too many.
            ids = np.fromiter(session.scalars(above.order_by(BankChange.id)), np.int64)
            ids = ids[~np.isin(ids, self.known)]
            if len(ids) > limit:
                return ids, frozenset(), frozenset(), True
            rows = session.execute(
                above.add_columns(BankChange.bank_id, BankChange.bank_entry_id).where(
                    BankChange.id <= int(ids[-1])
                )
            ).all()
        new = [row for row in rows if not _contains(self.known, row[0])]
        ids = np.array(sorted(row[0] for row in new), np.int64)
        truncated = any(bank is None and entry is None for _, bank, entry in new)
        if truncated or len(new) > limit:
            return ids, frozenset(), frozenset(), True
        banks = frozenset(bank for _, bank, entry in new if bank is not None)
        entries = frozenset(entry for _, bank, entry in new if entry is not None)
        return ids, banks, entries, False

    def absorb(self, changes: Changes) -> None:
        """Record `changes` as applied and move the checkpoint as far as is safe."""
        known = np.union1d(self.known, changes.ids)
        # No commit lag: see the module.
        self.checkpoint, self.pending = settle(
            self.checkpoint, self.pending, changes.bounds, changes.horizon, 0.0
        )
        if changes.pruned_through > self.checkpoint:
            # Read everything again, after the horizon: every row up to it was committed
            # before it was pruned (see `pruning`), so the load saw what they named.
            assert changes.everything
            self.checkpoint = changes.pruned_through
        self.known = known[known > self.checkpoint]


def _contains(sorted_ids: np.ndarray, value: int) -> bool:
    at = int(np.searchsorted(sorted_ids, value))
    return at < len(sorted_ids) and int(sorted_ids[at]) == value


@dataclass(frozen=True)
class ReaderPosition:
    """What a durable reader may read now: the rows with ids in (`after`, `through`]."""

    after: int
    through: int
    # Rows above `after` were pruned: the reader cannot tell what it missed. Only a
    # hand-edited database gets here, since pruning never passes a reader.
    missed: bool


def read_as(session: Session, reader: str, wait_s: float = _START_WAIT_S) -> ReaderPosition | None:
    """Where `reader` stands in the log, and the ids it may read now: up to the log's end
    once every transaction that could still commit a row below it has ended (`wait_s`
    at most). Its row stays locked until the caller's transaction ends, so one caller at
    a time reads as `reader`; the caller records how far it got with `advance`. None if
    another caller holds it, or if those transactions have not ended. A reader not seen
    before starts from the beginning of the log. Call it before the session writes
    anything (see `moderation.commit_horizon.settled_value`)."""
    through = settled_value(session, "bank_changes", wait_s)
    if through is None:
        return None
    session.execute(insert(BankChangeReader).values(name=reader).on_conflict_do_nothing())
    checkpoint = session.scalar(
        select(BankChangeReader.checkpoint)
        .where(BankChangeReader.name == reader)
        .with_for_update(skip_locked=True)
    )
    if checkpoint is None:
        return None
    return ReaderPosition(
        checkpoint, max(through, checkpoint), missed=pruned_through(session) > checkpoint
    )


def advance(session: Session, reader: str, through: int) -> None:
    """Record that `reader` has acted on every log row up to `through`, in the caller's
    transaction (the one that acted)."""
    session.execute(
        update(BankChangeReader)
        .where(BankChangeReader.name == reader)
        .values(checkpoint=func.greatest(BankChangeReader.checkpoint, through), read_at=func.now())
    )
