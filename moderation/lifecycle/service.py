"""Registry changes that need more than the registry: retiring checks the banks.

Every function takes a session and leaves committing to the caller; each change writes
its audit row in the same transaction (`registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.banks.models import BankEntryEmbedding
from moderation.banks.service import clip_coverage_lost
from moderation.embedding import registry
from moderation.embedding.models import Embedding, EmbeddingModel, ModelState
from moderation.errors import Conflict


class CoverageLost(Conflict):
    """Retiring the model would leave bank entries with no CLIP embedding computed."""

    code = "coverage_lost"

    def __init__(self, model: str, lost: dict[str, int]) -> None:
        banks = ", ".join(f"{bank}: {count}" for bank, count in lost.items())
        super().__init__(
            f"retiring {model!r} would stop CLIP matching for {sum(lost.values())} bank "
            f"entr{'y' if sum(lost.values()) == 1 else 'ies'} embedded by no other computed "
            f"model ({banks}); re-embed them (`moderation reembed --model NAME`), or retire "
            "with --force to match them by their hashes only",
            banks=lost,
        )
        self.lost = lost


def retire(session: Session, name: str, *, actor: str, force: bool = False) -> EmbeddingModel:
    """Stop computing a model, unless banks would lose CLIP coverage (`CoverageLost`,
    which names the banks and counts their entries); `force` retires regardless."""
    model = registry.get_model(session, name)
    if model.state is ModelState.CANDIDATE:
        kept = [m.id for m in registry.computed_models(session) if m.id != model.id]
        lost = clip_coverage_lost(session, model.id, kept)
        if lost and not force:
            raise CoverageLost(model.name, lost)
    return registry.retire(session, name, actor=actor, forced=force)


@dataclass(frozen=True)
class ModelView:
    id: int
    name: str
    family: str | None
    dim: int
    state: str
    fingerprint: str | None
    embeddings: int
    bank_entries: int
    created_at: datetime
    state_changed_at: datetime | None


def list_models(session: Session) -> list[ModelView]:
    """Every registered model, the computed ones first, with what it has embedded."""
    embeddings = (
        select(Embedding.model_id, func.count().label("n")).group_by(Embedding.model_id).subquery()
    )
    entries = (
        select(BankEntryEmbedding.model_id, func.count().label("n"))
        .group_by(BankEntryEmbedding.model_id)
        .subquery()
    )
    rows = session.execute(
        select(
            EmbeddingModel,
            func.coalesce(embeddings.c.n, 0),
            func.coalesce(entries.c.n, 0),
        )
        .outerjoin(embeddings, embeddings.c.model_id == EmbeddingModel.id)
        .outerjoin(entries, entries.c.model_id == EmbeddingModel.id)
        .order_by(EmbeddingModel.state.in_(["active", "candidate"]).desc(), EmbeddingModel.id)
    )
    return [
        ModelView(
            id=m.id,
            name=m.name,
            family=m.family,
            dim=m.dim,
            state=m.state.value,
            fingerprint=m.fingerprint,
            embeddings=n_embeddings,
            bank_entries=n_entries,
            created_at=m.created_at,
            state_changed_at=m.state_changed_at,
        )
        for m, n_embeddings, n_entries in rows
    ]
