"""Embedding models and vectors in the database."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from moderation.embedding.models import EmbeddingModel
from moderation.errors import Conflict, Invalid
from moderation.images.budget import Budget
from moderation.images.decode import DecodeLimits
from moderation.images.signals import ImageSignals, extract_signals

if TYPE_CHECKING:
    from moderation.embedding.embedder import Embedder


class InvalidEmbedding(Invalid):
    code = "invalid_embedding"


class ModelMismatch(Conflict):
    """A model name already registered with another dimension."""

    code = "model_mismatch"


def vector_to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def vector_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4")


def normalise(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows, refusing rows that cannot be (zero, NaN or infinite)."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(vectors)) or np.any(norms == 0):
        raise InvalidEmbedding("embeddings must be finite and non-zero")
    normalised: np.ndarray = vectors / norms
    return normalised


def get_or_create_model(session: Session, name: str, dim: int) -> EmbeddingModel:
    """The row for a model, created on first use; concurrent workers agree on one row."""
    session.execute(
        insert(EmbeddingModel)
        .values(name=name, dim=dim)
        .on_conflict_do_nothing(index_elements=[EmbeddingModel.name])
    )
    model = session.scalars(select(EmbeddingModel).where(EmbeddingModel.name == name)).one()
    if model.dim != dim:
        raise ModelMismatch(
            f"model {name!r} is registered with {model.dim}-d embeddings but produces {dim}-d; "
            "a changed checkpoint needs a new name"
        )
    return model


def model_dim(name: str) -> int:
    """A checkpoint's embedding size, read from its config without loading the weights."""
    from moderation.embedding.families import embedding_dim

    return embedding_dim(name)


def embed_first_frame(
    data: bytes, embedder: Embedder, limits: DecodeLimits, *, budget: Budget | None = None
) -> tuple[ImageSignals, np.ndarray]:
    """An image's signals and its first frame's embedding, decoded and preprocessed exactly
    as screening does: the one way an image outside screening (a bank entry, a shared
    embedding, a search by example) is embedded. Raises `BadInput`. `budget`: the
    process's decode budget, where it decodes for many callers at once."""
    signals = extract_signals(data, limits, embedder.preprocess, budget)
    return signals, embedder.embed_one(signals.embedding_inputs()[0])
