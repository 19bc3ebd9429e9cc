"""Keeping a model's Milvus collection equal to PostgreSQL: `moderation index sync`.

PostgreSQL is the source of truth; the collection is derived from it and rebuildable. One
pass (`CollectionSync.turn`) does two tails, each by id with the commit-horizon rule
(`moderation.commit_horizon`), so rows that commit out of order are neither skipped nor
written twice:

1. `embeddings` of the model above its checkpoint: each new row is written (upserted by
   embedding id) with its upload's filter fields as they stand.
2. `search_changes` above its checkpoint: the uploads whose fields changed since they were
   screened (a review decision, a retroactive hit, a status change) or whose embeddings
   or row were deleted. Their rows are written again from what PostgreSQL holds now, and
   rows PostgreSQL no longer has are deleted. Triggers write that log in the changing
   transaction itself (migration 0015), so no change can commit unannounced.

Writes are idempotent (upsert and delete by embedding id), and a checkpoint is recorded
only after the writes it covers succeeded. A pass that fails (Milvus away, PostgreSQL
away) forgets what it held in memory and the next pass starts again from the recorded
checkpoints: some rows are written twice over, none is missed, none is duplicated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, delete, func, select, text
from sqlalchemy.orm import Session

from moderation.commit_horizon import (
    Horizon,
    sequence_value,
    settle,
    settled_value,
    snapshot_bounds,
)
from moderation.config import Settings
from moderation.embedding import registry
from moderation.embedding.models import Embedding, EmbeddingModel
from moderation.embedding.service import vector_from_bytes
from moderation.search.filters import NO_TIME, epoch_us
from moderation.search.follow import read_since
from moderation.search.indexes import recall_from_scores
from moderation.search.milvus_index import (
    Milvus,
    MilvusIndex,
    MilvusPlan,
    create_collection,
    delete_ids,
    drop_collection,
    ids_of_uploads,
    load_collection,
    next_collection_name,
    serving_collection,
    switch_alias,
    upsert_rows,
)
from moderation.search.models import MilvusSyncState, SearchChange

logger = logging.getLogger(__name__)

# The filter fields of a set of uploads, as the collection stores them.
_FIELDS = text(
    """
    SELECT u.id, u.status::text, u.finished_at, coalesce(u.error_code, ''),
           count(h.id) > 0,
           coalesce(array_agg(DISTINCT b.name) FILTER (WHERE b.name IS NOT NULL), '{}'),
           coalesce(array_agg(DISTINCT h.review_status::text) FILTER (WHERE h.id IS NOT NULL),
                    '{}')
    FROM uploads u
    LEFT JOIN hits h ON h.upload_id = u.id
    LEFT JOIN bank_entries e ON e.id = h.bank_entry_id
    LEFT JOIN banks b ON b.id = e.bank_id
    WHERE u.id = ANY(:ids)
    GROUP BY u.id
    """
)
# Rows read per statement when a change pass re-reads the embeddings of changed uploads.
_CHANGE_CHUNK = 2_000


@dataclass(frozen=True)
class UploadFields:
    finished_at: int
    status: str
    error_code: str
    has_hit: bool
    banks: list[str]
    review_statuses: list[str]


def upload_fields(conn: Connection | Session, upload_ids: Sequence[int]) -> dict[int, UploadFields]:
    """The filter fields of each upload that still exists."""
    if not upload_ids:
        return {}
    fields = {}
    for id_, status, finished, error, has_hit, banks, reviews in conn.execute(
        _FIELDS, {"ids": sorted(set(upload_ids))}
    ):
        fields[int(id_)] = UploadFields(
            finished_at=epoch_us(finished) if finished is not None else NO_TIME,
            status=status,
            error_code=error,
            has_hit=bool(has_hit),
            banks=sorted(banks)[:256],
            review_statuses=sorted(reviews),
        )
    return fields


def _row(
    embedding_id: int, upload_id: int, vector: np.ndarray, fields: UploadFields
) -> dict[str, Any]:
    return {
        "id": embedding_id,
        "upload_id": upload_id,
        "vector": vector.tolist(),
        "finished_at": fields.finished_at,
        "status": fields.status,
        "error_code": fields.error_code,
        "has_hit": fields.has_hit,
        "banks": fields.banks,
        "review_statuses": fields.review_statuses,
    }


@dataclass
class TurnReport:
    written: int = 0
    deleted: int = 0
    changed_uploads: int = 0
    embeddings_checkpoint: int = 0
    changes_checkpoint: int = 0


@dataclass
class CollectionSync:
    """The in-memory side of one collection's sync: what the checkpoints cannot say yet
    (rows above them already written, horizons waiting to settle). Losing it costs only
    re-writes."""

    engine: Engine
    milvus: Milvus
    model_id: int
    dim: int
    collection: str
    commit_lag_s: float
    embeddings_checkpoint: int = 0
    changes_checkpoint: int = 0
    _embeddings_pending: list[Horizon] = field(default_factory=list)
    _changes_pending: list[Horizon] = field(default_factory=list)
    _written_above: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def __post_init__(self) -> None:
        self._reload()

    def _reload(self) -> None:
        with Session(self.engine) as session:
            state = session.get_one(MilvusSyncState, self.collection)
            self.embeddings_checkpoint = state.embeddings_checkpoint
            self.changes_checkpoint = state.changes_checkpoint
        self._embeddings_pending = []
        self._changes_pending = []
        self._written_above = np.empty(0, np.int64)

    def turn(self) -> TurnReport:
        """One pass of both tails; the checkpoints recorded once its writes are done."""
        try:
            return self._turn()
        except BaseException:
            self._reload()  # start again from what is recorded
            raise

    def _turn(self) -> TurnReport:
        with self.engine.connect() as conn:
            started: datetime = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
        report = TurnReport()
        report.written += self._tail_embeddings()
        written, deleted, changed = self._tail_changes()
        report.written += written
        report.deleted += deleted
        report.changed_uploads = changed
        with Session(self.engine) as session, session.begin():
            state = session.get_one(MilvusSyncState, self.collection, with_for_update=True)
            state.embeddings_checkpoint = self.embeddings_checkpoint
            state.changes_checkpoint = self.changes_checkpoint
            state.synced_through = started
            # The log below every collection's checkpoint is read by nobody any more.
            session.execute(
                delete(SearchChange).where(
                    SearchChange.id
                    <= select(func.min(MilvusSyncState.changes_checkpoint)).scalar_subquery()
                )
            )
        report.embeddings_checkpoint = self.embeddings_checkpoint
        report.changes_checkpoint = self.changes_checkpoint
        return report

    def _tail_embeddings(self) -> int:
        read = read_since(
            self.engine, self.model_id, self.dim, self.embeddings_checkpoint, self._written_above
        )
        if len(read.embedding_ids):
            with self.engine.connect() as conn:
                fields = upload_fields(conn, read.upload_ids.tolist())
            rows = [
                _row(int(e), int(u), v, fields[int(u)])
                for e, u, v in zip(read.embedding_ids, read.upload_ids, read.vectors, strict=True)
                if int(u) in fields  # deleted since: its change removes it
            ]
            upsert_rows(self.milvus, self.collection, rows)
            self._written_above = np.union1d(self._written_above, read.embedding_ids)
        self.embeddings_checkpoint, self._embeddings_pending = settle(
            self.embeddings_checkpoint,
            self._embeddings_pending,
            read.bounds,
            read.horizon,
            self.commit_lag_s,
        )
        self._written_above = self._written_above[self._written_above > self.embeddings_checkpoint]
        return len(read.embedding_ids)

    def _tail_changes(self) -> tuple[int, int, int]:
        """Rewrite or delete the rows of uploads changed since the changes checkpoint, from
        one snapshot that also saw the changes themselves."""
        with self.engine.connect() as conn:
            allocated, read_at = sequence_value(conn, "search_changes")
            conn.rollback()
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                bounds = snapshot_bounds(conn)
                uploads = sorted(
                    set(
                        conn.scalars(
                            select(SearchChange.upload_id).where(
                                SearchChange.id > self.changes_checkpoint
                            )
                        )
                    )
                )
                current: dict[int, tuple[int, np.ndarray]] = {}
                for start in range(0, len(uploads), _CHANGE_CHUNK):
                    chunk = uploads[start : start + _CHANGE_CHUNK]
                    for id_, upload_id, vector in conn.execute(
                        select(Embedding.id, Embedding.upload_id, Embedding.vector).where(
                            Embedding.model_id == self.model_id, Embedding.upload_id.in_(chunk)
                        )
                    ):
                        current[int(id_)] = (int(upload_id), vector_from_bytes(vector))
                fields = upload_fields(conn, uploads)
        written = deleted = 0
        if uploads:
            rows = [
                _row(id_, upload_id, vector, fields[upload_id])
                for id_, (upload_id, vector) in current.items()
                if upload_id in fields
            ]
            held = ids_of_uploads(self.milvus, self.collection, uploads)
            gone = [id_ for id_, upload_id in held if id_ not in current or upload_id not in fields]
            written = upsert_rows(self.milvus, self.collection, rows)
            deleted = delete_ids(self.milvus, self.collection, gone)
        self.changes_checkpoint, self._changes_pending = settle(
            self.changes_checkpoint,
            self._changes_pending,
            bounds,
            Horizon(allocated=allocated, xmax=bounds.xmax, read_at=read_at),
            self.commit_lag_s,
        )
        return written, deleted, len(uploads)

    def caught_up_to(self, embeddings: int, changes: int) -> bool:
        return self.embeddings_checkpoint >= embeddings and self.changes_checkpoint >= changes


# --- collections: the first one, rebuilds, opening for search ----------------------------


def _add_state(engine: Engine, collection: str, model_id: int, parameters: dict[str, Any]) -> None:
    """Record the collection, then wait for every transaction that started before: one
    that checked for a synced collection before this row existed wrote no change-log row,
    and must have ended before the first read so that the read sees its change."""
    with Session(engine) as session, session.begin():
        session.add(
            MilvusSyncState(collection=collection, model_id=model_id, parameters=parameters)
        )
    with Session(engine) as session:
        while settled_value(session, "search_changes", wait_s=60.0) is None:
            logger.warning("waiting for transactions older than collection %s to end", collection)


def _count_embeddings(engine: Engine, model_id: int) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).where(Embedding.model_id == model_id)) or 0)


def _sequence_values(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return sequence_value(conn, "embeddings")[0], sequence_value(conn, "search_changes")[0]


@dataclass(frozen=True)
class SyncSettings:
    plan: MilvusPlan
    commit_lag_s: float
    recall_target: float
    recall_k: int
    candidates: int
    tuning_queries: int

    @classmethod
    def from_settings(cls, settings: Settings) -> SyncSettings:
        return cls(
            plan=MilvusPlan.from_settings(settings),
            commit_lag_s=settings.search_commit_lag_s,
            recall_target=settings.search_recall_target,
            recall_k=settings.search_recall_k,
            candidates=settings.search_candidates,
            tuning_queries=settings.search_tuning_queries,
        )


def synced_models(
    settings: Settings, only: str | None = None
) -> Callable[[Session], list[EmbeddingModel]]:
    """The models whose collections a sync keeps: those workers compute (active and
    candidates) and the configured one, or only the one named."""

    def models(session: Session) -> list[EmbeddingModel]:
        if only is not None:
            return [registry.get_model(session, registry.registered_name(only))]
        found = registry.computed_models(session)
        configured = session.scalar(
            select(EmbeddingModel).where(EmbeddingModel.name == settings.resolved_model())
        )
        if configured is not None and configured.id not in {m.id for m in found}:
            found.append(configured)
        return found

    return models


def fill(
    engine: Engine,
    milvus: Milvus,
    model: EmbeddingModel,
    config: SyncSettings,
    *,
    timeout_s: float = 3600.0,
) -> tuple[str, CollectionSync]:
    """A new collection for the model, filled from PostgreSQL until its checkpoints pass
    the sequences' values at the start, and tuned; not yet behind the alias."""
    alias = milvus.settings.alias(model.id)
    name = next_collection_name(milvus, alias)
    index = config.plan.index_for(_count_embeddings(engine, model.id), model.dim)
    _add_state(engine, name, model.id, dict(index))
    create_collection(milvus, name, model.dim, index)
    sync = CollectionSync(engine, milvus, model.id, model.dim, name, config.commit_lag_s)
    embeddings, changes = _sequence_values(engine)
    deadline = time.monotonic() + timeout_s
    while not sync.caught_up_to(embeddings, changes):
        sync.turn()
        if time.monotonic() > deadline:
            raise TimeoutError(f"filling {name} did not catch up in {timeout_s:g} s")
        if not sync.caught_up_to(embeddings, changes):
            time.sleep(max(0.05, config.commit_lag_s / 2))
    return name, sync


