"""Which Faiss index serves a corpus of a given size, built and tuned to a recall target.

Pure functions over arrays: no database here. Vectors are L2-normalised float32, so inner
product is cosine similarity and every index uses METRIC_INNER_PRODUCT.

- exact (IndexFlatIP) below `exact_max` vectors: recall 1.0, and fast enough there;
- HNSW (IndexHNSWFlat) up to `hnsw_max`: in memory, no training, efSearch tuned;
- IVF above, flat or PQ-compressed lists, its coarse quantiser trained on a sample, with
  nprobe tuned.

"Tuned" means the smallest efSearch or nprobe whose recall@k, measured against exact search
on held-out queries, meets the target. The queries are stored vectors held out of the
training sample and out of the index until tuning is done, so they are as new to it as a
real query. Measured on 20,000 clustered 32-d vectors (as in tests/test_search_index.py):
with the queries already inside the index (each leaving itself out of its results), HNSW
was tuned to 0.95 at an efSearch where 300 new queries got 0.91; held out, it was tuned to
0.956 (efSearch 23) and the new queries got 0.969 (IVF-Flat, nlist 256: 0.959 at nprobe 6,
new queries 0.974).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from moderation.config import Settings
from moderation.search.vector_index import smallest_meeting

logger = logging.getLogger(__name__)

# Vectors added to an index per call, so a progress bar moves and memory stays flat.
ADD_CHUNK = 20_000
# Faiss' own advice: at least 39 training points per IVF list.
_TRAIN_POINTS_PER_LIST = 39
# Scores within this of the k-th exact score count as found: two stored copies of one image
# score the same, and either one is a correct answer.
TIE_TOLERANCE = 1e-5


class IndexKind(enum.StrEnum):
    FLAT = "flat"
    HNSW = "hnsw"
    IVF_FLAT = "ivf_flat"
    IVF_PQ = "ivf_pq"


@dataclass(frozen=True)
class IndexPlan:
    """The size thresholds and build parameters (settings `search_*`)."""

    exact_max: int
    hnsw_max: int
    hnsw_m: int
    hnsw_ef_construction: int
    ivf_nlist: int | None
    ivf_pq_m: int
    train_sample: int
    recall_target: float
    recall_k: int
    tuning_queries: int
    # Candidates a search rescores exactly: tuning measures recall as searches are served.
    candidates: int

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexPlan:
        return cls(
            exact_max=settings.search_exact_max,
            hnsw_max=settings.search_hnsw_max,
            hnsw_m=settings.search_hnsw_m,
            hnsw_ef_construction=settings.search_hnsw_ef_construction,
            ivf_nlist=settings.search_ivf_nlist,
            ivf_pq_m=settings.search_ivf_pq_m,
            train_sample=settings.search_train_sample,
            recall_target=settings.search_recall_target,
            recall_k=settings.search_recall_k,
            candidates=settings.search_candidates,
            tuning_queries=settings.search_tuning_queries,
        )

    def kind_for(self, size: int) -> IndexKind:
        if size < self.exact_max:
            return IndexKind.FLAT
        if size < self.hnsw_max:
            return IndexKind.HNSW
        return IndexKind.IVF_PQ if self.ivf_pq_m > 0 else IndexKind.IVF_FLAT

    def nlist_for(self, size: int) -> int:
        wanted = self.ivf_nlist or int(4 * math.sqrt(size))
        # Never more lists than the training sample can fill.
        return max(1, min(wanted, min(size, self.train_sample) // _TRAIN_POINTS_PER_LIST))


@dataclass
class BuiltIndex:
    index: faiss.Index
    kind: IndexKind
    # What `apply_parameters` needs to restore the search breadth after loading, and what
    # an evaluation records: M, efConstruction, efSearch, nlist, nprobe, pq_m, tuned recall.
    parameters: dict[str, Any]
    # The row of the built-from array behind each label (label i is row order[i]); after
    # loading from a snapshot, the label arrays are already in label order.
    order: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


Progress = Callable[[int], None]


def _no_progress(_: int) -> None:
    pass


def build_index(
    vectors: np.ndarray,
    plan: IndexPlan,
    *,
    seed: int = 0,
    progress: Progress = _no_progress,
) -> BuiltIndex:
    """An index over `vectors` (n, d) of the kind their count calls for. Label i is row
    `order[i]`: the held-out tuning queries are added last, after tuning, so that they
    are new to the index while it is measured. `progress` gets the vectors added per step."""
    size, dim = vectors.shape
    kind = plan.kind_for(size)
    rng = np.random.default_rng(seed)
    parameters: dict[str, Any] = {}
    index: faiss.Index
    if kind is IndexKind.FLAT:
        index = faiss.IndexFlatIP(dim)
        _add(index, vectors, np.arange(size), progress)
        return BuiltIndex(index, kind, parameters, np.arange(size))
    held_out = np.sort(rng.choice(size, size=min(plan.tuning_queries, size // 10), replace=False))
    rest = np.setdiff1d(np.arange(size), held_out)
    if kind is IndexKind.HNSW:
        index = faiss.IndexHNSWFlat(dim, plan.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = plan.hnsw_ef_construction
        parameters |= {"M": plan.hnsw_m, "efConstruction": plan.hnsw_ef_construction}
    else:
        nlist = plan.nlist_for(len(rest))
        train = rng.choice(rest, size=min(plan.train_sample, len(rest)), replace=False)
        quantizer = faiss.IndexFlatIP(dim)
        if kind is IndexKind.IVF_PQ:
            # 8-bit codes (256 centroids per sub-vector) need thousands of training points;
            # a small sample gets fewer bits rather than a failed build.
            bits = max(1, min(8, int(math.log2(len(train) / _TRAIN_POINTS_PER_LIST))))
            index = faiss.IndexIVFPQ(
                quantizer, dim, nlist, plan.ivf_pq_m, bits, faiss.METRIC_INNER_PRODUCT
            )
            parameters |= {"pq_m": plan.ivf_pq_m, "pq_bits": bits}
        else:
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        parameters["nlist"] = nlist
        index.train(np.ascontiguousarray(vectors[np.sort(train)]))
    _add(index, vectors, rest, progress)
    built = BuiltIndex(index, kind, parameters, np.concatenate([rest, held_out]))
    if len(held_out):
        tune_breadth(
            built,
            vectors,
            rest,
            held_out,
            target=plan.recall_target,
            k=plan.recall_k,
            candidates=plan.candidates,
        )
    _add(index, vectors, held_out, progress)
    return built


def _add(index: faiss.Index, vectors: np.ndarray, rows: np.ndarray, progress: Progress) -> None:
    for start in range(0, len(rows), ADD_CHUNK):
        chunk = rows[start : start + ADD_CHUNK]
        index.add(np.ascontiguousarray(vectors[chunk]))
        progress(len(chunk))


def breadth_parameter(kind: IndexKind) -> str | None:
    """The search-time knob that trades speed for recall, by kind."""
    if kind is IndexKind.HNSW:
        return "efSearch"
    if kind in (IndexKind.IVF_FLAT, IndexKind.IVF_PQ):
        return "nprobe"
    return None


def apply_parameters(built: BuiltIndex) -> None:
    """Set the tuned breadth on a (loaded) index."""
    name = breadth_parameter(built.kind)
    if name is not None and name in built.parameters:
        faiss.ParameterSpace().set_index_parameter(built.index, name, int(built.parameters[name]))


def breadth_values(kind: IndexKind, k: int, nlist: int) -> list[int]:
    """The efSearch or nprobe values tuning tries first, doubling."""
    if kind is IndexKind.HNSW:
        values = [max(k, 16)]
        while values[-1] < 4096:
            values.append(values[-1] * 2)
        return values
    values = [1]
    while values[-1] < nlist:
        values.append(min(nlist, values[-1] * 2))
    return values


def tune_breadth(
    built: BuiltIndex,
    vectors: np.ndarray,
    indexed: np.ndarray,
    queries_at: np.ndarray,
    *,
    target: float,
    k: int,
    candidates: int,
) -> float:
    """Set the smallest efSearch or nprobe whose recall@k meets `target` for the query rows
    `queries_at`, against exact search over the rows `indexed` (label i is `indexed[i]`):
    doubling, then bisecting between the last miss and the first hit; if none meets it,
    the largest tried. Records the value and its recall in `built.parameters`.

    Recall is measured as searches are served: the index's best `candidates` rescored
    exactly, the top k kept. IVF-PQ's own top 10 level off near 0.5 recall at 1M vectors
    while its rescored candidates reach 0.96 (bench/search.py): tuned on its raw top 10,
    it would search every list."""
    name = breadth_parameter(built.kind)
    assert name is not None
    queries = np.ascontiguousarray(vectors[queries_at])
    k = min(k, len(indexed))
    exact_scores, _ = exact_top_k(queries, vectors, k, rows=indexed)
    space = faiss.ParameterSpace()

    width = min(max(k, candidates), len(indexed))

    def recall_with(value: int) -> float:
        space.set_index_parameter(built.index, name, value)
        _, labels = built.index.search(queries, width)
        rows = np.where(labels >= 0, indexed[np.maximum(labels, 0)], -1)
        return recall_of(rows, queries, vectors, exact_scores)

    values = breadth_values(built.kind, k, int(built.parameters.get("nlist", 0)))
    chosen, recall = smallest_meeting(values, recall_with, target)
    space.set_index_parameter(built.index, name, chosen)
    built.parameters |= {name: chosen, "tuned_recall": round(recall, 4), "tuned_k": k}
    if recall < target:
        logger.warning(
            "%s reaches recall@%d %.3f at most (%s=%d), below the target %.2f; "
            "raise search_ivf_pq_m or use IVF-Flat",
            built.kind,
            k,
            recall,
            name,
            chosen,
            target,
        )
    return recall


def exact_top_k(
    queries: np.ndarray,
    vectors: np.ndarray,
    k: int,
    *,
    rows: np.ndarray | None = None,
    chunk: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product among `rows` of `vectors` (default all): (scores, row
    indices), each (q, k), best first."""
    if rows is None:
        rows = np.arange(len(vectors))
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(rows), chunk):
        chunk_rows = rows[start : start + chunk]
        scores = queries @ vectors[chunk_rows].T
        chunk_rows = np.broadcast_to(chunk_rows, scores.shape)
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_rows = np.concatenate([best_rows, chunk_rows], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_rows = np.take_along_axis(merged_rows, order, axis=1)
    return best_scores, best_rows


def recall_of(
    labels: np.ndarray, queries: np.ndarray, vectors: np.ndarray, exact_scores: np.ndarray
) -> float:
    """Mean recall@k of approximate results `labels` (q, c >= k; -1 for none) rescored
    exactly, their best k kept, where a result counts when its exact score reaches the k-th
    exact score (ties are equally right)."""
    found = labels >= 0
    scores = np.full(labels.shape, -np.inf, dtype=np.float32)
    rows, slots = np.nonzero(found)
    scores[rows, slots] = np.einsum("ij,ij->i", queries[rows], vectors[labels[rows, slots]])
    best = -np.sort(-scores, axis=1)[:, : exact_scores.shape[1]]
    return recall_from_scores(best, exact_scores)


def recall_from_scores(approximate_scores: np.ndarray, exact_scores: np.ndarray) -> float:
    """Recall from the exact scores of the approximate results (q, k; -inf for none)."""
    threshold = exact_scores[:, -1:] - TIE_TOLERANCE
    hits = np.minimum((approximate_scores >= threshold).sum(axis=1), exact_scores.shape[1])
    return float(hits.mean() / exact_scores.shape[1])
