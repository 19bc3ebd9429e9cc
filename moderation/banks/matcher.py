"""Matching uploads against every enabled bank, exactly.

A `BankIndex` is an immutable snapshot built from the database by a pure function; a
`BankMatcher` holds the current one and swaps in a rebuilt snapshot when the banks'
checkpoint changes, so running workers pick up bank changes without a restart.

- SHA-256: a dictionary lookup.
- PDQ: Faiss `IndexBinaryFlat` range search, Hamming distance <= the threshold.
- CLIP: a `ClipBank`. Vectors are unit length, so cosine distance is 1 - inner product.
  Candidates come from a matrix product on the worker's device, kept with a proven margin
  below the widest radius of any bank; every candidate is then checked exactly and held
  to its own bank's radius. Moderation needs full recall: nothing is approximate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import faiss
import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation import pg_copy
from moderation.banks.clip_search import ClipBank
from moderation.banks.clip_search import ClipHit as ClipHit  # in `search_clip`'s signature
from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
from moderation.images.hashing import PDQ_BYTES
from moderation.images.signals import ImageSignals, SignalType

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    bank_entry_id: int
    bank_id: int
    signal: SignalType
    distance: float
    frame_index: int


@dataclass(frozen=True)
class MatchSettings:
    default_radius: float
    pdq_threshold: int
    pdq_min_quality: int


Checkpoint = tuple[object, ...]


def bank_checkpoint(session: Session, model_id: int) -> Checkpoint:
    """Changes whenever anything a snapshot is built from changes."""
    banks = select(func.count(Bank.id), func.max(Bank.updated_at))
    entries = select(
        func.count(BankEntry.id), func.max(BankEntry.id), func.max(BankEntry.updated_at)
    )
    vectors = select(func.count(BankEntryEmbedding.id), func.max(BankEntryEmbedding.id)).where(
        BankEntryEmbedding.model_id == model_id
    )
    return (
        *session.execute(banks).one(),
        *session.execute(entries).one(),
        *session.execute(vectors).one(),
    )


class BankIndex:
    def __init__(
        self,
        checkpoint: Checkpoint,
        settings: MatchSettings,
        entry_bank: dict[int, int],
        sha256: dict[bytes, list[int]],
        pdq_ids: np.ndarray,
        pdq_bits: np.ndarray,
        clip: ClipBank,
    ) -> None:
        """`pdq_bits`: one row of PDQ_BYTES (uint8) per entry of `pdq_ids`."""
        self.checkpoint = checkpoint
        self.settings = settings
        self._entry_bank = entry_bank
        self._sha256 = sha256
        self._pdq_ids = pdq_ids
        self._pdq = faiss.IndexBinaryFlat(PDQ_BYTES * 8)
        if len(pdq_ids):
            self._pdq.add(np.ascontiguousarray(pdq_bits, np.uint8).reshape(-1, PDQ_BYTES))
        self.clip = clip

    @property
    def size(self) -> dict[str, int]:
        return {
            "sha256": sum(len(ids) for ids in self._sha256.values()),
            "pdq": int(self._pdq.ntotal),
            "clip": len(self.clip),
        }

    def match(self, signals: ImageSignals, vectors: np.ndarray) -> list[Match]:
        """Every bank entry this image matches, the closest frame per (entry, signal);
        `vectors` are the embeddings of its `embedded_frames`, in order."""
        return self.match_searched(signals, self.search_clip(vectors))

    def search_clip(self, vectors: np.ndarray) -> list[list[ClipHit]]:
        """The CLIP hits of each vector, which may come from many uploads. A search costs
        about one pass over the bank's vectors per call, not per vector, so a worker
        searches for a whole batch at once (see `moderation.banks.clip_search`)."""
        return self.clip.search(vectors)

    def match_searched(
        self, signals: ImageSignals, clip_hits: Sequence[Sequence[ClipHit]]
    ) -> list[Match]:
        """`match`, given the `search_clip` hits of the image's embedded frames, in order."""
        _single_threaded_faiss()
        found: list[Match] = [
            Match(entry_id, self._entry_bank[entry_id], SignalType.SHA256, 0.0, 0)
            for entry_id in self._sha256.get(signals.sha256, ())
        ]
        found += self._match_pdq(signals)
        found += [
            Match(hit.bank_entry_id, hit.bank_id, SignalType.CLIP, hit.distance, frame.index)
            for frame, frame_hits in zip(signals.embedded_frames, clip_hits, strict=True)
            for hit in frame_hits
        ]
        return _closest_per_entry(found)

    def _match_pdq(self, signals: ImageSignals) -> Iterable[Match]:
        hashed = [(frame.index, frame.pdq) for frame in signals.frames]
        if signals.pdq_as_stored is not None:
            hashed.append((0, signals.pdq_as_stored))
        queried = [
            (index, pdq)
            for index, pdq in hashed
            if pdq.quality is None or pdq.quality >= self.settings.pdq_min_quality
        ]
        if not queried or not self._pdq.ntotal:
            return []
        queries = np.frombuffer(b"".join(pdq.bits for _, pdq in queried), np.uint8).reshape(
            -1, PDQ_BYTES
        )
        # Faiss keeps distances strictly below the radius.
        limits, distances, rows = self._pdq.range_search(queries, self.settings.pdq_threshold + 1)
        return [
            Match(
                int(entry_id),
                self._entry_bank[int(entry_id)],
                SignalType.PDQ,
                float(distance),
                index,
            )
            for (index, _), start, stop in zip(queried, limits[:-1], limits[1:], strict=True)
            for entry_id, distance in zip(
                self._pdq_ids[rows[start:stop]], distances[start:stop], strict=True
            )
        ]


