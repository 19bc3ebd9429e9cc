"""Exact PDQ range search over up to millions of hashes: multi-index hashing.

A 256-bit hash is cut into 16 substrings of 16 bits. If two hashes differ in at most t
bits, some substring differs in at most floor(t / 16) of them (were all 16 to differ in
more, the hashes would differ in at least 16 * (floor(t / 16) + 1) > t). So the rows
within t bits of a query are among those that share, in some position, a substring
within floor(t / 16) bits of the query's: at the industry threshold of 31, within one bit,
17 values per position. Each position's rows are kept sorted by their substring (with the
offset of every value), so a probe is two array reads and its rows a contiguous slice;
the candidates' full distances are then computed and held to t. Exact by construction,
whatever the hashes: `tests/test_pdq_search.py` places entries at 31 and 32 bits whose
only close substring is each position in turn.

Measured by `bench/matching.py` (see its PDQ section) against ThreatExchange's `PDQIndex`
(Faiss's `IndexBinaryMultiHash` with the same 16 x 16 bits) and Faiss's brute-force
`hamming_range_search`, which this project used before.

An index covers the rows of a store when it was built (`PdqRows` builds one after a full
load and after compaction); rows appended since are scanned by brute force until they are
numerous enough to build it anew. An index never changes once built, so snapshots share it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Self

import faiss
import numpy as np

from moderation.banks.rows import RowsView, SignalRows
from moderation.images.hashing import PDQ_BYTES

SUBSTRINGS = 16
SUBSTRING_BITS = 256 // SUBSTRINGS
_VALUES = 1 << SUBSTRING_BITS
# Beyond this many flipped bits per substring (threshold >= 32), probing costs more than
# scanning: at 2 flips, 137 values a position, 16 x 137 x n / 65,536 candidates (3% of
# n, fetched from memory one by one), measured at a million rows on a busy machine: 22 ms
# a query against 7 for the scan. The industry threshold, 31, is the last at 1 flip.
MAX_FLIPS = 1
# Rows appended since the index was built are scanned by brute force (1.3 ns a row); the
# index is built anew once they are more than 1/TAIL_FRACTION of those it covers and more
# than TAIL_MIN (building costs about 0.8 s a million rows).
TAIL_FRACTION = 8
TAIL_MIN = 65_536
# Below this many rows a scan is as fast (measured, one query: 50,000 rows 0.071 ms
# scanned, 0.079 indexed; 100,000: 0.12 and 0.10; a million 1.1 and 0.3-0.5, where the
# index's cost is mostly fetching its 4,000 candidates' hashes from memory).
INDEXED_FROM = 65_536
_QUERIES_PER_PROBE = 8


@dataclass(frozen=True)
class PdqIndex:
    """The first `count` rows of a store, indexed by their substrings (see the module)."""

    count: int
    # For each position, the rows sorted by their substring there, and where each value's
    # rows start: rows[p, offsets[p, v] : offsets[p, v + 1]] have substring v at p.
    rows: np.ndarray  # (SUBSTRINGS, count) int32
    offsets: np.ndarray  # (SUBSTRINGS, _VALUES + 1) int64

    @classmethod
    def build(cls, hashes: np.ndarray) -> PdqIndex:
        """`hashes`: (n, PDQ_BYTES) uint8, most significant byte first."""
        words = _substrings(hashes)
        count = len(hashes)
        rows = np.empty((SUBSTRINGS, count), np.int32)
        offsets = np.zeros((SUBSTRINGS, _VALUES + 1), np.int64)
        for position in range(SUBSTRINGS):
            values = words[:, position]
            rows[position] = np.argsort(values, kind="stable")  # a radix sort for uint16
            np.cumsum(np.bincount(values, minlength=_VALUES), out=offsets[position, 1:])
        return cls(count, rows, offsets)

    def candidates(self, queries: np.ndarray, flips: int) -> tuple[np.ndarray, np.ndarray]:
        """(query, row) pairs that share a substring within `flips` bits, with repeats."""
        masks = _flip_masks(flips)
        # (queries, positions, masks): every probed value of every position.
        # As int64: value + 1 must not wrap at 65,535.
        probed = (_substrings(queries)[:, :, None] ^ masks[None, None, :]).astype(np.int64)
        positions = np.arange(SUBSTRINGS)[None, :, None]
        starts = self.offsets[positions, probed].ravel()
        ends = self.offsets[positions, probed + 1].ravel()
        lengths = ends - starts
        total = int(lengths.sum())
        if not total:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        # Each probe's slice of rows, concatenated: row p * count + start + k for k < length.
        flat_starts = starts + np.broadcast_to(positions * self.count, probed.shape).ravel()
        before = np.cumsum(lengths) - lengths
        at = np.repeat(flat_starts - before, lengths) + np.arange(total)
        per_query = lengths.reshape(len(queries), -1).sum(axis=1)
        query_rows = np.repeat(np.arange(len(queries), dtype=np.int64), per_query)
        return query_rows, self.rows.ravel()[at].astype(np.int64)


def search(
    queries: np.ndarray, hashes: np.ndarray, threshold: int, index: PdqIndex | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query, row, distance) with the row of `hashes` within `threshold` bits of the
    query, in query then row order. `index` covers the first `index.count` rows (those
    past it are scanned); None, or a threshold past `MAX_FLIPS` per substring: all are."""
    queries = np.ascontiguousarray(queries, np.uint8).reshape(-1, PDQ_BYTES)
    flips = threshold // SUBSTRINGS
    indexed = index.count if index is not None and flips <= MAX_FLIPS else 0
    parts = []
    if indexed:
        assert index is not None
        # A few queries at a time: their candidates' hashes (4,000 a query at a million
        # rows) stay in cache. Measured at 1M, 1,000 queries: 0.53 ms a query at once.
        for first in range(0, len(queries), _QUERIES_PER_PROBE):
            chunk = queries[first : first + _QUERIES_PER_PROBE]
            query_rows, rows = index.candidates(chunk, flips)
            distances = _distances(chunk[query_rows], hashes[rows])
            close = distances <= threshold
            unique = _unique(query_rows[close] + first, rows[close], distances[close], indexed)
            parts.append(unique)
    if indexed < len(hashes):
        parts.append(_scanned(queries, hashes[indexed:], threshold, indexed))
    query_rows, rows, distances = (np.concatenate(column) for column in zip(*parts, strict=True))
    order = np.lexsort((rows, query_rows))
    return query_rows[order], rows[order], distances[order]


