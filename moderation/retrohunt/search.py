"""The exact search of a retro-hunt: a job's bank entries against a block of past uploads,
matched as screening matches them (`moderation.banks.matcher`), from the signals and
embeddings screening stored.

- SHA-256: a join on the `(signal, value)` index of `signals`.
- PDQ: Faiss `IndexBinaryFlat` range search over the entries' hashes, Hamming distance
  <= `pdq_threshold`; hashes of either side below `pdq_min_quality` are not matched.
  Hamming distances are integers, so this is exact.
- CLIP: the entries' vectors as a `ClipBank`, searched with the uploads' stored vectors
  of the same model: blocked matrix products for candidates with a proven margin, then
  each candidate's distance in float64, held to the bank's radius with the same slack as
  screening. An upload at a placed distance hits or misses exactly as it would have at
  screening, and its hit records the same distance.

Each hit keeps the closest frame per (upload, entry, signal), as screening does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from moderation import pg_copy
from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
from moderation.embedding.models import Embedding, EmbeddingModel
from moderation.images.hashing import PDQ_BYTES
from moderation.images.signals import SignalType
from moderation.screening.models import Signal

if TYPE_CHECKING:
    # Faiss and torch (behind ClipBank) are imported where a hunt runs, not with the
    # banks service every command imports: `moderation --version` took 2.6 s with them.
    from moderation.banks.clip_search import ClipBank

# Which uploads a search covers: a condition on an `upload_id` column.
UploadFilter = Callable[[InstrumentedAttribute[int]], ColumnElement[bool]]


@dataclass(frozen=True)
class FoundHit:
    upload_id: int
    bank_entry_id: int
    signal: SignalType
    distance: float
    frame_index: int
    model_id: int | None
    # What the distance was held to, as screening records it (`banks.index.Match`).
    threshold: float


@dataclass(frozen=True)
class HuntSettings:
    default_radius: float
    pdq_threshold: int
    pdq_min_quality: int


class Targets:
    """A job's entries, loaded once and searched block after block of uploads."""

    def __init__(
        self,
        session: Session,
        bank: Bank,
        first_entry_id: int,
        last_entry_id: int,
        settings: HuntSettings,
    ) -> None:
        self.settings = settings
        self._bank_id = bank.id
        self._first, self._last = first_entry_id, last_entry_id
        in_job = (
            (BankEntry.bank_id == bank.id)
            & (BankEntry.id >= first_entry_id)
            & (BankEntry.id <= last_entry_id)
        )
        self._in_job = in_job
        self._has_sha256 = bool(
            session.scalar(
                select(BankEntry.id).where(in_job, BankEntry.sha256.is_not(None)).limit(1)
            )
        )
        pdq_rows: list[tuple[int, bytes]] = session.execute(  # type: ignore[assignment]
            select(BankEntry.id, BankEntry.pdq).where(
                in_job,
                BankEntry.pdq.is_not(None),
                BankEntry.pdq_quality.is_(None)
                | (BankEntry.pdq_quality >= settings.pdq_min_quality),
            )
        ).all()
        import faiss

        self._pdq_ids = np.array([row[0] for row in pdq_rows], np.int64)
        self._pdq = faiss.IndexBinaryFlat(PDQ_BYTES * 8)
        if pdq_rows:
            bits = np.frombuffer(b"".join(row[1] for row in pdq_rows), np.uint8)
            self._pdq.add(bits.reshape(-1, PDQ_BYTES))
        radius = bank.radius if bank.radius is not None else settings.default_radius
        self._clip: dict[int, ClipBank] = {}
        models = session.execute(
            select(EmbeddingModel.id, EmbeddingModel.dim)
            .where(
                EmbeddingModel.id.in_(
                    select(BankEntryEmbedding.model_id)
                    .join(BankEntry, BankEntry.id == BankEntryEmbedding.bank_entry_id)
                    .where(in_job)
                    .distinct()
                )
            )
            .order_by(EmbeddingModel.id)
        ).all()
        for model_id, dim in models:
            self._clip[model_id] = _entry_vectors(session, in_job, model_id, dim, bank.id, radius)

    @property
    def size(self) -> dict[str, int]:
        return {
            "pdq": int(self._pdq.ntotal),
            "clip": sum(len(bank) for bank in self._clip.values()),
        }

    def search(self, session: Session, uploads: UploadFilter) -> tuple[list[FoundHit], int]:
        """The hits among the uploads `uploads` selects, and how many of their stored
        vectors were searched."""
        found: list[FoundHit] = []
        if self._has_sha256:
            found += self._search_sha256(session, uploads)
        if self._pdq.ntotal:
            found += self._search_pdq(session, uploads)
        vectors = 0
        for model_id, bank in self._clip.items():
            hits, searched = _search_clip(session, uploads, model_id, bank)
            found += hits
            vectors += searched
        return _closest_per_entry(found), vectors

    def _search_sha256(self, session: Session, uploads: UploadFilter) -> list[FoundHit]:
        rows = session.execute(
            select(Signal.upload_id, BankEntry.id)
            .join(BankEntry, BankEntry.sha256 == Signal.value)
            .where(self._in_job, Signal.signal == SignalType.SHA256, uploads(Signal.upload_id))
        )
        return [
            FoundHit(upload_id, entry_id, SignalType.SHA256, 0.0, 0, None, 0.0)
            for upload_id, entry_id in rows
        ]

    def _search_pdq(self, session: Session, uploads: UploadFilter) -> list[FoundHit]:
        # Frames as hashed, and frame 0 as stored where orientation turned it
        # (`AS_STORED_FRAME`): screening matches both, so a hunt does.
        rows = session.execute(
            select(Signal.upload_id, Signal.frame_index, Signal.value).where(
                Signal.signal == SignalType.PDQ,
                # As screening: a flat frame's hash is noise; NULL quality is not stored
                # for uploads, but a hash without one is matched there, so here too.
                Signal.quality.is_(None) | (Signal.quality >= self.settings.pdq_min_quality),
                func.octet_length(Signal.value) == PDQ_BYTES,
                uploads(Signal.upload_id),
            )
        ).all()
        if not rows:
            return []
        queries = np.frombuffer(b"".join(row[2] for row in rows), np.uint8).reshape(-1, PDQ_BYTES)
        import faiss

        # Keep Faiss to this thread (see `pdq_search._scanned`); Faiss keeps
        # distances strictly below the radius it is given.
        faiss.omp_set_num_threads(1)
        limits, distances, found = self._pdq.range_search(queries, self.settings.pdq_threshold + 1)
        bounds = itertools.pairwise(limits)
        return [
            FoundHit(
                upload_id,
                int(entry_id),
                SignalType.PDQ,
                float(distance),
                max(frame, 0),  # the as-stored hash is frame 0's, as screening reports it
                None,
                float(self.settings.pdq_threshold),
            )
            for (upload_id, frame, _), (start, stop) in zip(rows, bounds, strict=True)
            for entry_id, distance in zip(
                self._pdq_ids[found[start:stop]], distances[start:stop], strict=True
            )
        ]


