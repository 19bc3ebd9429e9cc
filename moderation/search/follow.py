"""An in-memory index that follows the `embeddings` table of one model: the Faiss
implementation of `vector_index.VectorIndex`.

The table is the source of truth; the index holds, per Faiss label, the embedding and
upload id of the row it came from. `tail` reads the rows added since the checkpoint and
adds them.

The checkpoint is not simply the largest id seen: rows become visible out of order.
`moderation.commit_horizon` says how it moves; rows here are inserted by screening, which
writes the upload row before its embeddings, so its transaction has an xid before it
takes an id. `search_commit_lag_s` is a second guard for the one case the xid rule cannot
see: a single INSERT that takes its id an instant before the transaction gets its xid.
A restart re-reads only what lies above the persisted checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
from sqlalchemy import Connection, Engine, Row, select

from moderation.commit_horizon import (
    Horizon,
    SnapshotBounds,
    sequence_value,
    settle,
    snapshot_bounds,
)
from moderation.embedding.models import Embedding
from moderation.search.filters import Filters
from moderation.search.indexes import (
    BuiltIndex,
    IndexKind,
    apply_parameters,
    breadth_parameter,
    breadth_values,
    recall_from_scores,
)
from moderation.search.snapshot import Snapshot
from moderation.search.vector_index import IndexRows, Rescore, smallest_meeting

logger = logging.getLogger(__name__)

# Vectors fetched per query by id.
_FETCH_CHUNK = 10_000


@dataclass
class TailRead:
    """The rows one read found above the checkpoint that the index did not hold."""

    embedding_ids: np.ndarray
    upload_ids: np.ndarray
    vectors: np.ndarray
    bounds: SnapshotBounds  # of the read's snapshot
    horizon: Horizon


Progress = Callable[[int], None]


def _no_progress(_: int) -> None:
    pass


def read_since(
    engine: Engine,
    model_id: int,
    dim: int,
    checkpoint: int,
    known: np.ndarray,
    progress: Progress = _no_progress,
) -> TailRead:
    """Rows of the model with an id above `checkpoint` and not in `known`, read in one
    REPEATABLE READ snapshot together with that snapshot's bounds."""
    with engine.connect() as conn:
        allocated, read_at = sequence_value(conn, "embeddings")
        conn.rollback()
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            bounds = snapshot_bounds(conn)
            ids = np.fromiter(
                conn.scalars(
                    select(Embedding.id)
                    .where(Embedding.model_id == model_id, Embedding.id > checkpoint)
                    .order_by(Embedding.id)
                ),
                dtype=np.int64,
            )
            new = ids[~np.isin(ids, known)] if len(known) else ids
            upload_ids, vectors = _fetch(conn, model_id, dim, checkpoint, new, progress)
    return TailRead(
        embedding_ids=new,
        upload_ids=upload_ids,
        vectors=vectors,
        bounds=bounds,
        horizon=Horizon(allocated=allocated, xmax=bounds.xmax, read_at=read_at),
    )


def _fetch(
    conn: Connection,
    model_id: int,
    dim: int,
    checkpoint: int,
    ids: np.ndarray,
    progress: Progress,
) -> tuple[np.ndarray, np.ndarray]:
    """Upload ids and vectors of rows `ids` (ascending), in that order."""
    upload_ids = np.empty(len(ids), dtype=np.int64)
    vectors = np.empty((len(ids), dim), dtype=np.float32)
    columns = select(Embedding.id, Embedding.upload_id, Embedding.vector)
    if len(ids) > _FETCH_CHUNK:
        # Most of a range (a build): one streamed scan, skipping the rows already held.
        wanted = set(ids.tolist())
        result = conn.execution_options(stream_results=True, yield_per=_FETCH_CHUNK).execute(
            columns.where(Embedding.model_id == model_id, Embedding.id > checkpoint).order_by(
                Embedding.id
            )
        )
        batches: Iterator[list[Row[int, int, bytes]]] = (
            [row for row in partition if row[0] in wanted]
            for partition in result.partitions(_FETCH_CHUNK)
        )
    else:
        batches = iter(
            [
                list(
                    conn.execute(
                        columns.where(Embedding.id.in_(ids.tolist())).order_by(Embedding.id)
                    )
                )
            ]
        )
    position = 0
    for batch in batches:
        for embedding_id, upload_id, vector in batch:
            if position >= len(ids) or embedding_id != ids[position]:
                raise RuntimeError(f"embedding {embedding_id} changed while it was read")
            upload_ids[position] = upload_id
            vectors[position] = np.frombuffer(vector, dtype="<f4")
            position += 1
        progress(len(batch))
    if position != len(ids):  # rows are never deleted within one snapshot
        raise RuntimeError(f"read {position} of {len(ids)} embeddings")
    return upload_ids, vectors


