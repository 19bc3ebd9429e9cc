"""Recall measurements of the serving index, kept so that a fall as the corpus grows shows;
and what a Milvus index follows PostgreSQL by: the change log and each collection's checkpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Float, ForeignKey, Index, Integer, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, CreatedAtMixin, IdMixin


class IndexEvaluation(IdMixin, CreatedAtMixin, Base):
    """One `moderation index eval`: recall@k of the index a model's searches are served
    from, against exact search, over a sample of stored vectors used as queries."""

    __tablename__ = "index_evaluations"
    __table_args__ = (Index("ix_index_evaluations_model_id_id", "model_id", "id"),)

    model_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("embedding_models.id"))
    # flat, hnsw, ivf_flat or ivf_pq, and its parameters (M, efSearch, nlist, nprobe, ...).
    index_kind: Mapped[str] = mapped_column(String(16))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONB)
    corpus_size: Mapped[int] = mapped_column(BigInteger)
    k: Mapped[int] = mapped_column(Integer)
    queries: Mapped[int] = mapped_column(Integer)
    recall: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)


class SearchChange(IdMixin, Base):
    """The change log a Milvus index follows for its filter fields: one row per upload whose
    status, finish time, error, hits or review status changed after it was screened, or
    whose embeddings or row were deleted. Written by triggers (migration 0015) in the
    transaction of the change itself, so it exists exactly when the change committed, and
    only while some Milvus collection is synced (a row in `milvus_sync_state`): an
    installation on Faiss writes nothing here. Read by id with the commit-horizon rule
    (`moderation.commit_horizon`); rows every sync has passed are pruned by the sync."""

    __tablename__ = "search_changes"

    # No foreign key: the row must outlive a deleted upload, whose deletion it announces.
    upload_id: Mapped[int] = mapped_column(BigInteger)


class MilvusSyncState(Base):
    """How far one Milvus collection has followed PostgreSQL. Upserts and deletes are
    idempotent, so a checkpoint written after the writes it covers is always safe: a sync
    that dies between the two re-writes a few rows, never skips one."""

    __tablename__ = "milvus_sync_state"

    collection: Mapped[str] = mapped_column(String(255), primary_key=True)
    model_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("embedding_models.id"))
    # Every `embeddings` row of the model at or below this id is in the collection.
    embeddings_checkpoint: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Every `search_changes` row at or below this id has been applied.
    changes_checkpoint: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Everything committed before this moment is in the collection: the start of the last
    # pass that completed. /metrics and /readyz report now minus this as the lag.
    synced_through: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The collection's index (type, M, efConstruction or nlist) and its tuned search
    # breadth (ef or nprobe) with the recall measured for it.
    parameters: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default="{}")
