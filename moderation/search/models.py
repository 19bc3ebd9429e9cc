"""Recall measurements of the serving index, kept so that a fall as the corpus grows shows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String
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
