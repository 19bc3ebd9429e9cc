"""The general index behind one interface: what a search, an evaluation and a sync need.

Two implementations:
- `follow.FollowedIndex`: Faiss in this process (flat, HNSW or IVF by size, snapshots on
  disk, efSearch or nprobe tuned to a recall target); it follows `embeddings` itself.
  Filters are applied afterwards, in PostgreSQL, to the candidates it returns.
- `milvus_index.MilvusIndex`: a collection in a Milvus server or cluster, written by
  `moderation index sync` (`milvus_sync`). Filters run inside Milvus, on scalar fields the
  sync keeps current.

The search service (`service.search`) takes either: it asks for `breadth` nearest frames,
rescores them exactly from PostgreSQL and widens when filters reject too many.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from moderation.search.filters import Filters


@dataclass(frozen=True)
class IndexRows:
    """Rows to write: embedding ids (the key), their uploads and vectors, in one order."""

    embedding_ids: np.ndarray  # int64 (n,)
    upload_ids: np.ndarray  # int64 (n,)
    vectors: np.ndarray  # float32 (n, dim)

    def __len__(self) -> int:
        return len(self.embedding_ids)


class VectorIndex(Protocol):
    model_id: int
    model_name: str
    dim: int

    @property
    def size(self) -> int:
        """Vectors it holds (the count a search can reach)."""
        ...

    @property
    def kind(self) -> str:
        """flat, hnsw, ivf_flat, ivf_pq (Faiss) or the Milvus index type (hnsw, ivf_sq8...)."""
        ...

    @property
    def parameters(self) -> dict[str, Any]:
        """Build and search parameters, with the tuned breadth and its measured recall."""
        ...

    @property
    def filters_inside(self) -> bool:
        """Whether `search` applies `filters` itself (else the caller filters afterwards)."""
        ...

    @property
    def max_breadth(self) -> int:
        """The most frames one search may ask for."""
        ...

    def upsert(self, rows: IndexRows) -> int:
        """Add rows, replacing any already held under the same embedding id; the number
        written."""
        ...

    def delete(self, embedding_ids: np.ndarray) -> int:
        """Remove rows by embedding id (ids not held are ignored); the number asked."""
        ...

    def search(
        self,
        queries: np.ndarray,
        breadth: int,
        *,
        widen: int = 1,
        filters: Filters | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The `breadth` nearest frames to each query: scores, embedding ids and upload ids,
        each (q, breadth), -1 ids where there were fewer. `widen` multiplies the tuned
        search breadth (efSearch, ef, nprobe) for filters that reject most frames."""
        ...

    def held_ids(self) -> np.ndarray:
        """The embedding ids it holds (int64), for evaluation against exact search."""
        ...

    def describe(self) -> dict[str, Any]:
        """What an operator needs to see: backend, kind, size, parameters, checkpoint."""
        ...

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
        """Set the smallest search breadth whose recall@k, served as searches are (the best
        `candidates` rescored exactly by `rescore`, the top k kept), meets `target` against
        `exact_scores` (q, k); the recall reached."""
        ...


# Exact scores of (q, c) embedding ids (-1: none) for the q queries: -inf where none.
Rescore = Callable[[np.ndarray, np.ndarray], np.ndarray]


def smallest_meeting(
    values: Sequence[int], recall_with: Callable[[int], float], target: float
) -> tuple[int, float]:
    """The smallest breadth among `values` (ascending, tried by doubling, then bisected
    between the last miss and the first hit) whose recall meets `target`; the largest if
    none does. With its recall."""
    measured: dict[int, float] = {}
    chosen, low = values[-1], 0
    for value in values:
        measured[value] = recall_with(value)
        if measured[value] >= target:
            chosen = value
            break
        low = value
    while chosen - low > 1 and measured.get(chosen, 0.0) >= target:
        middle = (low + chosen) // 2
        measured[middle] = recall_with(middle)
        if measured[middle] >= target:
            chosen = middle
        else:
            low = middle
    return chosen, measured[chosen]
