"""Following a table by id when rows become visible out of order.

A follower reads the rows with an id above its checkpoint, and the checkpoint is not
simply the largest id seen. Ids come from a sequence when a row is inserted, but rows
become visible when their transaction commits, and transactions commit in any order: id
41 may become visible a second after id 42. Reading `id > 42` next time would skip 41
forever. So:

- every row above the checkpoint that the follower holds is known by id, and each read
  takes the ids above the checkpoint and adds only those it lacks;
- the checkpoint moves to a value only when no transaction that could still commit a row
  at or below it is running. Each read first reads the sequence's last value A
  (`sequence_value`), then takes its snapshot and records that snapshot's xmax X
  (`snapshot_bounds`): every
  transaction that had allocated an id up to A has an xid below X, provided it had an xid
  before it took the id. A later read whose snapshot's xmin is at least X sees every such
  transaction ended, so every row up to A is visible to it or never will be: the
  checkpoint may become A (`settle`). This needs the id sequence's CACHE of 1,
  PostgreSQL's default for a serial column: with a larger cache a session could use,
  later, ids it took before A was read.

A long transaction anywhere on the server holds xmin back; the checkpoint then waits and
each read re-reads the ids above it (ids only) until it ends. Nothing is missed.

Used by the search index (`moderation.search.follow`, the `embeddings` table), by the
bank matcher (`moderation.banks.changes`, the `bank_changes` log), and by what prunes
that log (`moderation.banks.pruning`): a row may be pruned, and a horizon recorded above
it, only once no transaction could still commit a row below (`settled_value`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

_SEQUENCE_VALUE = text(
    "SELECT pg_sequence_last_value(pg_get_serial_sequence(:table, 'id')::regclass)"
)
_OWN_XID = text("SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
_SNAPSHOT_BOUNDS = text(
    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, "
    "pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
)


@dataclass(frozen=True)
class Horizon:
    """A checkpoint a follower may take once every transaction running at `xmax` ended."""

    allocated: int  # the sequence's last value, read before the snapshot
    xmax: int  # that snapshot's xmax
    read_at: float  # time.monotonic() just after the sequence was read


@dataclass(frozen=True)
class SnapshotBounds:
    xmin: int
    xmax: int
    started_at: float  # time.monotonic() just before the snapshot was taken


def sequence_value(conn: Connection | Session, table: str) -> tuple[int, float]:
    """The last value of `table`'s id sequence and when it was read. Sequences are not
    transactional: read it before, and outside, the snapshot it is paired with."""
    allocated = int(conn.execute(_SEQUENCE_VALUE, {"table": table}).scalar() or 0)
    return allocated, time.monotonic()


def snapshot_bounds(conn: Connection | Session) -> SnapshotBounds:
    """The bounds of the snapshot the next statement sees: the transaction's own in
    REPEATABLE READ, or (READ COMMITTED) one no newer than any later statement's."""
    started_at = time.monotonic()
    xmin, xmax = conn.execute(_SNAPSHOT_BOUNDS).one()
    return SnapshotBounds(int(xmin), int(xmax), started_at)


def settled_value(session: Session, table: str, wait_s: float) -> int | None:
    """The last value of `table`'s id sequence once every transaction that could still
    commit a row at or below it has ended: at once, usually, since those running when it
    is read are waited for, `wait_s` at most. None if they have not ended by then, or if
    the session's own transaction has an xid (it will not end while it waits). Call it in
    a READ COMMITTED session, whose each statement has a snapshot of its own."""
    allocated, _ = sequence_value(session, table)
    started = snapshot_bounds(session)
    if session.scalar(_OWN_XID):
        return None
    deadline = time.monotonic() + wait_s
    while snapshot_bounds(session).xmin < started.xmax:
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)
    return allocated


def settle(
    checkpoint: int,
    pending: list[Horizon],
    read: SnapshotBounds,
    horizon: Horizon,
    commit_lag_s: float,
) -> tuple[int, list[Horizon]]:
    """The checkpoint and pending horizons after a read in snapshot `read`, which took
    `horizon`: every earlier horizon whose transactions had all ended before the read
    (and at least `commit_lag_s` before it) becomes the checkpoint."""
    ready = [
        h for h in pending if read.xmin >= h.xmax and read.started_at - h.read_at >= commit_lag_s
    ]
    if ready:
        checkpoint = max(checkpoint, *(h.allocated for h in ready))
    return checkpoint, [h for h in pending if h not in ready] + [horizon]
