"""Pruning the bank change log: only rows older than the retention go, a prefix of the log
at a time, and never past an id that a running transaction could still commit.

Pruning commits in sessions of its own, so these tests commit: `log` empties the bank
tables and puts the horizon back afterwards. A row is made old by moving its
`created_at` back (`_age`), since triggers stamp it with the time of the change.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from moderation.banks import pruning
from moderation.banks import service as banks
from moderation.banks.models import BankChange, BankChangeReader, BankChangesHorizon, BankEntry
from moderation.banks.pruning import Pruned, prune_changes, pruned_through
from moderation.main.cli import main
from moderation.runtime import Runtime
from moderation.worker.sweeper import Sweeper
from tests.conftest import TEST_RUNTIME
from tests.queues import queue, queue_runtime

__all__ = ["queue", "queue_runtime"]

RETENTION = timedelta(hours=1)
# Long enough for the transactions of a busy test server to end (see `settled_value`).
SETTLE_WAIT_S = 30.0


@pytest.fixture
def log(database: str) -> Iterator[int]:
    """The id of a committed bank, its tables empty beside it; the horizon is put back
    to 0 afterwards (never done in production: it only rises)."""
    empty = text(
        "TRUNCATE retrohunt_jobs, hits, bank_entry_embeddings, bank_entries, banks CASCADE"
    )
    with TEST_RUNTIME.engine.begin() as conn:
        conn.execute(empty)
    with TEST_RUNTIME.session() as session:
        bank_id = banks.create_bank(session, "pruned").id
    yield bank_id
    with TEST_RUNTIME.engine.begin() as conn:
        conn.execute(empty)
        conn.execute(update(BankChangesHorizon).values(pruned_through=0, pruned_at=None))


def _add_entry(bank_id: int, sha: bytes) -> int:
    """Commit an entry; the id of the log row it made."""
    with TEST_RUNTIME.session() as session:
        session.add(BankEntry(bank_id=bank_id, sha256=sha, added_by="t"))
    return _last_id()


def _last_id() -> int:
    with TEST_RUNTIME.session() as session:
        return int(session.scalar(select(func.max(BankChange.id))) or 0)


def _log_ids() -> list[int]:
    with TEST_RUNTIME.session() as session:
        return list(session.scalars(select(BankChange.id).order_by(BankChange.id)))


def _age(ids: list[int]) -> None:
    """Make these log rows two days old."""
    with TEST_RUNTIME.session() as session:
        session.execute(
            update(BankChange)
            .where(BankChange.id.in_(ids))
            .values(created_at=func.now() - timedelta(days=2))
        )


def _horizon() -> int:
    with TEST_RUNTIME.session() as session:
        return pruned_through(session)


def _readers_at(checkpoint: int) -> None:
    """Put the log's durable readers (the retro-hunt's starter) at `checkpoint`."""
    with TEST_RUNTIME.session() as session:
        session.execute(update(BankChangeReader).values(checkpoint=checkpoint))


def _prune(
    *,
    batch: int = 10_000,
    batches: int | None = None,
    settle_wait_s: float = SETTLE_WAIT_S,
    readers_caught_up: bool = True,
) -> Pruned:
    if readers_caught_up:
        _readers_at(_last_id())
    return prune_changes(
        TEST_RUNTIME.session, RETENTION, batch=batch, batches=batches, settle_wait_s=settle_wait_s
    )


def test_only_rows_older_than_the_retention_go_and_only_a_prefix_of_the_log(log: int) -> None:
    made = [_add_entry(log, bytes([i]) * 32) for i in range(1, 7)]
    before = _log_ids()
    young = made[3]
    _age([row for row in before if row != young])
    pruned = _prune()
    # Up to the first young row: those past it are old, but a prefix of the log is
    # pruned, with one horizon below which nothing is left.
    older = [row for row in before if row < young]
    assert pruned == Pruned(rows=len(older), through=older[-1])
    assert _log_ids() == [row for row in before if row >= young]
    assert _horizon() == older[-1]
    # Once the young row is old, the rest go.
    _age([young])
    assert _prune() == Pruned(rows=len(before) - len(older), through=made[-1])
    assert _log_ids() == []


def test_nothing_goes_before_its_retention(log: int) -> None:
    _add_entry(log, b"\1" * 32)
    before = _log_ids()
    assert _prune() == Pruned(rows=0, through=0)
    assert _log_ids() == before
    assert _horizon() == 0


def test_rows_go_in_bounded_batches(log: int) -> None:
    for i in range(1, 6):
        _add_entry(log, bytes([i]) * 32)
    before = _log_ids()
    _age(before)
    assert _prune(batch=2, batches=1) == Pruned(rows=2, through=before[1])
    assert _log_ids() == before[2:]
    assert _prune(batch=2, batches=2) == Pruned(rows=4, through=before[5])
    assert _prune(batch=2) == Pruned(rows=len(before) - 6, through=before[-1])
    assert _log_ids() == []


def test_pruning_never_passes_a_durable_reader(log: int) -> None:
    """The retro-hunt's starter reads the log from a checkpoint of its own: rows it has not
    read stay, however old, and go once it has."""
    made = [_add_entry(log, bytes([i]) * 32) for i in range(1, 5)]
    _age(_log_ids())
    _readers_at(made[1])
    assert _prune(readers_caught_up=False).through == made[1]
    assert _log_ids()[0] > made[1]
    assert _prune().through == made[-1]
    assert _log_ids() == []


def test_one_prune_at_a_time(log: int) -> None:
    _add_entry(log, b"\1" * 32)
    before = _log_ids()
    _age(before)
    with TEST_RUNTIME.session() as other:  # another prune, in a transaction of its own
        other.execute(select(func.pg_advisory_xact_lock(pruning._PRUNE_LOCK_KEY)))
        assert _prune() == Pruned(rows=0, through=0)
    assert _log_ids() == before
    assert _prune().rows == len(before)


def test_a_transaction_holding_a_lower_id_open_is_not_pruned_past(log: int) -> None:
    """The open transaction's row takes its id first, then a later one commits; both old
    enough. The horizon must stay below the open row's id until its transaction ends: a
    worker past the horizon would never read it once it commits."""
    with Session(TEST_RUNTIME.engine) as slow, slow.begin():
        slow.add(BankEntry(bank_id=log, sha256=b"\1" * 32, added_by="slow"))
        slow.flush()  # its log row takes the lower id now
        lower = int(slow.scalar(select(func.max(BankChange.id))) or 0)
        higher = _add_entry(log, b"\2" * 32)
        assert lower < higher
        _age(_log_ids())
        assert _prune(settle_wait_s=0.2) == Pruned(rows=0, through=0)
        assert _horizon() < lower
    _age(_log_ids())
    assert _prune().through == higher
    assert _log_ids() == []


def test_moderation_sweep_prunes_with_the_configured_retention(
    log: int, queue: str, make_runtime: Callable[..., Runtime]
) -> None:
    before = _log_ids()
    _age(before)
    added = _add_entry(log, b"\1" * 32)
    runtime = make_runtime(queue=queue, bank_changes_retention_s=3600)
    result = CliRunner().invoke(main, ["sweep", "--json"], obj=runtime, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    swept = json.loads(result.stdout)
    assert swept["bank_changes_pruned"] == len(before)
    assert swept["bank_changes_pruned_through"] == before[-1]
    assert _log_ids() == [added]


def test_the_workers_sweeper_prunes(
    log: int, queue: str, make_runtime: Callable[..., Runtime]
) -> None:
    _age(_log_ids())
    runtime = make_runtime(queue=queue, bank_changes_retention_s=3600, sweep_interval_s=0.05)
    sweeper = Sweeper(runtime).start()
    try:
        deadline = time.monotonic() + SETTLE_WAIT_S
        while _log_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sweeper.stop()
    assert _log_ids() == []
    assert _horizon() > 0
