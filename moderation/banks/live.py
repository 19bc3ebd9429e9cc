"""The banks as a worker holds them: row stores that each refresh changes by what changed,
and the snapshots (`BankIndex`) that matching reads.

A refresh reads the change log (`moderation.banks.changes`), then the current state of
what its new rows name, and only then changes the stores:

- a bank disabled or deleted: its rows are retired;
- a bank enabled or created: its entries are read and appended;
- a bank's radius changed: the radius table, of which each snapshot holds its own;
- an entry added, removed, re-hashed, moved to another bank, or embedded anew: its rows
  are retired and, if it still belongs to an enabled bank, its signals appended.

What a change costs is what it names, whatever the banks' size (bar a scan of the bank
ids column when a bank is disabled). Nothing is changed until everything has been read,
so a refresh that fails (the database went away) leaves the stores as they were, and the
next one reads the same changes again. The changes name what to read, not what happened,
so reading an entry twice, or after a later change, is harmless.

A full load reads every entry of every enabled bank into new stores: at start, after a
table was truncated, after the log was pruned past the worker's checkpoint (a worker
that fell behind by more than the log's retention), and when a refresh would otherwise
read more than a quarter of the index (a load then costs about as much). It remains the
reference: tests hold a refreshed index to a fresh load.
"""

from __future__ import annotations

import logging
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
from sqlalchemy import ColumnElement, true
from sqlalchemy.orm import Session

from moderation.banks.changes import Changes, ChangeTail
from moderation.banks.clip_plan import ClipPlan
from moderation.banks.index import BankIndex, MatchSettings
from moderation.banks.models import Bank, BankEntry
from moderation.banks.reads import Reading, SignalStores, read_entries, read_radii

logger = logging.getLogger(__name__)

# A refresh whose changes name more than 1/REBUILD_FRACTION of the index's entries (and
# more than REBUILD_MIN) loads everything instead.
REBUILD_FRACTION = 4
REBUILD_MIN = 10_000
# Entry ids per query when a refresh reads the entries its changes name.
_ENTRIES_PER_READ = 10_000


@dataclass(frozen=True)
class Refreshed:
    changes: int  # rows of the change log applied
    loaded: bool  # by a full load


class LiveBanks:
    """The stores, the radius of each enabled bank, and where they stand in the log."""

    def __init__(
        self,
        reading: Reading,
        settings: MatchSettings,
        device: str,
        tail: ChangeTail,
        plan: ClipPlan | None = None,
    ) -> None:
        """`plan`: how CLIP vectors are searched (default: `clip_plan.default_plan`)."""
        self._reading = reading
        self._settings = settings
        self._device = device
        self._plan = plan
        self._tail = tail
        self._stores = self._empty_stores()
        self._radii: dict[int, float] = {}
        self._must_load = True

    @classmethod
    def load(
        cls,
        session: Session,
        reading: Reading,
        settings: MatchSettings,
        device: str = "cpu",
        plan: ClipPlan | None = None,
    ) -> LiveBanks:
        """Everything, read in `session` (READ COMMITTED, see `moderation.banks.changes`)."""
        tail = ChangeTail.start(session, reading.model_id)
        live = cls(reading, settings, device, tail, plan)
        live.refresh(session)
        return live

    @property
    def checkpoint(self) -> int:
        """The change log id up to which every change is applied."""
        return self._tail.checkpoint

    def snapshot(self) -> BankIndex:
        stores = self._stores
        return BankIndex(
            self._settings,
            stores.sha256.view(),
            stores.sha256.rows_of_hash,
            stores.pdq.snapshot(),
            stores.clip.bank(self._radii),
        )

    def refresh(self, session: Session) -> Refreshed | None:
        """Apply what changed since the last refresh; None if nothing did."""
        entries = max(store.live_count for store in self._stores.all())
        changes = self._tail.read(session, max(REBUILD_MIN, entries // REBUILD_FRACTION))
        loads = changes.everything or self._must_load
        if loads:
            self._load(session)
        elif changes:
            self._apply(session, changes)
        self._tail.absorb(changes)
        return Refreshed(len(changes.ids), loaded=loads) if loads or changes else None

    def _load(self, session: Session) -> None:
        stores = self._empty_stores()
        radii = read_radii(session, self._reading)
        read_entries(session, self._reading, true(), stores)
        stores.seal()
        self._stores, self._radii = stores, radii
        self._must_load = False

    def _empty_stores(self) -> SignalStores:
        return SignalStores.empty(self._reading.dim, device=self._device, plan=self._plan)

    def _apply(self, session: Session, changes: Changes) -> None:
        reading = self._reading
        radii = read_radii(session, reading, Bank.id.in_(changes.banks)) if changes.banks else {}
        dropped = changes.banks - radii.keys()  # disabled or deleted
        loaded = radii.keys() - self._radii.keys()  # enabled or created
        # Host rows only: they are copied into the stores (and to the device) below.
        read = SignalStores.empty(reading.dim)
        entries_read = [np.empty(0, np.int64)]
        if loaded:
            entries_read.append(read_entries(session, reading, BankEntry.bank_id.in_(loaded), read))
        named = sorted(changes.entries)
        for start in range(0, len(named), _ENTRIES_PER_READ):
            where: ColumnElement[bool] = BankEntry.id.in_(named[start : start + _ENTRIES_PER_READ])
            if loaded:  # those entries were read with their banks
                where &= BankEntry.bank_id.not_in(loaded)
            entries_read.append(read_entries(session, reading, where, read))
        # Every entry read is retired before it is appended, so that no entry ever has two
        # live rows, whatever order its changes came in.
        replaced = changes.entries | set(np.concatenate(entries_read).tolist())
        try:
            self._change_stores(read, dropped, replaced)
        except BaseException:
            self._must_load = True  # the stores may be half changed: never serve them
            raise
        self._radii = {bank: r for bank, r in self._radii.items() if bank not in dropped}
        self._radii.update(radii)

    def _change_stores(
        self, read: SignalStores, dropped: AbstractSet[int], replaced: AbstractSet[int]
    ) -> None:
        for store, new in zip(self._stores.all(), read.all(), strict=True):
            for bank in dropped:
                store.retire_bank(bank)
            store.retire_entries(replaced)
            rows = new.view()
            store.append(rows.entry_ids, rows.bank_ids, rows.payload)
        self._stores.compact_where_needed()
