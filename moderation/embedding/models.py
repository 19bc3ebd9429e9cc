"""Embedding models and the per-upload embeddings they produced."""

from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, CreatedAtMixin, IdMixin


class EmbeddingModel(IdMixin, CreatedAtMixin, Base):
    """A model that produced embeddings. Vectors from different models are never compared."""

    __tablename__ = "embedding_models"

    # The Hugging Face id or local directory, exactly as configured in MODERATION_MODEL.
    name: Mapped[str] = mapped_column(String(512), unique=True)
    dim: Mapped[int] = mapped_column(Integer)


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
