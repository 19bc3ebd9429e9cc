"""Measuring search on the golden set, per query modality, and keeping what was measured.

Every golden query is asked through the search service (`moderation.search.service.search`,
the index, the widening, the reranker: what an analyst's search does) for the top k uploads
under one model. Against its relevant uploads (those the model has embedded: an upload the
corpus does not hold is no miss of the search):

- recall@k: the share of the relevant uploads in the top k;
- precision@k: the share of the top k that is relevant;
- MRR: 1 / the rank of the first relevant upload in the top k (0 when none is there).

Each is the mean over a modality's queries: text→image and image→image are never mixed,
since the cross-modal gap makes the first lower whatever the corpus. A query by upload
leaves that upload out of its own results. A run is compared with the run before it of
the same model, reranker and k: a fall in recall beyond the margin marks the run regressed
and is logged as a warning (`/metrics` reports it, `moderation eval history` shows it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from moderation.banks.models import BankEntryEmbedding
from moderation.embedding.models import Embedding, EmbeddingModel
from moderation.embedding.service import vector_from_bytes
from moderation.evaluation.golden import sync_from_review
from moderation.evaluation.models import (
    EvaluationFigures,
    EvaluationRun,
    GoldenQuery,
    GoldenRelevant,
    Modality,
)
from moderation.images.errors import IntakeError
from moderation.search import service as search
from moderation.search.rerank import Reranker, SearchQuery
from moderation.search.vector_index import VectorIndex

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryMaker:
    """How a run turns golden queries into search queries under its model: texts through
    the model's text tower, example images fetched and embedded as screening does."""

    text: Callable[[str], SearchQuery]
    image_uri: Callable[[str], SearchQuery]


@dataclass(frozen=True)
class Judged:
    recall: float
    precision: float
    reciprocal_rank: float


def judge(ranked: Sequence[int], relevant: set[int], k: int) -> Judged:
    """One query's figures: `ranked` are the uploads returned, best first."""
    top = list(ranked[:k])
    found = [rank for rank, upload_id in enumerate(top, 1) if upload_id in relevant]
    return Judged(
        recall=len(found) / len(relevant),
        precision=len(found) / k,
        reciprocal_rank=1.0 / found[0] if found else 0.0,
    )


@dataclass
class _Tally:
    judged: list[Judged]
    skipped: int = 0

    def figures(self, modality: Modality) -> EvaluationFigures:
        def mean(values: Iterable[float]) -> float:
            listed = list(values)
            return float(np.mean(listed)) if listed else 0.0

        return EvaluationFigures(
            modality=modality,
            queries=len(self.judged),
            skipped=self.skipped,
            recall=mean(j.recall for j in self.judged),
            precision=mean(j.precision for j in self.judged),
            mrr=mean(j.reciprocal_rank for j in self.judged),
        )


def _relevant_in_corpus(session: Session, model_id: int) -> dict[int, set[int]]:
    """Each golden query's relevant uploads that the model has embedded."""
    embedded = exists().where(
        Embedding.upload_id == GoldenRelevant.upload_id, Embedding.model_id == model_id
    )
    relevant: dict[int, set[int]] = {}
    for query_id, upload_id in session.execute(
        select(GoldenRelevant.query_id, GoldenRelevant.upload_id).where(embedded)
    ):
        relevant.setdefault(query_id, set()).add(upload_id)
    return relevant


def _search_query(
    session: Session, golden: GoldenQuery, index: VectorIndex, make: QueryMaker
) -> SearchQuery | None:
    """The golden query as a search query under the index's model; None when it cannot
    be asked (said in the log)."""
    try:
        if golden.text is not None:
            return make.text(golden.text)
        if golden.image_uri is not None:
            return make.image_uri(golden.image_uri)
        if golden.upload_id is not None:
            vector = search.upload_vector(
                session, index.model_id, index.model_name, golden.upload_id
            )
            return SearchQuery(vector=vector, model_id=index.model_id, upload_id=golden.upload_id)
    except (IntakeError, search.UploadNotEmbedded) as error:
        logger.warning("golden query %d skipped: %s", golden.id, error)
        return None
    stored = session.scalar(
        select(BankEntryEmbedding.vector).where(
            BankEntryEmbedding.bank_entry_id == golden.bank_entry_id,
            BankEntryEmbedding.model_id == index.model_id,
        )
    )
    if stored is None:
        logger.warning(
            "golden query %d skipped: bank entry %s has no embedding under %s",
            golden.id,
            golden.bank_entry_id,
            index.model_name,
        )
        return None
    return SearchQuery(vector=vector_from_bytes(stored).copy(), model_id=index.model_id)


def run(
    session: Session,
    index: VectorIndex,
    make: QueryMaker,
    *,
    reranker: Reranker,
    reranker_name: str,
    k: int,
    candidates: int,
    exact_scan_max: int,
    trigger: str,
    drop_margin: float,
) -> EvaluationRun:
    """Measure the golden set on `index` and record the run (flushed, not committed)."""
    started = time.perf_counter()
    sync_from_review(session)
    relevant = _relevant_in_corpus(session, index.model_id)
    tallies = {modality: _Tally([]) for modality in Modality}
    for golden in session.scalars(select(GoldenQuery).order_by(GoldenQuery.id)):
        tally = tallies[golden.modality]
        wanted = relevant.get(golden.id)
        query = _search_query(session, golden, index, make) if wanted else None
        if wanted is None or query is None:
            tally.skipped += 1
            continue
        # One more, when the query's own upload will be among them and left out.
        width = k + (golden.upload_id is not None)
        results = search.search(
            session,
            index,
            query,
            width,
            candidates=candidates,
            exact_scan_max=exact_scan_max,
            reranker=reranker,
        )
        ranked = [r.upload_id for r in results if r.upload_id != golden.upload_id]
        tally.judged.append(judge(ranked, wanted, k))
    evaluation = EvaluationRun(
        model_id=index.model_id,
        reranker=reranker_name,
        k=k,
        corpus_size=index.size,
        trigger=trigger,
        seconds=0.0,
    )
    session.add(evaluation)
    session.flush()
    figures = [tally.figures(modality) for modality, tally in tallies.items()]
    for figure in figures:
        figure.run_id = evaluation.id
    session.add_all(figures)
    _compare_with_previous(session, evaluation, figures, drop_margin, index.model_name)
    evaluation.seconds = time.perf_counter() - started
    session.flush()
    return evaluation


