"""Searching the index with filters, and measuring its recall.

A search takes `candidates` frames from the index, keeps those whose upload passes the
filters, rescores them (`rerank`) and returns the best frame of each of the top k uploads.
When the filters reject so many that fewer than k uploads remain, the search widens (more
frames, then a broader efSearch or nprobe) until k pass or the index is exhausted; when the
filters match few rows to begin with, those rows are scanned exactly instead. Either way,
k results come back whenever k uploads pass the filters.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVarTuple

import numpy as np
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from moderation.banks.models import Bank, BankEntry
from moderation.embedding.models import Embedding, EmbeddingModel
from moderation.embedding.service import vector_from_bytes
from moderation.errors import Conflict, Invalid, NotFound
from moderation.review.models import Hit
from moderation.screening.models import Upload
from moderation.search.filters import Filters
from moderation.search.indexes import recall_from_scores
from moderation.search.models import IndexEvaluation
from moderation.search.rerank import Candidate, ExactReranker, Reranker, SearchQuery
from moderation.search.vector_index import VectorIndex

__all__ = ["Filters"]  # where callers have always found it

NO_FILTERS = Filters()

_Columns = TypeVarTuple("_Columns")
# Widening stops after the frames taken, or the breadth multiplier, reach this many times
# their default; an exact scan of the filtered rows finishes the job.
_MAX_WIDENING = 64
_SCAN_CHUNK = 10_000


class UploadNotEmbedded(NotFound):
    code = "upload_not_embedded"

    def __init__(self, upload_id: int, model: str) -> None:
        super().__init__(
            f"upload {upload_id} has no embedding from model {model!r}: it is not screened, "
            "failed, or was screened under another model"
        )


class TooFewToEvaluate(Conflict):
    code = "too_few_to_evaluate"


class UnknownBank(Invalid):
    code = "unknown_bank"


class BadFilter(Invalid):
    code = "bad_filter"


def check_filters(session: Session, filters: Filters) -> None:
    """Refuse filters that can match nothing by mistake, with the reason: a bank that does
    not exist (a typo would otherwise answer "no results"), an empty time range."""
    if (
        filters.bank is not None
        and session.scalar(select(Bank.id).where(Bank.name == filters.bank)) is None
    ):
        raise UnknownBank(f"no bank named {filters.bank!r}; `GET /v1/banks` lists them")
    if (
        filters.screened_from is not None
        and filters.screened_until is not None
        and filters.screened_from >= filters.screened_until
    ):
        raise BadFilter("screened_from must be before screened_until")


@dataclass(frozen=True)
class HitSummary:
    bank: str
    signal: str
    distance: float
    review_status: str
    retroactive: bool


@dataclass(frozen=True)
class SearchResult:
    upload_id: int
    uri: str
    score: float  # cosine similarity of the best frame, after reranking
    frame_index: int
    status: str
    screened_at: datetime | None
    error_code: str | None
    hits: list[HitSummary] = field(default_factory=list)


def upload_vector(session: Session, model_id: int, model_name: str, upload_id: int) -> np.ndarray:
    """The stored embedding of an upload's first embedded frame."""
    vector = session.scalar(
        select(Embedding.vector)
        .where(Embedding.upload_id == upload_id, Embedding.model_id == model_id)
        .order_by(Embedding.frame_index)
        .limit(1)
    )
    if vector is None:
        raise UploadNotEmbedded(upload_id, model_name)
    return vector_from_bytes(vector).copy()


def search(
    session: Session,
    index: VectorIndex,
    query: SearchQuery,
    k: int,
    filters: Filters = NO_FILTERS,
    *,
    candidates: int = 100,
    exact_scan_max: int = 20_000,
    reranker: Reranker | None = None,
) -> list[SearchResult]:
    """The k uploads most similar to the query that pass the filters, best first."""
    reranker = reranker or ExactReranker()
    breadth = max(candidates, k)
    if filters.active and _few_pass(session, index.model_id, filters, exact_scan_max):
        ranked = _exact_scan(session, index.model_id, query, filters, breadth, reranker)
        return _results(session, ranked[:k])
    # An index that filters inside (Milvus) is asked only for passing frames; the filters
    # are applied again here, to what PostgreSQL holds now, so a field the sync has not yet
    # updated can hide a result for a moment but never admit a wrong one.
    inside = filters if filters.active and index.filters_inside else None
    frames, widen = min(breadth, index.max_breadth), 1
    while True:
        _, embedding_ids, _ = index.search(query.vector, frames, widen=widen, filters=inside)
        found = embedding_ids[0][embedding_ids[0] >= 0]
        ranked = _best_per_upload(
            reranker.rerank(query, _candidates(session, found.tolist(), filters))
        )
        if len(ranked) >= k or len(found) >= index.size:
            return _results(session, ranked[:k])
        most = min(index.size, index.max_breadth)
        if frames < most and frames < breadth * _MAX_WIDENING:
            frames = min(most, frames * 4)
        elif widen < _MAX_WIDENING:
            widen *= 4  # the index returned fewer than asked: look in more of it
        else:
            ranked = _exact_scan(session, index.model_id, query, filters, breadth, reranker)
            return _results(session, ranked[:k])