def tune_collection(
    engine: Engine, milvus: Milvus, model: EmbeddingModel, collection: str, config: SyncSettings
) -> dict[str, Any]:
    """Measure and set the collection's search breadth (ef or nprobe) for the recall
    target, on stored vectors as queries against exact search over PostgreSQL's rows;
    recorded with the collection's state."""
    with Session(engine) as session:
        state = session.get_one(MilvusSyncState, collection)
        parameters = dict(state.parameters)
    index = MilvusIndex(
        milvus, model_id=model.id, model_name=model.name, dim=model.dim, parameters=parameters
    )
    index.alias = collection  # measured before the alias points at it
    queries = sample_vectors(engine, model.id, config.tuning_queries)
    if len(queries) >= 2:
        k = min(config.recall_k, len(queries) - 1)
        exact = exact_scores(engine, model.id, queries, k)
        index.tune(
            queries,
            exact,
            lambda ids, q: rescore(engine, ids, q),
            target=config.recall_target,
            k=k,
            candidates=config.candidates,
        )
        # Filtered searches at 10% and 1% selectivity, the filter being one on embedding
        # ids that passes that share of rows, wherever they lie.
        for label, modulus in (("10%", 10), ("1%", 100)):
            if _count_embeddings(engine, model.id) // modulus < k:
                continue  # too few passing rows to measure
            index.tune_filtered(
                queries,
                exact_scores(engine, model.id, queries, k, modulus=modulus),
                lambda ids, q: rescore(engine, ids, q),
                expression=f"id % {modulus} == 0",
                label=label,
                target=config.recall_target,
                k=k,
                candidates=config.candidates,
            )
    with Session(engine) as session, session.begin():
        session.get_one(MilvusSyncState, collection).parameters = index.parameters
    return index.parameters