_faiss_threads = threading.local()


def _single_threaded_faiss() -> None:
    """Keep Faiss to the calling thread. Its OpenMP thread count is per calling thread, and
    by default each of a worker's many task threads would get its own team, one spinning
    helper thread per core, to split a search of one image's few queries. Measured on a
    2-core worker: 32 extra threads and 1.3 ms of CPU per upload, for nothing."""
    if not getattr(_faiss_threads, "single", False):
        faiss.omp_set_num_threads(1)
        _faiss_threads.single = True


def _closest_per_entry(matches: list[Match]) -> list[Match]:
    best: dict[tuple[int, SignalType], Match] = {}
    for match in matches:
        key = (match.bank_entry_id, match.signal)
        if key not in best or match.distance < best[key].distance:
            best[key] = match
    return list(best.values())


def load_index(
    session: Session, model_id: int, dim: int, settings: MatchSettings, device: str = "cpu"
) -> BankIndex:
    """Build a snapshot of every entry of every enabled bank. Reads; writes nothing.
    `device`: where CLIP vectors are scored (see `ClipBank`)."""
    # Read the checkpoint first: a change that lands mid-build is then seen on the next check.
    checkpoint = bank_checkpoint(session, model_id)
    entry_bank, sha256, pdq_ids, pdq_bits = _load_hashes(session, settings.pdq_min_quality)
    clip = _load_clip(session, model_id, dim, settings.default_radius, device)
    return BankIndex(checkpoint, settings, entry_bank, sha256, pdq_ids, pdq_bits, clip)


# Both loads read by binary COPY (see `moderation.pg_copy`) into arrays, the vectors into
# one preallocated float32 array. `bench/matching.py --load` on a 2-core machine shared
# with other jobs, 768-d: 100,000 entries in 2.1 s, peak RSS 405 MB above the process's
# (the vectors are 293 MB), where building lists of rows, stacking them and adding them
# to Faiss took 5.6 s and 975 MB; 1,000,000 in 20-31 s, peak 3.2 GB above (2.9 GB of
# vectors): PostgreSQL producing the rows about 8 s of it, filling the array 5, its norms 2.


def _load_hashes(
    session: Session, pdq_min_quality: int
) -> tuple[dict[int, int], dict[bytes, list[int]], np.ndarray, np.ndarray]:
    """Entry -> bank, SHA-256 -> entries, and the PDQ hashes good enough to match on."""
    no_hash = func.decode(func.repeat("00", 32), "hex")  # NULLs have no place in fixed rows
    query = (
        select(
            BankEntry.id,
            BankEntry.bank_id,
            BankEntry.sha256.is_not(None),
            func.coalesce(BankEntry.sha256, no_hash),
            BankEntry.pdq.is_not(None)
            & (BankEntry.pdq_quality.is_(None) | (BankEntry.pdq_quality >= pdq_min_quality)),
            func.coalesce(BankEntry.pdq, no_hash),
        )
        .join(Bank)
        .where(Bank.enabled)
    )
    fields = [
        ("id", ">i8"),
        ("bank_id", ">i8"),
        ("has_sha256", "?"),
        ("sha256", "V32"),
        ("has_pdq", "?"),
        ("pdq", (np.uint8, PDQ_BYTES)),
    ]
    entry_bank: dict[int, int] = {}
    sha256: dict[bytes, list[int]] = {}
    pdq_ids: list[np.ndarray] = [np.empty(0, np.int64)]
    pdq_bits: list[np.ndarray] = [np.empty((0, PDQ_BYTES), np.uint8)]

    def add(rows: np.ndarray) -> None:
        entry_bank.update(zip(rows["id"].tolist(), rows["bank_id"].tolist(), strict=True))
        for row in rows[rows["has_sha256"]]:
            sha256.setdefault(row["sha256"].tobytes(), []).append(int(row["id"]))
        pdq_ids.append(rows["id"][rows["has_pdq"]].astype(np.int64))
        pdq_bits.append(rows["pdq"][rows["has_pdq"]])

    pg_copy.copy_out(session, query, fields, add)
    return entry_bank, sha256, np.concatenate(pdq_ids), np.concatenate(pdq_bits)