def _entry_vectors(
    session: Session,
    in_job: ColumnElement[bool],
    model_id: int,
    dim: int,
    bank_id: int,
    radius: float,
) -> ClipBank:
    from moderation.banks.clip_search import ClipRows

    entries = ClipRows(dim, device="cpu")
    pg_copy.copy_out(
        session,
        select(BankEntryEmbedding.bank_entry_id, BankEntryEmbedding.vector)
        .join(BankEntry, BankEntry.id == BankEntryEmbedding.bank_entry_id)
        .where(
            in_job,
            BankEntryEmbedding.model_id == model_id,
            func.octet_length(BankEntryEmbedding.vector) == 4 * dim,
        )
        .order_by(BankEntryEmbedding.bank_entry_id),
        [("entry_id", ">i8"), ("vector", ("<f4", dim))],
        lambda rows: entries.append(
            rows["entry_id"], np.full(len(rows), bank_id, np.int64), rows["vector"]
        ),
    )
    return entries.bank({bank_id: radius})


def _search_clip(
    session: Session, uploads: UploadFilter, model_id: int, bank: ClipBank
) -> tuple[list[FoundHit], int]:
    if not len(bank):
        return [], 0
    dim = bank.vectors.shape[1]
    owners: list[np.ndarray] = []
    frames: list[np.ndarray] = []
    vectors: list[np.ndarray] = []

    def add(rows: np.ndarray) -> None:
        owners.append(rows["upload_id"].astype(np.int64))
        frames.append(rows["frame_index"].astype(np.int64))
        vectors.append(rows["vector"].astype(np.float32))

    pg_copy.copy_out(
        session,
        select(Embedding.upload_id, Embedding.frame_index, Embedding.vector).where(
            Embedding.model_id == model_id,
            func.octet_length(Embedding.vector) == 4 * dim,
            uploads(Embedding.upload_id),
        ),
        [("upload_id", ">i8"), ("frame_index", ">i4"), ("vector", ("<f4", dim))],
        add,
    )
    if not vectors:
        return [], 0
    upload_ids, frame_indexes = np.concatenate(owners), np.concatenate(frames)
    queries = np.ascontiguousarray(np.concatenate(vectors))
    hits = [
        FoundHit(
            int(upload_ids[row]),
            hit.bank_entry_id,
            SignalType.CLIP,
            hit.distance,
            int(frame_indexes[row]),
            model_id,
            hit.radius,
        )
        for row, row_hits in enumerate(bank.search(queries))
        for hit in row_hits
    ]
    return hits, len(queries)


def _closest_per_entry(hits: Iterable[FoundHit]) -> list[FoundHit]:
    """One hit per (upload, entry, signal): the closest frame, the first of equals."""
    best: dict[tuple[int, int, SignalType], FoundHit] = {}
    for hit in sorted(hits, key=lambda h: h.frame_index):
        key = (hit.upload_id, hit.bank_entry_id, hit.signal)
        if key not in best or hit.distance < best[key].distance:
            best[key] = hit
    return list(best.values())