@dataclass
class FollowedIndex:
    """One model's index, its label arrays and checkpoint. Thread-safe: searches and
    tails take one lock (a tail adds a few rows; a search takes milliseconds)."""

    model_id: int
    model_name: str
    dim: int
    built: BuiltIndex
    embedding_ids: np.ndarray
    upload_ids: np.ndarray
    checkpoint: int
    commit_lag_s: float
    pending: list[Horizon] = field(default_factory=list)
    # Rows added since this index was last written to disk (or built).
    unsaved: int = 0
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, *, commit_lag_s: float) -> FollowedIndex:
        built = BuiltIndex(snapshot.index, snapshot.kind, snapshot.parameters)
        apply_parameters(built)
        return cls(
            model_id=snapshot.model_id,
            model_name=snapshot.model_name,
            dim=snapshot.dim,
            built=built,
            embedding_ids=snapshot.embedding_ids,
            upload_ids=snapshot.upload_ids,
            checkpoint=snapshot.checkpoint,
            commit_lag_s=commit_lag_s,
        )

    @property
    def size(self) -> int:
        return int((self.embedding_ids >= 0).sum())

    @property
    def filters_inside(self) -> bool:
        return False  # the search service filters its candidates in PostgreSQL

    @property
    def max_breadth(self) -> int:
        return max(1, len(self.embedding_ids))

    @property
    def kind(self) -> IndexKind:
        return self.built.kind

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.built.parameters)

    def known_above_checkpoint(self) -> np.ndarray:
        with self._lock:
            ids = self.embedding_ids
            return ids[ids > self.checkpoint]

    def tail(self, engine: Engine) -> int:
        """Add the rows committed since the last tail; the number added."""
        read = read_since(
            engine, self.model_id, self.dim, self.checkpoint, self.known_above_checkpoint()
        )
        return self.absorb(read)

    def absorb(self, read: TailRead) -> int:
        """Add a read's rows and move the checkpoint as far as is safe (see
        `moderation.commit_horizon`)."""
        with self._lock:
            known = self.embedding_ids[self.embedding_ids > self.checkpoint]
            fresh = ~np.isin(read.embedding_ids, known)  # a concurrent tail added some
            if fresh.any():
                self.built.index.add(np.ascontiguousarray(read.vectors[fresh]))
                self.embedding_ids = np.concatenate([self.embedding_ids, read.embedding_ids[fresh]])
                self.upload_ids = np.concatenate([self.upload_ids, read.upload_ids[fresh]])
                self.unsaved += int(fresh.sum())
            self.checkpoint, self.pending = settle(
                self.checkpoint, self.pending, read.bounds, read.horizon, self.commit_lag_s
            )
            return int(fresh.sum())

    def upsert(self, rows: IndexRows) -> int:
        """Add rows; a row already held under the same embedding id is replaced (its old
        label is left as a tombstone, as in `delete`)."""
        with self._lock:
            self._tombstone(rows.embedding_ids)
            self.built.index.add(np.ascontiguousarray(rows.vectors, dtype=np.float32))
            self.embedding_ids = np.concatenate([self.embedding_ids, rows.embedding_ids])
            self.upload_ids = np.concatenate([self.upload_ids, rows.upload_ids])
            self.unsaved += len(rows)
        return len(rows)

    def delete(self, embedding_ids: np.ndarray) -> int:
        """Tombstone the rows: their labels map to id -1, which every search drops. HNSW
        cannot remove a vector, so the label keeps its place in the graph (and in memory)
        until `moderation index rebuild`; the tombstones are saved with the snapshot."""
        with self._lock:
            removed = self._tombstone(embedding_ids)
            self.unsaved += removed
        return removed

    def _tombstone(self, embedding_ids: np.ndarray) -> int:
        held = np.isin(self.embedding_ids, embedding_ids) & (self.embedding_ids >= 0)
        if held.any():
            self.embedding_ids = np.where(held, -1, self.embedding_ids)
            self.upload_ids = np.where(held, -1, self.upload_ids)
        return int(held.sum())

    def held_ids(self) -> np.ndarray:
        with self._lock:
            return self.embedding_ids[self.embedding_ids >= 0].copy()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": "faiss",
                "model": self.model_name,
                "kind": self.kind.value,
                "size": self.size,
                "tombstones": int((self.embedding_ids < 0).sum()),
                "parameters": self.parameters,
                "checkpoint": self.checkpoint,
            }

    def tune(
        self,
        queries: np.ndarray,
        exact_scores: np.ndarray,
        rescore: Rescore,
        *,
        target: float,
        k: int,
        candidates: int,
    ) -> float:
        """Tune efSearch or nprobe on the index as it stands (builds tune on held-out rows
        instead: `indexes.tune_breadth`); flat indexes are exact already."""
        name = breadth_parameter(self.kind)
        if name is None:
            return 1.0
        width = max(k, candidates)

        def recall_with(value: int) -> float:
            with self._lock:
                faiss.ParameterSpace().set_index_parameter(self.built.index, name, value)
            _, ids, _ = self.search(queries, width)
            return recall_from_scores(-np.sort(-rescore(ids, queries), axis=1)[:, :k], exact_scores)

        values = breadth_values(self.kind, k, int(self.built.parameters.get("nlist", 0)))
        chosen, recall = smallest_meeting(values, recall_with, target)
        with self._lock:
            faiss.ParameterSpace().set_index_parameter(self.built.index, name, chosen)
            self.built.parameters |= {name: chosen, "tuned_recall": round(recall, 4), "tuned_k": k}
        return recall

    def search(
        self,
        queries: np.ndarray,
        breadth: int,
        *,
        widen: int = 1,
        filters: Filters | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The `breadth` nearest frames to each query: scores, embedding ids and upload ids,
        each (q, breadth), with -1 ids where the index had fewer (or held a tombstone).
        `widen` multiplies the tuned efSearch or nprobe, for filters that reject most of
        the nearest frames. `filters` are the caller's to apply (`filters_inside`)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        with self._lock:
            breadth = max(1, min(breadth, len(self.embedding_ids)))
            if len(self.embedding_ids) == 0:
                empty = np.full((len(queries), 0), -1, dtype=np.int64)
                return np.zeros(empty.shape, dtype=np.float32), empty, empty
            name = breadth_parameter(self.kind)
            if widen > 1 and name is not None:
                # Under the lock, so no other search sees the wider setting.
                tuned = int(self.built.parameters[name])
                widened = tuned * widen
                if name == "nprobe":
                    widened = min(widened, int(self.built.parameters["nlist"]))
                space = faiss.ParameterSpace()
                space.set_index_parameter(self.built.index, name, widened)
                try:
                    scores, labels = self.built.index.search(queries, breadth)
                finally:
                    space.set_index_parameter(self.built.index, name, tuned)
            else:
                scores, labels = self.built.index.search(queries, breadth)
            found = labels >= 0
            safe = np.where(found, labels, 0)
            embedding_ids = np.where(found, self.embedding_ids[safe], -1)
            upload_ids = np.where(found, self.upload_ids[safe], -1)
        return scores, embedding_ids, upload_ids

    def snapshot(self) -> Snapshot:
        """The index as it stands, for `write_snapshot`; call under `locked()`."""
        return Snapshot(
            model_id=self.model_id,
            model_name=self.model_name,
            dim=self.dim,
            kind=self.kind,
            parameters=self.parameters,
            checkpoint=self.checkpoint,
            index=self.built.index,
            embedding_ids=self.embedding_ids,
            upload_ids=self.upload_ids,
        )

    def locked(self) -> threading.RLock:
        return self._lock