def _load_clip(
    session: Session, model_id: int, dim: int, default_radius: float, device: str
) -> ClipBank:
    """The embeddings of enabled banks' entries, streamed into one preallocated float32
    array: the bank is held once, never as a list of rows and then a copy of it."""
    of_enabled = (
        select(BankEntryEmbedding.bank_entry_id)
        .join(BankEntry, BankEntry.id == BankEntryEmbedding.bank_entry_id)
        .join(Bank, Bank.id == BankEntry.bank_id)
        .where(Bank.enabled, BankEntryEmbedding.model_id == model_id)
    )
    # The stream takes rows of one width (the length of a stored value is read without
    # reading the value). Entries committed between this count and the stream are
    # appended by growing the arrays.
    other_width = func.octet_length(BankEntryEmbedding.vector) != 4 * dim
    capacity, malformed = session.execute(
        select(func.count(), func.min(BankEntryEmbedding.bank_entry_id).filter(other_width))
        .join(BankEntry, BankEntry.id == BankEntryEmbedding.bank_entry_id)
        .join(Bank, Bank.id == BankEntry.bank_id)
        .where(Bank.enabled, BankEntryEmbedding.model_id == model_id)
    ).one()
    if malformed is not None:
        length = session.scalar(
            select(func.octet_length(BankEntryEmbedding.vector)).where(
                BankEntryEmbedding.bank_entry_id == malformed,
                BankEntryEmbedding.model_id == model_id,
            )
        )
        raise ValueError(
            f"bank entry {malformed} has a {(length or 0) // 4}-d embedding for model "
            f"{model_id}, which is {dim}-d"
        )
    loaded = _VectorRows(capacity or 0, dim)
    pg_copy.copy_out(
        session,
        of_enabled.add_columns(
            BankEntry.bank_id,
            BankEntryEmbedding.vector,
            func.coalesce(Bank.radius, default_radius),
        ),
        [("entry_id", ">i8"), ("bank_id", ">i8"), ("vector", ("<f4", dim)), ("radius", ">f8")],
        loaded.append,
    )
    return ClipBank(*loaded.arrays(), device=device)


class _VectorRows:
    """Bank rows appended one at a time into preallocated arrays, grown if need be."""

    def __init__(self, capacity: int, dim: int) -> None:
        self.count = 0
        self.entry_ids = np.empty(capacity, np.int64)
        self.bank_ids = np.empty(capacity, np.int64)
        self.radii = np.empty(capacity, np.float64)
        self.vectors = np.empty((capacity, dim), np.float32)

    def append(self, rows: np.ndarray) -> None:
        """Rows with fields entry_id, bank_id, radius and vector."""
        end = self.count + len(rows)
        if end > len(self.vectors):
            grown = max(end, self.count + self.count // 4)
            self.entry_ids = np.resize(self.entry_ids, grown)
            self.bank_ids = np.resize(self.bank_ids, grown)
            self.radii = np.resize(self.radii, grown)
            self.vectors = np.resize(self.vectors, (grown, self.vectors.shape[1]))
        self.entry_ids[self.count : end] = rows["entry_id"]
        self.bank_ids[self.count : end] = rows["bank_id"]
        self.radii[self.count : end] = rows["radius"]
        self.vectors[self.count : end] = rows["vector"]
        self.count = end

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Entry ids, bank ids, vectors and radii of the rows appended (views, not copies)."""
        n = self.count
        return self.entry_ids[:n], self.bank_ids[:n], self.vectors[:n], self.radii[:n]


class BankMatcher:
    """The current `BankIndex` for one model, rebuilt when the banks change.

    Once `refresh_s` has passed since the last check, the next caller checks the
    checkpoint (a cheap query) and rebuilds if it moved. Callers that arrive meanwhile wait
    for that check rather than match against a snapshot that may lack an entry committed
    before their upload arrived.
    """

    def __init__(
        self,
        sessions: Callable[[], AbstractContextManager[Session]],
        *,
        model_id: int,
        dim: int,
        settings: MatchSettings,
        refresh_s: float,
        device: str = "cpu",
    ) -> None:
        """`device`: where CLIP vectors are scored, the worker's (`Settings.resolved_device`)."""
        self._sessions = sessions
        self._model_id = model_id
        self._dim = dim
        self._settings = settings
        self._refresh_s = refresh_s
        self._device = device
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        with sessions() as session:
            self._index = load_index(session, model_id, dim, settings, device)

    def current(self) -> BankIndex:
        if self._is_stale():
            with self._lock:
                if self._is_stale():  # not already refreshed by the thread we waited for
                    self._refresh()
        return self._index

    def _is_stale(self) -> bool:
        return time.monotonic() - self._checked_at >= self._refresh_s

    def _refresh(self) -> None:
        # Everything committed before this moment is in the index once the check is done.
        checked_at = time.monotonic()
        with self._sessions() as session:
            if bank_checkpoint(session, self._model_id) != self._index.checkpoint:
                started = time.monotonic()
                self._index = load_index(
                    session, self._model_id, self._dim, self._settings, self._device
                )
                logger.info(
                    "bank index rebuilt in %.3f s: %s", time.monotonic() - started, self._index.size
                )
        self._checked_at = checked_at
