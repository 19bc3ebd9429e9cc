"""Bank rows of one signal, appended and never changed once written.

A worker's bank index (see `moderation.banks.live`) keeps each signal's rows here: one row
per bank entry that has the signal, with the entry's id, its bank's id and the signal
itself. Snapshots (`RowsView`) are read by screening threads while a refresh changes the
store, without a lock and without copying the store:

- a row, once written, is never changed: a refresh appends rows past every snapshot's
  `count`, and a snapshot reads only its own first `count` rows;
- an entry that changes or goes has its row retired: each snapshot has its own sorted
  array of retired rows (a new array per change), and readers drop those rows;
- growing past the capacity copies the rows into larger arrays; a snapshot keeps the
  arrays it was made with;
- once a store's retired rows pass `COMPACT_FRACTION` of it, `compacted` copies the live
  rows into a new store, so retired rows cost a search little and never pile up.

Only the refreshing thread writes: it holds the matcher's lock.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Self

import numpy as np

NO_ROWS = np.empty(0, np.int64)
# A store is compacted once its retired rows are more than this share of its rows (and
# more than COMPACT_MIN): a search then scores at most 1/8 more rows than it needs to,
# and the copy, which costs about as much as appending every row once, is paid after at
# least count/8 changes.
COMPACT_FRACTION = 8
COMPACT_MIN = 4096
# Room for rows appended after a full load, beyond its rows: a share of them, at least
# GROW_MIN. Host memory that is never written is never committed.
GROW_FRACTION = 4
GROW_MIN = 1024


@dataclass(frozen=True)
class RowsView:
    """What one snapshot sees of a store: its first rows, less the retired ones."""

    entry_ids: np.ndarray
    bank_ids: np.ndarray
    payload: np.ndarray
    retired: np.ndarray  # sorted row numbers

    def __len__(self) -> int:
        return len(self.entry_ids) - len(self.retired)

    def live(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` this snapshot holds: below its count and not retired."""
        rows = np.asarray(rows, np.int64)
        held = rows < len(self.entry_ids)
        if len(self.retired):
            at = np.minimum(np.searchsorted(self.retired, rows), len(self.retired) - 1)
            held &= self.retired[at] != rows
        return held