def _unique(
    query_rows: np.ndarray, rows: np.ndarray, distances: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A row found through several positions, once."""
    _, first = np.unique(query_rows * count + rows, return_index=True)
    return query_rows[first], rows[first], distances[first]


def _scanned(
    queries: np.ndarray, hashes: np.ndarray, threshold: int, first_row: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Faiss's brute-force scan (SIMD popcounts) over `hashes`, rows numbered from
    `first_row`."""
    if not len(hashes):
        return (np.empty(0, np.int64),) * 3
    hashes = np.ascontiguousarray(hashes)
    faiss.omp_set_num_threads(1)  # a few queries: a thread team would only cost (see index)
    result = faiss.RangeSearchResult(len(queries))
    # Faiss keeps distances strictly below the radius. (Its type stubs lack this function.)
    faiss.hamming_range_search(  # type: ignore[attr-defined]
        faiss.swig_ptr(queries),
        faiss.swig_ptr(hashes),
        len(queries),
        len(hashes),
        threshold + 1,
        PDQ_BYTES,
        result,
    )
    limits = faiss.rev_swig_ptr(result.lims, len(queries) + 1).astype(np.int64)
    found = int(limits[-1])
    distances = faiss.rev_swig_ptr(result.distances, found).astype(np.int64)
    rows = faiss.rev_swig_ptr(result.labels, found).astype(np.int64) + first_row
    query_rows = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(limits))
    return query_rows, rows, distances


def _substrings(hashes: np.ndarray) -> np.ndarray:
    """(n, SUBSTRINGS) uint16: each hash's substrings, most significant first."""
    return np.ascontiguousarray(hashes).view(">u2").astype(np.uint16).reshape(-1, SUBSTRINGS)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between rows of two (n, PDQ_BYTES) uint8 arrays."""
    xor = np.ascontiguousarray(a).view(np.uint64) ^ np.ascontiguousarray(b).view(np.uint64)
    distances: np.ndarray = np.bitwise_count(xor).sum(axis=1, dtype=np.int64)
    return distances


@lru_cache(maxsize=MAX_FLIPS + 1)
def _flip_masks(flips: int) -> np.ndarray:
    """Every SUBSTRING_BITS-bit mask of at most `flips` bits."""
    masks = [0]
    for count in range(1, flips + 1):
        for bits in itertools.combinations(range(SUBSTRING_BITS), count):
            masks.append(sum(1 << bit for bit in bits))
    return np.array(masks, np.uint16)


@dataclass(frozen=True)
class PdqSnapshot:
    """What one snapshot sees of the PDQ rows, and the index over the first of them."""

    rows: RowsView
    index: PdqIndex | None

    def __len__(self) -> int:
        return len(self.rows)

    def search(
        self, queries: np.ndarray, threshold: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query, row, distance) of every live row within `threshold` bits."""
        query_rows, rows, distances = search(queries, self.rows.payload, threshold, self.index)
        held = self.rows.live(rows)
        return query_rows[held], rows[held], distances[held]


class PdqRows(SignalRows):
    """PDQ hashes of bank entries (32 bytes a row), with a multi-index over them once they
    are `INDEXED_FROM` or more: built when the store is sealed (after a full load, and by
    compaction), and anew once enough rows were appended since (see `TAIL_FRACTION`)."""

    def __init__(self, capacity: int = 0) -> None:
        super().__init__(np.uint8, (PDQ_BYTES,), capacity)
        self.index: PdqIndex | None = None

    def snapshot(self) -> PdqSnapshot:
        return PdqSnapshot(self.view(), self.index)

    def seal(self) -> None:
        super().seal()
        self._build()

    def _written(self, start: int, end: int) -> None:
        indexed = self.index.count if self.index is not None else 0
        if self._sealed and end - indexed > max(TAIL_MIN, indexed // TAIL_FRACTION):
            self._build(end)

    def _build(self, count: int | None = None) -> None:
        count = self.count if count is None else count
        self.index = PdqIndex.build(self.payload[:count]) if count >= INDEXED_FROM else None

    def _empty(self, capacity: int) -> Self:
        return type(self)(capacity)
