"""Exact PDQ range search by multi-index hashing: exact by construction at every threshold,
against a brute-force reference, whatever the substring that holds the match."""

from __future__ import annotations

import numpy as np
import pytest

from moderation.banks import pdq_search
from moderation.banks.pdq_search import SUBSTRING_BITS, SUBSTRINGS, PdqIndex, PdqRows, search

rng = np.random.default_rng(3)
QUERY = rng.integers(0, 256, 32, dtype=np.uint8)


def _flipped(base: np.ndarray, per_substring: list[int], seed: int) -> np.ndarray:
    """`base` with the given number of bits flipped in each 16-bit substring."""
    bits = np.unpackbits(base).copy()
    chooser = np.random.default_rng(seed)
    for position, count in enumerate(per_substring):
        start = position * SUBSTRING_BITS
        chosen = chooser.choice(SUBSTRING_BITS, count, replace=False)
        bits[start + chosen] ^= 1
    return np.packbits(bits)


def _distance(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits(a ^ b).sum())


def _hard_entries() -> tuple[np.ndarray, dict[int, int]]:
    """For every substring position p: entries at 31 bits whose only substring within one
    bit of the query's is p's (1 bit there, 2 in each other), one at 31 with p's equal (0
    there), and one at 32 bits (2 in every substring, none within one bit). Returns the
    hashes and each row's distance."""
    entries = []
    for position in range(SUBSTRINGS):
        only_one = [2] * SUBSTRINGS
        only_one[position] = 1
        entries.append(_flipped(QUERY, only_one, seed=position))
        equal_there = [2] * SUBSTRINGS
        equal_there[position] = 0
        equal_there[(position + 1) % SUBSTRINGS] = 3
        entries.append(_flipped(QUERY, equal_there, seed=100 + position))
        entries.append(_flipped(QUERY, [2] * SUBSTRINGS, seed=200 + position))
    hashes = np.stack(entries)
    return hashes, {row: _distance(QUERY, h) for row, h in enumerate(hashes)}


def _reference(
    queries: np.ndarray, hashes: np.ndarray, threshold: int
) -> set[tuple[int, int, int]]:
    xor = np.unpackbits(queries[:, None, :] ^ hashes[None, :, :], axis=2).sum(axis=2)
    return {
        (int(q), int(r), int(xor[q, r])) for q, r in zip(*np.nonzero(xor <= threshold), strict=True)
    }


def _found(result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> set[tuple[int, int, int]]:
    return set(zip(*(column.tolist() for column in result), strict=True))


def test_entries_at_31_bits_are_found_through_each_substring_and_32_never() -> None:
    hashes, distances = _hard_entries()
    assert sorted(set(distances.values())) == [31, 32]
    index = PdqIndex.build(hashes)
    query_rows, rows, found = search(QUERY[None, :], hashes, 31, index)
    assert set(rows.tolist()) == {row for row, d in distances.items() if d == 31}
    assert len(rows) == 2 * SUBSTRINGS  # each once, though found through several positions
    assert found.tolist() == [31] * len(rows)
    assert set(query_rows.tolist()) == {0}
    # At 32 (two flips per substring probed) the others too.
    assert len(search(QUERY[None, :], hashes, 32, index)[1]) == 3 * SUBSTRINGS


def test_without_the_flipped_probes_the_hard_entries_would_be_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The test above needs the probes one bit away: with exact substring lookups only,
    the entries whose one close substring is one bit off are lost."""
    hashes, _ = _hard_entries()
    monkeypatch.setattr(pdq_search, "_flip_masks", lambda flips: np.zeros(1, np.uint16))
    rows = search(QUERY[None, :], hashes, 31, PdqIndex.build(hashes))[1]
    assert len(rows) == SUBSTRINGS  # only those with an equal substring


@pytest.mark.parametrize("threshold", [0, 1, 15, 16, 31, 32, 40, 47, 48, 70, 256])
def test_every_threshold_finds_exactly_the_brute_force_pairs(threshold: int) -> None:
    """Random hashes, and near copies of the queries at every distance up to 72 bits,
    configured thresholds on both sides of each multiple of 16 (and past MAX_FLIPS)."""
    queries = rng.integers(0, 256, (5, 32), dtype=np.uint8)
    near = [
        _flipped(
            queries[i % 5],
            list(rng.multinomial(d, [1 / SUBSTRINGS] * SUBSTRINGS).clip(0, 16)),
            seed=d * 7 + i,
        )
        for i, d in enumerate(range(0, 73))
    ]
    hashes = np.concatenate([rng.integers(0, 256, (3000, 32), dtype=np.uint8), np.stack(near)])
    hashes = hashes[rng.permutation(len(hashes))]
    expected = _reference(queries, hashes, threshold)
    assert _found(search(queries, hashes, threshold, PdqIndex.build(hashes))) == expected
    # Half indexed, the rest scanned (rows appended since the index was built).
    assert _found(search(queries, hashes, threshold, PdqIndex.build(hashes[:1500]))) == expected
    assert _found(search(queries, hashes, threshold, None)) == expected


def test_results_come_in_query_then_row_order() -> None:
    hashes, _ = _hard_entries()
    queries = np.stack([QUERY, hashes[5], QUERY])
    query_rows, rows, _ = search(queries, hashes, 31, PdqIndex.build(hashes[:20]))
    pairs = list(zip(query_rows.tolist(), rows.tolist(), strict=True))
    assert pairs == sorted(pairs)
    assert {q for q, _ in pairs} == {0, 1, 2}


def test_the_store_indexes_when_sealed_and_again_once_its_tail_grows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pdq_search, "TAIL_MIN", 10)
    monkeypatch.setattr(pdq_search, "INDEXED_FROM", 15)
    hashes, distances = _hard_entries()
    store = PdqRows()
    store.append(np.arange(20), np.zeros(20, np.int64), hashes[:20])
    assert store.index is None  # not yet sealed: scanned
    store.seal()
    first = store.snapshot()
    assert first.index is not None
    assert first.index.count == 20
    store.append(np.arange(20, 30), np.zeros(10, np.int64), hashes[20:30])
    assert store.index is first.index  # a tail of 10: scanned
    store.append(np.arange(30, 48), np.zeros(18, np.int64), hashes[30:])
    assert store.index is not None
    assert store.index.count == 48  # a tail of 28, past the minimum: indexed anew
    assert first.index.count == 20  # the old snapshot keeps its own
    small = PdqRows()
    small.append(np.arange(14), np.zeros(14, np.int64), hashes[:14])
    small.seal()
    assert small.index is None  # below INDEXED_FROM: scanned
    store.retire_entries([0, 1, 2])
    snapshot = store.snapshot()
    _, rows, _ = snapshot.search(QUERY[None, :], 31)
    assert set(rows.tolist()) == {r for r, d in distances.items() if d <= 31} - {0, 1, 2}
    _, rows, _ = first.search(QUERY[None, :], 31)
    assert set(rows.tolist()) == {r for r, d in distances.items() if d <= 31 and r < 20}