class SignalRows:
    """One signal's rows (see the module). `payload`: the dtype and shape of a row's
    signal. Rows appended before `seal` is first called are indexed by it; later ones as
    they come."""

    def __init__(self, dtype: np.dtype | type, shape: tuple[int, ...], capacity: int = 0) -> None:
        self.count = 0
        self.entry_ids = np.empty(capacity, np.int64)
        self.bank_ids = np.empty(capacity, np.int64)
        self.payload = np.empty((capacity, *shape), dtype)
        self.retired = NO_ROWS
        # Entry -> row: sorted arrays for the rows indexed at `seal`, and a dict for the
        # entries appended or retired since (-1: none now).
        self._sealed = False
        self._sorted_entries = NO_ROWS
        self._sorted_rows = NO_ROWS
        self._moved: dict[int, int] = {}

    @property
    def capacity(self) -> int:
        return len(self.entry_ids)

    @property
    def live_count(self) -> int:
        return self.count - len(self.retired)

    def view(self) -> RowsView:
        n = self.count
        return RowsView(self.entry_ids[:n], self.bank_ids[:n], self.payload[:n], self.retired)

    def append(self, entry_ids: np.ndarray, bank_ids: np.ndarray, payload: np.ndarray) -> None:
        """Add rows for entries that have none live here (retire their old ones first)."""
        start, end = self.count, self.count + len(entry_ids)
        if end > self.capacity:
            self._grow(max(end, self.capacity + self.capacity // 2, GROW_MIN))
        self.entry_ids[start:end] = entry_ids
        self.bank_ids[start:end] = bank_ids
        self.payload[start:end] = payload
        self._written(start, end)
        if self._sealed:
            self._moved.update(zip(np.asarray(entry_ids).tolist(), range(start, end), strict=True))
        self.count = end

    def seal(self) -> None:
        """Index every live row by entry: after a full load, in one sort."""
        rows = np.arange(self.count, dtype=np.int64)
        if len(self.retired):
            rows = np.setdiff1d(rows, self.retired, assume_unique=True)
        order = np.argsort(self.entry_ids[rows], kind="stable")
        self._sorted_entries = self.entry_ids[rows][order]
        self._sorted_rows = rows[order]
        self._moved = {}
        self._sealed = True

    def reserve(self, rows: int) -> None:
        """Room for `rows` more rows, and some to spare (see `GROW_FRACTION`)."""
        wanted = self.count + rows
        if wanted > self.capacity:
            self._grow(wanted + max(GROW_MIN, wanted // GROW_FRACTION))

    def retire_entries(self, entry_ids: Collection[int]) -> None:
        """Retire the live rows of these entries (those that have one)."""
        rows = []
        for entry_id in entry_ids:
            row = self._row_of(entry_id)
            if row >= 0:
                rows.append(row)
                self._moved[entry_id] = -1
        self._retire(np.array(rows, np.int64))

    def retire_bank(self, bank_id: int) -> None:
        """Retire every live row of a bank: a scan of the bank ids, no Python loop over
        rows of other banks."""
        rows = np.flatnonzero(self.bank_ids[: self.count] == bank_id)
        rows = rows[self.view().live(rows)]
        self._moved.update(dict.fromkeys(self.entry_ids[rows].tolist(), -1))
        self._retire(rows)

    def needs_compaction(self) -> bool:
        return len(self.retired) > max(COMPACT_MIN, self.count // COMPACT_FRACTION)

    def compacted(self) -> Self:
        """A new store of this one's live rows, sealed."""
        live = np.flatnonzero(self.view().live(np.arange(self.count)))
        fresh = self._empty(len(live) + max(GROW_MIN, len(live) // GROW_FRACTION))
        fresh.append(self.entry_ids[live], self.bank_ids[live], self.payload[live])
        fresh.seal()
        return fresh

    # Hooks for stores that keep more than the host arrays (a device copy).

    def _empty(self, capacity: int) -> Self:
        """An empty store like this one."""
        return type(self)(self.payload.dtype, self.payload.shape[1:], capacity)

    def _written(self, start: int, end: int) -> None:
        """Rows start..end were just written."""

    def _grow(self, capacity: int) -> None:
        def grown(array: np.ndarray) -> np.ndarray:
            bigger = np.empty((capacity, *array.shape[1:]), array.dtype)
            bigger[: self.count] = array[: self.count]
            return bigger

        self.entry_ids = grown(self.entry_ids)
        self.bank_ids = grown(self.bank_ids)
        self.payload = grown(self.payload)

    def _row_of(self, entry_id: int) -> int:
        if entry_id in self._moved:
            return self._moved[entry_id]
        at = int(np.searchsorted(self._sorted_entries, entry_id))
        if at < len(self._sorted_entries) and self._sorted_entries[at] == entry_id:
            return int(self._sorted_rows[at])
        return -1

    def _retire(self, rows: np.ndarray) -> None:
        if len(rows):
            self.retired = np.union1d(self.retired, rows)


class Sha256Rows(SignalRows):
    """SHA-256 rows, and the rows of each hash (for a lookup per upload). The dict is
    shared with snapshots: a refresh only adds keys and appends rows to their lists (each
    step atomic in CPython), and readers drop rows they do not hold."""

    def __init__(self, capacity: int = 0) -> None:
        super().__init__(np.dtype("V32"), (), capacity)
        self.rows_of_hash: dict[bytes, list[int]] = {}

    def _empty(self, capacity: int) -> Self:
        return type(self)(capacity)

    def _written(self, start: int, end: int) -> None:
        for row, digest in enumerate(self.payload[start:end].tolist(), start):
            self.rows_of_hash.setdefault(digest, []).append(row)
