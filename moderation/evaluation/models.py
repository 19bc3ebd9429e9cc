"""The golden set and the runs measured on it.

A golden query is a text, an example image (by URI), an upload, or a bank entry (its
stored embedding stands for its source, which the bank never holds); the uploads relevant
to it are judged by an analyst or derived from review (a confirmed hit: the entry's source
finds the upload). Each run keeps, per modality, the mean figures over the queries it could
ask, with the corpus it searched, so that a fall as the corpus grows shows.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, CreatedAtMixin, IdMixin, enum_column


class Modality(enum.StrEnum):
    """What a query is, and so which gap it measures: text→image or image→image."""

    TEXT = "text"
    IMAGE = "image"


class GoldenOrigin(enum.StrEnum):
    ANALYST = "analyst"
    REVIEW = "review"


class GoldenQuery(IdMixin, CreatedAtMixin, Base):
    __tablename__ = "golden_queries"
    __table_args__ = (
        # Each query once: adding it again adds to its relevant uploads.
        UniqueConstraint("text"),
        UniqueConstraint("image_uri"),
        UniqueConstraint("upload_id"),
        UniqueConstraint("bank_entry_id"),
        CheckConstraint(
            "num_nonnulls(text, image_uri, upload_id, bank_entry_id) = 1", name="one_subject"
        ),
        CheckConstraint("(modality = 'text') = (text IS NOT NULL)", name="text_is_text"),
    )

    modality: Mapped[Modality] = mapped_column(enum_column(Modality, "query_modality"))
    origin: Mapped[GoldenOrigin] = mapped_column(enum_column(GoldenOrigin, "golden_origin"))
    text: Mapped[str | None] = mapped_column(Text)
    # Fetched under the URI policy at each run, as a search by example image is.
    image_uri: Mapped[str | None] = mapped_column(Text)
    upload_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("uploads.id", ondelete="CASCADE")
    )
    bank_entry_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("bank_entries.id", ondelete="CASCADE")
    )
    created_by: Mapped[str] = mapped_column(String(200))
    note: Mapped[str | None] = mapped_column(Text)


class GoldenRelevant(Base):
    """An upload that a golden query should find."""

    __tablename__ = "golden_relevant"

    query_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("golden_queries.id", ondelete="CASCADE"), primary_key=True
    )
    upload_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    # Review-derived pairs follow the decision: a hit no longer confirmed removes its pair.
    origin: Mapped[GoldenOrigin] = mapped_column(enum_column(GoldenOrigin, "golden_origin"))
    added_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class EvaluationRun(IdMixin, CreatedAtMixin, Base):
    """One measurement of a model (and a reranker) on the golden set."""

    __tablename__ = "evaluation_runs"
    __table_args__ = (
        # The run before this one, of the same model, reranker and k: what a fall is from.
        Index("ix_evaluation_runs_model_id_reranker_id", "model_id", "reranker", "id"),
    )

    model_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("embedding_models.id"))
    reranker: Mapped[str] = mapped_column(String(32))
    k: Mapped[int] = mapped_column(Integer)
    # Vectors in the index searched (frames of screened uploads under the model).
    corpus_size: Mapped[int] = mapped_column(BigInteger)
    # "cli", "api" or "schedule".
    trigger: Mapped[str] = mapped_column(String(16))
    seconds: Mapped[float] = mapped_column(Float)
    # Recall fell by more than the margin from the previous comparable run, in a modality.
    regressed: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # Per modality, the fall in recall from that run ({} when there was none before).
    drops: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default="{}")


class EvaluationFigures(Base):
    """A run's figures for one query modality: means over the queries asked."""

    __tablename__ = "evaluation_figures"

    run_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("evaluation_runs.id", ondelete="CASCADE"), primary_key=True
    )
    modality: Mapped[Modality] = mapped_column(
        enum_column(Modality, "query_modality"), primary_key=True
    )
    queries: Mapped[int] = mapped_column(Integer)
    # Queries left out: nothing relevant in the corpus, or the query itself unreadable
    # (an example image gone, an entry or upload with no embedding under the model).
    skipped: Mapped[int] = mapped_column(Integer)
    recall: Mapped[float] = mapped_column(Float)
    precision: Mapped[float] = mapped_column(Float)
    mrr: Mapped[float] = mapped_column(Float)