def _compare_with_previous(
    session: Session,
    evaluation: EvaluationRun,
    figures: Sequence[EvaluationFigures],
    margin: float,
    model_name: str,
) -> None:
    previous = session.scalar(
        select(EvaluationRun)
        .where(
            EvaluationRun.model_id == evaluation.model_id,
            EvaluationRun.reranker == evaluation.reranker,
            EvaluationRun.k == evaluation.k,
            EvaluationRun.id < evaluation.id,
        )
        .order_by(EvaluationRun.id.desc())
        .limit(1)
    )
    if previous is None:
        return
    before = {f.modality: f for f in figures_of(session, previous.id)}
    drops: dict[str, float] = {}
    for figure in figures:
        earlier = before.get(figure.modality)
        # A modality with no query now, or then, has no recall to fall from.
        if earlier is None or not earlier.queries or not figure.queries:
            continue
        drops[figure.modality.value] = round(earlier.recall - figure.recall, 6)
    evaluation.drops = drops
    fallen = {m: d for m, d in drops.items() if d > margin}
    evaluation.regressed = bool(fallen)
    if fallen:
        logger.warning(
            "golden-set recall@%d of %s (reranker %s) fell beyond the margin of %g since run "
            "%d: %s; corpus %d -> %d vectors",
            evaluation.k,
            model_name,
            evaluation.reranker,
            margin,
            previous.id,
            ", ".join(f"{m} -{d:.4f}" for m, d in sorted(fallen.items())),
            previous.corpus_size,
            evaluation.corpus_size,
        )


def figures_of(session: Session, run_id: int) -> list[EvaluationFigures]:
    return list(
        session.scalars(
            select(EvaluationFigures)
            .where(EvaluationFigures.run_id == run_id)
            .order_by(EvaluationFigures.modality)
        )
    )


@dataclass(frozen=True)
class RunView:
    id: int
    created_at: datetime
    model: str
    reranker: str
    k: int
    corpus_size: int
    trigger: str
    seconds: float
    regressed: bool
    drops: dict[str, float]
    # modality -> {"queries", "skipped", "recall", "precision", "mrr"}
    figures: dict[str, dict[str, float]]


def history(
    session: Session,
    *,
    model: str | None = None,
    limit: int | None = None,
    run_ids: Sequence[int] | None = None,
) -> list[RunView]:
    """Runs, newest last (the last `limit` of them; only `run_ids`, when given)."""
    statement = (
        select(EvaluationRun, EmbeddingModel.name)
        .join(EmbeddingModel, EmbeddingModel.id == EvaluationRun.model_id)
        .order_by(EvaluationRun.id.desc())
    )
    if model is not None:
        statement = statement.where(EmbeddingModel.name == model)
    if run_ids is not None:
        statement = statement.where(EvaluationRun.id.in_(run_ids))
    if limit is not None:
        statement = statement.limit(limit)
    rows = list(session.execute(statement))[::-1]
    figures: dict[int, dict[str, dict[str, float]]] = {}
    for figure in session.scalars(
        select(EvaluationFigures).where(EvaluationFigures.run_id.in_([r.id for r, _ in rows]))
    ):
        figures.setdefault(figure.run_id, {})[figure.modality.value] = {
            "queries": figure.queries,
            "skipped": figure.skipped,
            "recall": figure.recall,
            "precision": figure.precision,
            "mrr": figure.mrr,
        }
    return [
        RunView(
            id=r.id,
            created_at=r.created_at,
            model=name,
            reranker=r.reranker,
            k=r.k,
            corpus_size=r.corpus_size,
            trigger=r.trigger,
            seconds=r.seconds,
            regressed=r.regressed,
            drops=dict(r.drops),
            figures=figures.get(r.id, {}),
        )
        for r, name in rows
    ]


def run_view(session: Session, run_id: int) -> RunView:
    (view,) = history(session, run_ids=[run_id])
    return view


def latest_runs(session: Session) -> list[RunView]:
    """The newest run of each model and reranker (for /metrics, at every scrape)."""
    newest = session.scalars(
        select(func.max(EvaluationRun.id)).group_by(EvaluationRun.model_id, EvaluationRun.reranker)
    ).all()
    return history(session, run_ids=list(newest))


@dataclass(frozen=True)
class ComparedFigure:
    modality: str
    measure: str
    a: float
    b: float

    @property
    def change(self) -> float:
        return self.b - self.a


def compare(a: RunView, b: RunView) -> list[ComparedFigure]:
    """Two runs' figures side by side, per modality and measure (b - a: positive is better)."""
    rows = []
    for modality in Modality:
        first, second = a.figures.get(modality.value), b.figures.get(modality.value)
        if not first or not second or not first["queries"] or not second["queries"]:
            continue
        for measure in ("recall", "precision", "mrr"):
            rows.append(ComparedFigure(modality.value, measure, first[measure], second[measure]))
    return rows
