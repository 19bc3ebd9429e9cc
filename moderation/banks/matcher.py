"""Matching uploads against every enabled bank, exactly.

A `BankIndex` is an immutable snapshot built from the database by a pure function; a
`BankMatcher` holds the current one and swaps in a rebuilt snapshot when the banks'
checkpoint changes, so running workers pick up bank changes without a restart.

- SHA-256: a dictionary lookup.
- PDQ: Faiss `IndexBinaryFlat` range search, Hamming distance <= the threshold.
- CLIP: Faiss `IndexFlatIP` range search. Vectors are unit length, so cosine distance is
  1 - inner product; the search uses the widest radius of any bank and each hit is then
  held to its own bank's radius. Flat indexes are exact: moderation needs full recall.
"""

from __future__ import annotations

import itertools
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

from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
from moderation.embedding.service import vector_from_bytes
from moderation.images.hashing import PDQ_BYTES
from moderation.images.signals import ImageSignals, SignalType

logger = logging.getLogger(__name__)

# Float32 resolves cosine distances to about 1e-7: a vector placed exactly on the radius
# may compute a hair outside it. The radius is held to within this tolerance.
_FLOAT_SLACK = 1e-6
# Faiss scans a flat index query by query below this many queries per call, and with one
# matrix product (BLAS) per block of the bank from it on: one pass over the bank's memory
# for the whole batch. Measured on a 2-core worker, 512-d: from 8 queries BLAS costs 0.29
# ms a query against 0.78 scanning a 10k bank, 4.6 against 15 for 100k; for 1 query it
# costs 2.5 times more. Faiss's default is 20. The setting is process-wide.
BATCHED_SEARCH_FROM = 4
faiss.cvar.distance_compute_blas_threshold = BATCHED_SEARCH_FROM


@dataclass(frozen=True)
class Match:
    bank_entry_id: int
    bank_id: int
    signal: SignalType
    distance: float
    frame_index: int


@dataclass(frozen=True)
class ClipHit:
    bank_entry_id: int
    bank_id: int
    distance: float


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
        pdq: list[tuple[int, bytes]],
        clip: list[tuple[int, np.ndarray, float]],
        dim: int,
    ) -> None:
        self.checkpoint = checkpoint
        self.settings = settings
        self._entry_bank = entry_bank
        self._sha256 = sha256
        self._pdq_ids = np.array([entry_id for entry_id, _ in pdq], dtype=np.int64)
        self._pdq = faiss.IndexBinaryFlat(PDQ_BYTES * 8)
        if pdq:
            self._pdq.add(
                np.frombuffer(b"".join(bits for _, bits in pdq), np.uint8).reshape(-1, PDQ_BYTES)
            )
        self._clip_ids = np.array([entry_id for entry_id, _, _ in clip], dtype=np.int64)
        self._clip_radius = np.array([radius for _, _, radius in clip], dtype=np.float64)
        self._clip = faiss.IndexFlatIP(dim)
        if clip:
            self._clip.add(np.stack([vector for _, vector, _ in clip]).astype(np.float32))
        self._widest_radius = float(self._clip_radius.max()) if clip else 0.0

    @property
    def size(self) -> dict[str, int]:
        return {
            "sha256": sum(len(ids) for ids in self._sha256.values()),
            "pdq": int(self._pdq.ntotal),
            "clip": int(self._clip.ntotal),
        }

    def match(self, signals: ImageSignals, vectors: np.ndarray) -> list[Match]:
        """Every bank entry this image matches, the closest frame per (entry, signal);
        `vectors` are the embeddings of its `embedded_frames`, in order."""
        return self.match_searched(signals, self.search_clip(vectors))

    def search_clip(self, vectors: np.ndarray) -> list[list[ClipHit]]:
        """The CLIP hits of each vector, which may come from many uploads. A search costs
        about one pass over the bank's vectors per call, not per vector (see
        `BATCHED_SEARCH_FROM`), so a worker searches for a whole batch at once."""
        if not len(vectors):
            return []
        if not self._clip.ntotal:
            return [[] for _ in vectors]
        _single_threaded_faiss()
        threshold = 1.0 - self._widest_radius - _FLOAT_SLACK
        limits, similarities, rows = self._clip.range_search(
            np.ascontiguousarray(vectors, np.float32), threshold
        )
        hits: list[list[ClipHit]] = []
        for start, stop in itertools.pairwise(limits):
            hits.append([])
            for row, similarity in zip(rows[start:stop], similarities[start:stop], strict=True):
                distance = max(0.0, 1.0 - float(similarity))
                if distance <= self._clip_radius[row] + _FLOAT_SLACK:
                    entry_id = int(self._clip_ids[row])
                    hits[-1].append(ClipHit(entry_id, self._entry_bank[entry_id], distance))
        return hits

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


def load_index(session: Session, model_id: int, dim: int, settings: MatchSettings) -> BankIndex:
    """Build a snapshot of every entry of every enabled bank. Reads; writes nothing."""
    # Read the checkpoint first: a change that lands mid-build is then seen on the next check.
    checkpoint = bank_checkpoint(session, model_id)
    entries = session.execute(
        select(
            BankEntry.id, BankEntry.bank_id, BankEntry.sha256, BankEntry.pdq, BankEntry.pdq_quality
        )
        .join(Bank)
        .where(Bank.enabled)
    )
    entry_bank: dict[int, int] = {}
    sha256: dict[bytes, list[int]] = {}
    pdq: list[tuple[int, bytes]] = []
    for entry_id, bank_id, sha, pdq_bits, quality in entries:
        entry_bank[entry_id] = bank_id
        if sha is not None:
            sha256.setdefault(sha, []).append(entry_id)
        if pdq_bits is not None and (quality is None or quality >= settings.pdq_min_quality):
            pdq.append((entry_id, pdq_bits))
    vectors = session.execute(
        select(BankEntryEmbedding.bank_entry_id, BankEntryEmbedding.vector, Bank.radius)
        .join(BankEntry, BankEntry.id == BankEntryEmbedding.bank_entry_id)
        .join(Bank, Bank.id == BankEntry.bank_id)
        .where(Bank.enabled, BankEntryEmbedding.model_id == model_id)
    )
    clip = [
        (entry_id, vector_from_bytes(vector), settings.default_radius if radius is None else radius)
        for entry_id, vector, radius in vectors
    ]
    return BankIndex(checkpoint, settings, entry_bank, sha256, pdq, clip, dim)


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
    ) -> None:
        self._sessions = sessions
        self._model_id = model_id
        self._dim = dim
        self._settings = settings
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        with sessions() as session:
            self._index = load_index(session, model_id, dim, settings)

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
                self._index = load_index(session, self._model_id, self._dim, self._settings)
                logger.info(
                    "bank index rebuilt in %.3f s: %s", time.monotonic() - started, self._index.size
                )
        self._checked_at = checked_at
