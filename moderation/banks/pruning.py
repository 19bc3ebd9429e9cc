"""Keeping the `bank_changes` log bounded: rows older than a retention are deleted.

Triggers add about two rows per entry added (the entry and its embedding), so a bank of
millions with churn would grow the log without end. Workers need only the rows above
their checkpoints, which trail the log's end by seconds, so the rows older than
`bank_changes_retention_s` (a day) are deleted, by every worker's sweeper
(`moderation.worker.sweeper`) and by `moderation sweep`.

What a worker must never do is miss a change. Pruning therefore deletes a prefix of the
log, ids up to some N, and in the same transaction records N as the horizon
(`BankChangesHorizon`); a worker that finds the horizon above its checkpoint cannot tell
what it missed and loads the banks whole (`moderation.banks.changes`). N is never above
an id a running transaction could still commit (`moderation.commit_horizon`): rows become
visible when their transaction commits, so a row committed later with an id below the
horizon would be skipped by every worker already past it, nor above the checkpoint of a
durable reader (`changes.read_as`: the retro-hunt's starter), which must read every row.
Rows are deleted in batches of
`_BATCH`, each batch a transaction of its own, so that no prune holds many locks or
writes much WAL at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from moderation.banks.models import BankChange, BankChangeReader, BankChangesHorizon
from moderation.commit_horizon import settled_value
from moderation.runtime import Runtime

logger = logging.getLogger(__name__)

# Log rows deleted per transaction, and batches per sweep: a sweep (every 10 s) deletes
# at most 100,000 rows, so the two million rows of a million-entry import go within a
# few minutes of their retention passing; `moderation sweep` deletes them all at once.
_BATCH = 10_000
SWEEP_BATCHES = 10
# How long a prune waits for the transactions running when it starts (see `settled_value`).
_SETTLE_WAIT_S = 1.0
# Any constant: the key of the advisory lock that lets one prune run at a time.
_PRUNE_LOCK_KEY = 7_301_563


@dataclass(frozen=True)
class Pruned:
    rows: int  # log rows deleted
    through: int  # the horizon afterwards: every row up to this id may be gone


def slowest_reader(session: Session) -> int | None:
    """The lowest checkpoint of the log's durable readers; None if there are none."""
    return session.scalar(select(func.min(BankChangeReader.checkpoint)))


def pruned_through(session: Session) -> int:
    """The horizon: log rows up to this id may have been deleted."""
    return int(session.scalar(select(BankChangesHorizon.pruned_through)) or 0)


def prune_changes(
    sessions: Callable[[], AbstractContextManager[Session]],
    retention: timedelta,
    *,
    batches: int | None = SWEEP_BATCHES,
    batch: int = _BATCH,
    settle_wait_s: float = _SETTLE_WAIT_S,
) -> Pruned:
    """Delete the log rows older than `retention`, at most `batches` batches of `batch`
    rows (None: all of them), each batch committed in a session of its own from
    `sessions` (READ COMMITTED). Deletes nothing if another prune is running, or if the
    transactions that could still commit a row below the log's end have not ended within
    `settle_wait_s` (a long transaction anywhere on the server: the next prune tries
    again)."""
    with sessions() as session:
        through = pruned_through(session)
        if not _has_old_rows(session, retention):
            return Pruned(0, through)  # the usual case: no settling, no writes
        settled = settled_value(session, "bank_changes", settle_wait_s)
        slowest = slowest_reader(session)
    if settled is not None and slowest is not None:
        settled = min(settled, slowest)
    rows = 0
    done = 0
    while settled is not None and (batches is None or done < batches):
        with sessions() as session:
            deleted = prune_batch(session, settled=settled, retention=retention, batch=batch)
            if deleted is None:
                break
            rows += deleted.rows
            through = deleted.through
        done += 1
    if rows:
        logger.info("pruned %d bank change log rows, through id %d", rows, through)
    return Pruned(rows, through)


def prune_expired(runtime: Runtime, batches: int | None = SWEEP_BATCHES) -> Pruned:
    """`prune_changes` of the rows older than `bank_changes_retention_s`, in the
    runtime's database."""
    retention = timedelta(seconds=runtime.settings.bank_changes_retention_s)
    return prune_changes(runtime.session, retention, batches=batches)


def prune_batch(
    session: Session, *, settled: int, retention: timedelta, batch: int
) -> Pruned | None:
    """Delete the log's oldest rows, up to `batch` of them, that are older than
    `retention`, and raise the horizon to the last; a prefix of the log, so it stops at
    the first younger row. `settled`: an id below which no running transaction can
    still commit a row. None if there is nothing to delete or another prune holds the
    lock. Does not commit."""
    if not session.scalar(select(func.pg_try_advisory_xact_lock(_PRUNE_LOCK_KEY))):
        return None
    oldest = (
        select(BankChange.id, BankChange.created_at)
        .where(BankChange.id <= settled)
        .order_by(BankChange.id)
        .limit(batch)
        .cte("oldest")
    )
    first_young = (
        select(func.min(oldest.c.id)).where(oldest.c.created_at >= _cutoff(retention))
    ).scalar_subquery()
    through = session.scalar(
        select(func.max(oldest.c.id)).where(oldest.c.id < func.coalesce(first_young, settled + 1))
    )
    if through is None:
        return None
    deleted = session.execute(delete(BankChange).where(BankChange.id <= through))
    # In the transaction that deletes: a worker sees the rows or the horizon above them.
    # An upsert, so that rows are never deleted without it, whatever became of the row.
    session.execute(
        insert(BankChangesHorizon)
        .values(pruned_through=through, pruned_at=func.now())
        .on_conflict_do_update(
            index_elements=[BankChangesHorizon.one_row],
            set_={
                "pruned_through": func.greatest(BankChangesHorizon.pruned_through, through),
                "pruned_at": func.now(),
            },
        )
    )
    return Pruned(int(getattr(deleted, "rowcount", 0) or 0), pruned_through(session))


def _has_old_rows(session: Session, retention: timedelta) -> bool:
    oldest = select(BankChange.created_at).order_by(BankChange.id).limit(1).scalar_subquery()
    return bool(session.scalar(select(oldest < _cutoff(retention))))


def _cutoff(retention: timedelta) -> ColumnElement[datetime]:
    """Rows created before this are older than `retention`, by the database's clock (the
    one `created_at` was set by)."""
    return func.now() - func.make_interval(0, 0, 0, 0, 0, 0, retention.total_seconds())