def _filtered(statement: Select[*_Columns], filters: Filters) -> Select[*_Columns]:
    if not filters.active:
        return statement
    return statement.join(Upload, Upload.id == Embedding.upload_id).where(*filters.clauses())


def _few_pass(session: Session, model_id: int, filters: Filters, limit: int) -> bool:
    """Whether at most `limit` stored frames pass the filters (counting no further)."""
    passing = (
        _filtered(select(Embedding.id).where(Embedding.model_id == model_id), filters)
        .limit(limit + 1)
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(passing)) or 0) <= limit


def _candidates(
    session: Session, embedding_ids: Sequence[int], filters: Filters
) -> list[Candidate]:
    if not embedding_ids:
        return []
    statement = select(
        Embedding.id, Embedding.upload_id, Embedding.frame_index, Embedding.vector
    ).where(Embedding.id.in_(embedding_ids))
    return [
        Candidate(id_, upload_id, frame, vector_from_bytes(vector), 0.0)
        for id_, upload_id, frame, vector in session.execute(_filtered(statement, filters))
    ]


def _best_per_upload(ranked: Iterable[Candidate]) -> list[Candidate]:
    """Each upload once, by its best frame, keeping the order."""
    seen: set[int] = set()
    best = []
    for candidate in ranked:
        if candidate.upload_id not in seen:
            seen.add(candidate.upload_id)
            best.append(candidate)
    return best


def _exact_scan(
    session: Session,
    model_id: int,
    query: SearchQuery,
    filters: Filters,
    breadth: int,
    reranker: Reranker,
) -> list[Candidate]:
    """Every stored frame that passes the filters, scored exactly; the best frames of the
    top `breadth` uploads go to the reranker."""
    statement = _filtered(
        select(Embedding.id, Embedding.upload_id, Embedding.frame_index, Embedding.vector).where(
            Embedding.model_id == model_id
        ),
        filters,
    )
    best: dict[int, Candidate] = {}
    vector = query.vector.astype(np.float32)
    rows = session.execute(statement.execution_options(yield_per=_SCAN_CHUNK))
    for chunk in rows.partitions(_SCAN_CHUNK):
        vectors = np.frombuffer(b"".join(row[3] for row in chunk), dtype="<f4").reshape(
            len(chunk), -1
        )
        scores = vectors @ vector
        for (id_, upload_id, frame, _), score, stored in zip(chunk, scores, vectors, strict=True):
            current = best.get(upload_id)
            if current is None or score > current.score:
                best[upload_id] = Candidate(id_, upload_id, frame, stored, float(score))
    top = sorted(best.values(), key=lambda c: (-c.score, c.embedding_id))[:breadth]
    return _best_per_upload(reranker.rerank(query, top))


def _results(session: Session, ranked: Sequence[Candidate]) -> list[SearchResult]:
    ids = [c.upload_id for c in ranked]
    uploads = {u.id: u for u in session.scalars(select(Upload).where(Upload.id.in_(ids)))}
    hits: dict[int, list[HitSummary]] = {}
    rows = session.execute(
        select(Hit, Bank.name)
        .join(BankEntry, BankEntry.id == Hit.bank_entry_id)
        .join(Bank, Bank.id == BankEntry.bank_id)
        .where(Hit.upload_id.in_(ids))
        .order_by(Hit.upload_id, Hit.distance)
    )
    for hit, bank in rows:
        hits.setdefault(hit.upload_id, []).append(
            HitSummary(
                bank=bank,
                signal=hit.signal.value,
                distance=hit.distance,
                review_status=hit.review_status.value,
                retroactive=hit.retroactive,
            )
        )
    return [
        SearchResult(
            upload_id=c.upload_id,
            uri=uploads[c.upload_id].uri,
            score=c.score,
            frame_index=c.frame_index,
            status=uploads[c.upload_id].status.value,
            screened_at=uploads[c.upload_id].finished_at,
            error_code=uploads[c.upload_id].error_code,
            hits=hits.get(c.upload_id, []),
        )
        for c in ranked
        if c.upload_id in uploads  # deleted since it was read
    ]