def sample_vectors(engine: Engine, model_id: int, count: int, seed: int = 0) -> np.ndarray:
    with engine.connect() as conn:
        ids = list(conn.scalars(select(Embedding.id).where(Embedding.model_id == model_id)))
        if not ids:
            return np.empty((0, 0), np.float32)
        chosen = np.random.default_rng(seed).choice(ids, size=min(count, len(ids)), replace=False)
        rows = conn.execute(select(Embedding.vector).where(Embedding.id.in_(chosen.tolist())))
        return np.stack([vector_from_bytes(v) for (v,) in rows])


def exact_scores(
    engine: Engine, model_id: int, queries: np.ndarray, k: int, *, modulus: int = 1
) -> np.ndarray:
    """The exact top-k scores of each query over every row of the model (with an id
    divisible by `modulus`), streamed."""
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    statement = select(Embedding.vector).where(Embedding.model_id == model_id)
    if modulus > 1:
        statement = statement.where(Embedding.id % modulus == 0)
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=10_000).execute(statement)
        for chunk in result.partitions(10_000):
            vectors = np.frombuffer(b"".join(row[0] for row in chunk), dtype="<f4").reshape(
                len(chunk), -1
            )
            merged = np.concatenate([best, queries @ vectors.T], axis=1)
            best = -np.sort(-merged, axis=1)[:, :k]
    return best


