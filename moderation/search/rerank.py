"""Rescoring the index's candidates before the top k are returned.

The index's own scores are approximate (PQ codes, or a graph that missed a neighbour's
exact order); the stored float32 vectors are not. `ExactReranker` rescores from them and is
the default. A cross-encoder, or any model that looks at the query and the candidate
together, plugs in as another `Reranker`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SearchQuery:
    """A query embedded by the index's model, with what it was made from, for rerankers
    that look at the original (text, image bytes or an upload)."""

    vector: np.ndarray  # L2-normalised float32 (dim,)
    # The model that embedded it: searched only in that model's index, never another's.
    model_id: int | None = None
    text: str | None = None
    image: bytes | None = None
    upload_id: int | None = None


@dataclass(frozen=True)
class Candidate:
    embedding_id: int
    upload_id: int
    frame_index: int
    vector: np.ndarray  # the stored float32 vector
    score: float


class Reranker(Protocol):
    def rerank(self, query: SearchQuery, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates with their final scores, best first."""
        ...


class ExactReranker:
    """Cosine similarity from the stored vectors (inner product of unit vectors)."""

    def rerank(self, query: SearchQuery, candidates: Sequence[Candidate]) -> list[Candidate]:
        if not candidates:
            return []
        scores = np.stack([c.vector for c in candidates]) @ query.vector.astype(np.float32)
        rescored = [replace(c, score=float(s)) for c, s in zip(candidates, scores, strict=True)]
        # Ties by embedding id, so equal copies come back in a stable order.
        return sorted(rescored, key=lambda c: (-c.score, c.embedding_id))