def evaluate(
    session: Session,
    index: VectorIndex,
    *,
    queries: int = 200,
    k: int = 10,
    candidates: int = 100,
    seed: int | None = None,
) -> IndexEvaluation:
    """Recall@k of the index as searches are served (its best `candidates` rescored exactly,
    the top k kept) against exact search over the same rows, with a sample of its stored
    vectors as queries; recorded as an `IndexEvaluation` (flushed, not committed). Without
    the rescoring, IVF-PQ's own top 10 reach about half the recall its served results do
    (bench/search.py), so the raw figure would alarm about nothing.

    Each query leaves its own row out of both result lists: a stored vector finds itself,
    which says nothing about how the index answers a new query (and would flatter IVF,
    whose lists always hold their own members). A result counts when its exact score
    reaches the k-th exact score, so equal copies are interchangeable
    (`indexes.recall_from_scores`). Stored vectors are still easier queries for HNSW than
    new ones (see `indexes`), so the figure is best read as a trend."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    held = index.held_ids()
    if len(held) < 2:
        raise TooFewToEvaluate(
            f"the index of model {index.model_name!r} has {len(held)} vectors: too few to evaluate"
        )
    k = min(k, len(held) - 1)
    sampled = np.sort(rng.choice(held, size=min(queries, len(held)), replace=False))
    stored = {
        id_: vector
        for id_, vector in session.execute(
            select(Embedding.id, Embedding.vector).where(Embedding.id.in_(sampled.tolist()))
        )
    }
    query_ids = np.array([i for i in sampled if i in stored], dtype=np.int64)
    query_vectors = np.stack([vector_from_bytes(stored[i]) for i in query_ids])
    width = min(max(k, candidates), len(held) - 1)
    _, found, _ = index.search(query_vectors, width + 1)
    approximate = np.full((len(query_ids), width), -1, dtype=np.int64)
    for row, (own, results) in enumerate(zip(query_ids, found, strict=True)):
        others = results[results != own][:width]
        approximate[row, : len(others)] = others
    exact_scores, candidate_scores = _exact_pass(
        session, index, held, query_ids, query_vectors, approximate, k
    )
    approximate_scores = -np.sort(-candidate_scores, axis=1)[:, :k]
    evaluation = IndexEvaluation(
        model_id=index.model_id,
        index_kind=str(index.kind),
        parameters={**index.parameters, "candidates": width},
        corpus_size=len(held),
        k=k,
        queries=len(query_vectors),
        recall=recall_from_scores(approximate_scores, exact_scores),
        seconds=time.perf_counter() - started,
    )
    session.add(evaluation)
    session.flush()
    return evaluation


def _exact_pass(
    session: Session,
    index: VectorIndex,
    held: np.ndarray,
    query_ids: np.ndarray,
    queries: np.ndarray,
    approximate: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One streamed pass over the rows the index holds: the exact top-k scores of every
    query (its own row left out), and the exact scores of the approximate results (-inf
    where there was none)."""
    held_sorted = np.sort(held)
    exact = np.full((len(queries), k), -np.inf, dtype=np.float32)
    approximate_scores = np.full(approximate.shape, -np.inf, dtype=np.float32)
    rows = session.execute(
        select(Embedding.id, Embedding.vector)
        .where(Embedding.model_id == index.model_id)
        .order_by(Embedding.id)
        .execution_options(yield_per=_SCAN_CHUNK)
    )
    for chunk in rows.partitions(_SCAN_CHUNK):
        ids = np.fromiter((row[0] for row in chunk), dtype=np.int64, count=len(chunk))
        vectors = np.frombuffer(b"".join(row[1] for row in chunk), dtype="<f4").reshape(
            len(chunk), -1
        )
        inside = np.isin(ids, held_sorted, assume_unique=True)
        ids, vectors = ids[inside], vectors[inside]
        if not len(ids):
            continue
        scores = queries @ vectors.T
        scores[ids[np.newaxis, :] == query_ids[:, np.newaxis]] = -np.inf
        merged = np.concatenate([exact, scores], axis=1)
        top = -np.partition(-merged, k - 1, axis=1)[:, :k]
        exact = -np.sort(-top, axis=1)
        # The approximate results that lie in this chunk get their exact scores.
        positions = np.clip(np.searchsorted(ids, approximate), 0, len(ids) - 1)
        present = ids[positions] == approximate
        query_rows, slots = np.nonzero(present)
        approximate_scores[query_rows, slots] = np.einsum(
            "ij,ij->i", queries[query_rows], vectors[positions[query_rows, slots]]
        )
    return exact, approximate_scores


def evaluation_history(session: Session, model_id: int | None = None) -> list[IndexEvaluation]:
    statement = select(IndexEvaluation).order_by(IndexEvaluation.id)
    if model_id is not None:
        statement = statement.where(IndexEvaluation.model_id == model_id)
    return list(session.scalars(statement))


def latest_evaluations(session: Session) -> list[tuple[str, IndexEvaluation]]:
    """The newest evaluation of each model, with the model's name."""
    newest = (
        select(func.max(IndexEvaluation.id)).group_by(IndexEvaluation.model_id).scalar_subquery()
    )
    rows = session.execute(
        select(EmbeddingModel.name, IndexEvaluation)
        .join(EmbeddingModel, EmbeddingModel.id == IndexEvaluation.model_id)
        .where(IndexEvaluation.id.in_(newest))
    )
    return [(name, evaluation) for name, evaluation in rows]
