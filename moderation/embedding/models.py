"""Embedding models (the registry) and the per-upload embeddings they produced."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, CreatedAtMixin, IdMixin, enum_column


class ModelState(enum.StrEnum):
    # Computed by every worker beside the active model (a model change in progress, or
    # the previous active model kept for bank entries that only it has embedded); not
    # what searches use unless asked for by name.
    CANDIDATE = "candidate"
    # Computed by every worker; what searches use. Exactly one.
    ACTIVE = "active"
    # Never computed again; kept so that old embeddings and hits still name their model.
    RETIRED = "retired"


COMPUTED_STATES = (ModelState.ACTIVE, ModelState.CANDIDATE)


class EmbeddingModel(IdMixin, CreatedAtMixin, Base):
    """A model that produced embeddings. Vectors from different models are never compared.
    Its identity is its name and its fingerprint (weights and preprocessing)."""

    __tablename__ = "embedding_models"
    __table_args__ = (
        # Exactly one active model: at most one by this index, at least one by the
        # registry's transitions (activation demotes the previous one in its transaction).
        Index(
            "uq_embedding_models_one_active",
            "state",
            unique=True,
            postgresql_where=text("state = 'active'"),
        ),
    )

    # The Hugging Face id or local directory (absolute) the workers load it from.
    name: Mapped[str] = mapped_column(String(512), unique=True)
    dim: Mapped[int] = mapped_column(Integer)
    # "clip" or "siglip"; NULL for a row made before the registry, until a worker loads it.
    family: Mapped[str | None] = mapped_column(String(32))
    # SHA-256 of the weights and preprocessing (`Embedder.fingerprint`); NULL until first
    # loaded (rows made before the registry, or from precomputed embeddings).
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[ModelState] = mapped_column(
        enum_column(ModelState, "model_state"),
        default=ModelState.RETIRED,
        server_default=ModelState.RETIRED.value,
    )
    state_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Embedding(IdMixin, CreatedAtMixin, Base):
    """One frame of one upload, embedded by one model: L2-normalised float32, little-endian."""

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("upload_id", "model_id", "frame_index"),
        # The general index tails this table per model in id order.
        Index("ix_embeddings_model_id_id", "model_id", "id"),
    )

    upload_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("uploads.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("embedding_models.id"))
    frame_index: Mapped[int] = mapped_column(Integer, default=0)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