def rescore(engine: Engine, ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact scores of results `ids` (q, c; -1 none) from PostgreSQL's vectors."""
    wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
    with engine.connect() as conn:
        vectors = {
            int(id_): vector_from_bytes(v)
            for id_, v in conn.execute(
                select(Embedding.id, Embedding.vector).where(Embedding.id.in_(wanted))
            )
        }
    scores = np.full(ids.shape, -np.inf, dtype=np.float32)
    for row, slot in zip(*np.nonzero(ids >= 0), strict=True):
        vector = vectors.get(int(ids[row, slot]))
        if vector is not None:
            scores[row, slot] = float(queries[row] @ vector)
    return scores


def ensure_collection(
    engine: Engine, milvus: Milvus, model: EmbeddingModel, config: SyncSettings
) -> str:
    """The collection behind the model's alias, filled and put there first if none is."""
    alias = milvus.settings.alias(model.id)
    current = serving_collection(milvus, alias)
    if current is not None:
        # A server restarted after a crash may hold the collection unloaded: writes still
        # land, but searches and queries fail until it is loaded again (measured on 2.3.5).
        load_collection(milvus, current)
        with Session(engine) as session:
            if session.get(MilvusSyncState, current) is None:  # state lost: start it again
                session.add(MilvusSyncState(collection=current, model_id=model.id))
                session.commit()
        return current
    name, _ = fill(engine, milvus, model, config)
    tune_collection(engine, milvus, model, name, config)
    switch_alias(milvus, alias, name)
    logger.info("collection %s of model %s is serving as %s", name, model.name, alias)
    return name


def rebuild(
    engine: Engine, milvus: Milvus, model: EmbeddingModel, config: SyncSettings
) -> dict[str, Any]:
    """A new collection, filled and tuned while the old one serves, then the alias moved to
    it in one call and the old one dropped."""
    alias = milvus.settings.alias(model.id)
    name, sync = fill(engine, milvus, model, config)
    parameters = tune_collection(engine, milvus, model, name, config)
    sync.turn()  # what committed while tuning
    before = switch_alias(milvus, alias, name)
    if before is not None and before != name:
        with Session(engine) as session, session.begin():
            session.execute(delete(MilvusSyncState).where(MilvusSyncState.collection == before))
        drop_collection(milvus, before)
    return {
        "model": model.name,
        "alias": alias,
        "collection": name,
        "replaced": before,
        **parameters,
    }


def open_index(engine: Engine, milvus: Milvus, model: EmbeddingModel) -> MilvusIndex:
    """The model's collection for searching, through its alias (`NoCollection` if none)."""
    from moderation.search.milvus_index import NoCollection

    alias = milvus.settings.alias(model.id)
    collection = serving_collection(milvus, alias)
    if collection is None:
        raise NoCollection(model.name, alias)
    with Session(engine) as session:
        state = session.get(MilvusSyncState, collection)
        parameters = dict(state.parameters) if state else {}
        checkpoint = state.embeddings_checkpoint if state else 0
    return MilvusIndex(
        milvus,
        model_id=model.id,
        model_name=model.name,
        dim=model.dim,
        parameters=parameters,
        checkpoint=checkpoint,
    )


@dataclass(frozen=True)
class Lag:
    model: str
    collection: str
    rows: int  # embeddings of the model above the recorded checkpoint
    seconds: float | None  # since the start of the last completed pass; None before one


def lags(session: Session) -> list[Lag]:
    """Each synced collection's lag, from PostgreSQL alone (so /metrics answers while
    Milvus is away, and shows the lag growing)."""
    rows = session.execute(
        select(
            EmbeddingModel.name,
            MilvusSyncState.collection,
            select(func.count())
            .where(
                Embedding.model_id == MilvusSyncState.model_id,
                Embedding.id > MilvusSyncState.embeddings_checkpoint,
            )
            .scalar_subquery(),
            func.extract("epoch", func.now() - MilvusSyncState.synced_through),
        ).join(EmbeddingModel, EmbeddingModel.id == MilvusSyncState.model_id)
    )
    return [
        Lag(name, collection, int(count), float(seconds) if seconds is not None else None)
        for name, collection, count, seconds in rows
    ]


def evaluate_against_exact(
    engine: Engine, index: MilvusIndex, queries: np.ndarray, k: int, candidates: int
) -> float:
    """Recall@k of the collection as searches are served, for `queries`."""
    exact = exact_scores(engine, index.model_id, queries, k)
    _, ids, _ = index.search(queries, max(k, candidates))
    served = -np.sort(-rescore(engine, ids, queries), axis=1)[:, :k]
    return recall_from_scores(served, exact)


class SyncLoop:
    """Passes over every synced model's collection, every `interval_s`: `moderation index
    sync`, or a thread of `moderation api` (MODERATION_MILVUS_SYNC_IN_API). A failed pass
    (Milvus or PostgreSQL away) is logged and tried again at the next turn, from the
    recorded checkpoints."""

    def __init__(
        self,
        engine: Engine,
        milvus: Milvus,
        config: SyncSettings,
        models: Callable[[Session], list[EmbeddingModel]],
    ) -> None:
        self.engine = engine
        self.milvus = milvus
        self.config = config
        self.models = models
        self._syncs: dict[int, CollectionSync] = {}
        self.failures = 0

    def run_once(self) -> dict[str, TurnReport]:
        with Session(self.engine, expire_on_commit=False) as session:
            models = self.models(session)
        reports = {}
        for model in models:
            sync = self._syncs.get(model.id)
            alias = self.milvus.settings.alias(model.id)
            serving = serving_collection(self.milvus, alias)
            if sync is None or sync.collection != serving:  # first pass, or a rebuild moved it
                collection = ensure_collection(self.engine, self.milvus, model, self.config)
                sync = self._syncs[model.id] = CollectionSync(
                    self.engine,
                    self.milvus,
                    model.id,
                    model.dim,
                    collection,
                    self.config.commit_lag_s,
                )
            reports[model.name] = sync.turn()
        return reports

    def run(self, stop: threading.Event, interval_s: float) -> None:
        while not stop.is_set():
            try:
                for name, report in self.run_once().items():
                    if report.written or report.deleted:
                        logger.info(
                            "synced %s: %d written, %d deleted",
                            name,
                            report.written,
                            report.deleted,
                        )
                self.failures = 0
            except Exception as error:
                self.failures += 1
                self._syncs.clear()  # re-read the checkpoints when the pass succeeds again
                log = logger.exception if self.failures == 1 else logger.warning
                log("the Milvus sync pass failed (%s); retrying from the checkpoints", error)
            stop.wait(interval_s)

    def start(self, interval_s: float) -> Callable[[], None]:
        """Run in a daemon thread; the returned function stops it."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self.run, args=(stop, interval_s), name="milvus-sync", daemon=True
        )
        thread.start()

        def stopper() -> None:
            stop.set()
            thread.join()

        return stopper
