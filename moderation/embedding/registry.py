"""The model registry: which embedding models exist, which one searches use, which ones
workers compute.

    add ─▶ candidate ──activate──▶ active ──(another is activated)──▶ candidate
              │                                                          │
              └──────────────────────retire──────────────────────────────┴─▶ retired

- **candidate**: computed by every worker beside the active model, so uploads screened
  during a change get both embeddings and every bank entry keeps matching under the
  model it has; re-embedded in the background (`moderation.reembed`).
- **active**: computed by every worker, and what searches use. Exactly one (a partial
  unique index; activation demotes the previous one in the same transaction). The
  previous active model becomes a candidate, still computed: bank entries that only it
  has embedded (no source to re-embed them from) keep matching until an operator retires
  it, and activating it again is the way back.
- **retired**: never computed again; kept so that old embeddings and hits name it.

Workers follow the registry, not `MODERATION_MODEL`, which only seeds the first active
model (`seed_active`). A model's identity is its name and its fingerprint (weights and
preprocessing): the same name with other weights is refused (`FingerprintMismatch`),
never mixed. Every change is audited in its own transaction; callers commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.embedding.checkpoints import is_directory
from moderation.embedding.models import COMPUTED_STATES, EmbeddingModel, ModelState
from moderation.embedding.service import ModelMismatch, get_or_create_model
from moderation.errors import Conflict, NotFound

if TYPE_CHECKING:
    from moderation.embedding.embedder import Embedder


class FingerprintMismatch(ModelMismatch):
    """The same name, other weights or preprocessing."""

    code = "fingerprint_mismatch"

    def __init__(self, name: str, registered: str, found: str) -> None:
        super().__init__(
            f"model {name!r} is registered with fingerprint {registered[:16]}, but the "
            f"checkpoint found under that name has {found[:16]}: its weights or preprocessing "
            "changed. Embeddings of two checkpoints are never mixed under one name; register "
            "the new one under a name of its own (another directory, or a revision id)"
        )


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no model named {name!r} is registered; see `moderation model list`")


class BadTransition(Conflict):
    """A state change the lifecycle does not allow (see the module docstring)."""

    code = "model_state"


def registered_name(name_or_path: str) -> str:
    """The name a checkpoint is registered under: an existing local directory as its
    absolute path (workers elsewhere load it from there), a Hugging Face id as given."""
    return str(Path(name_or_path).resolve()) if is_directory(name_or_path) else name_or_path


def get_model(session: Session, name: str) -> EmbeddingModel:
    model = session.scalar(
        select(EmbeddingModel).where(EmbeddingModel.name.in_({name, registered_name(name)}))
    )
    if model is None:
        raise ModelNotFound(name)
    return model


def active_model(session: Session) -> EmbeddingModel | None:
    return session.scalar(select(EmbeddingModel).where(EmbeddingModel.state == ModelState.ACTIVE))


def computed_models(session: Session) -> list[EmbeddingModel]:
    """The models workers compute: the active one first, then the candidates by age."""
    return list(
        session.scalars(
            select(EmbeddingModel)
            .where(EmbeddingModel.state.in_(COMPUTED_STATES))
            .order_by(EmbeddingModel.state != ModelState.ACTIVE, EmbeddingModel.id)
        )
    )


def serving_name(session: Session, configured: str) -> str:
    """The active model's name; the configured one where the registry has none yet."""
    active = active_model(session)
    return active.name if active is not None else configured


def registered(session: Session, embedder: Embedder) -> EmbeddingModel:
    """The registry's row for a loaded embedder (made, retired, if it has none), held to
    its identity: raises `FingerprintMismatch` for other weights under its name."""
    model = get_or_create_model(session, registered_name(embedder.name), embedder.dim)
    check_identity(
        session, model, family=embedder.family, dim=embedder.dim, fingerprint=embedder.fingerprint
    )
    return model


def check_identity(
    session: Session, model: EmbeddingModel, *, family: str, dim: int, fingerprint: str
) -> None:
    """Hold a loaded checkpoint to its registered identity; a row that has none yet (made
    before the registry, or from precomputed embeddings) adopts this one."""
    if model.dim != dim:
        raise ModelMismatch(
            f"model {model.name!r} is registered with {model.dim}-d embeddings but produces "
            f"{dim}-d; a changed checkpoint needs a new name"
        )
    if model.fingerprint is not None and model.fingerprint != fingerprint:
        raise FingerprintMismatch(model.name, model.fingerprint, fingerprint)
    if model.fingerprint is None or model.family is None:
        model.fingerprint, model.family = fingerprint, family
        session.flush()


def add(
    session: Session, name: str, *, family: str, dim: int, fingerprint: str, actor: str
) -> tuple[EmbeddingModel, bool]:
    """Register a checkpoint as a candidate (a retired one becomes a candidate again);
    the model and whether its state changed. Raises `FingerprintMismatch`."""
    name = registered_name(name)
    session.execute(
        insert(EmbeddingModel)
        .values(name=name, dim=dim, family=family, fingerprint=fingerprint, state="candidate")
        .on_conflict_do_nothing(index_elements=[EmbeddingModel.name])
    )
    model = session.scalars(
        select(EmbeddingModel).where(EmbeddingModel.name == name).with_for_update()
    ).one()
    check_identity(session, model, family=family, dim=dim, fingerprint=fingerprint)
    created = model.state_changed_at is None and model.state is ModelState.CANDIDATE
    changed = model.state is ModelState.RETIRED or created
    before = None if created else {"state": model.state.value}
    if model.state is ModelState.RETIRED:
        model.state = ModelState.CANDIDATE
    if changed:
        model.state_changed_at = func.now()
        audit.record(
            session,
            actor=actor,
            action="model.add",
            subject_type="embedding_model",
            subject_id=model.id,
            before=before,
            after={"state": model.state.value, "name": name, "fingerprint": fingerprint},
        )
    session.flush()
    return model, changed


def seed_active(
    session: Session, name: str, *, family: str, dim: int, fingerprint: str | None
) -> EmbeddingModel:
    """The active model; if there is none yet (a new database, or one from before the
    registry), the configured checkpoint becomes it. Concurrent seeders agree on one."""
    active = active_model(session)
    if active is not None:
        return active
    # Serialises seeders: the second waits here, then finds the first one's active model.
    session.execute(select(func.pg_advisory_xact_lock(0x6D6F64656C)))
    active = active_model(session)
    if active is not None:
        return active
    name = registered_name(name)
    session.execute(
        insert(EmbeddingModel)
        .values(name=name, dim=dim, family=family, fingerprint=fingerprint)
        .on_conflict_do_nothing(index_elements=[EmbeddingModel.name])
    )
    model = session.scalars(
        select(EmbeddingModel).where(EmbeddingModel.name == name).with_for_update()
    ).one()
    if fingerprint is not None:
        check_identity(session, model, family=family, dim=dim, fingerprint=fingerprint)
    before = model.state.value
    model.state = ModelState.ACTIVE
    model.state_changed_at = func.now()
    audit.record(
        session,
        actor="configuration:MODERATION_MODEL",
        action="model.seed",
        subject_type="embedding_model",
        subject_id=model.id,
        before={"state": before},
        after={"state": ModelState.ACTIVE.value},
    )
    session.flush()
    return model


def _locked(session: Session, name: str) -> EmbeddingModel:
    model = get_model(session, name)
    session.refresh(model, with_for_update=True)
    return model


def activate(session: Session, name: str, *, actor: str) -> EmbeddingModel:
    """Make a candidate the active model; the previous active model becomes a candidate
    (still computed: see the module docstring). Workers and searches follow within their
    poll interval."""
    model = _locked(session, name)
    if model.state is ModelState.ACTIVE:
        return model
    if model.state is not ModelState.CANDIDATE:
        raise BadTransition(
            f"model {model.name!r} is {model.state.value}; only a candidate can be activated "
            f"(`moderation model add {model.name}` makes it one again)"
        )
    previous = session.scalar(
        select(EmbeddingModel).where(EmbeddingModel.state == ModelState.ACTIVE).with_for_update()
    )
    if previous is not None:
        previous.state = ModelState.CANDIDATE
        previous.state_changed_at = func.now()
        session.flush()  # before the new one: the unique index admits one active row
    model.state = ModelState.ACTIVE
    model.state_changed_at = func.now()
    audit.record(
        session,
        actor=actor,
        action="model.activate",
        subject_type="embedding_model",
        subject_id=model.id,
        before={"state": ModelState.CANDIDATE.value, "active": previous and previous.name},
        after={"state": ModelState.ACTIVE.value},
    )
    session.flush()
    return model


def retire(session: Session, name: str, *, actor: str, forced: bool = False) -> EmbeddingModel:
    """Stop computing a model. The active model cannot be retired (activate another
    first). The caller has checked what the banks would lose (`moderation.reembed`)."""
    model = _locked(session, name)
    if model.state is ModelState.ACTIVE:
        raise BadTransition(
            f"model {model.name!r} is the active model; activate another before retiring it"
        )
    if model.state is ModelState.RETIRED:
        return model
    before = model.state.value
    model.state = ModelState.RETIRED
    model.state_changed_at = func.now()
    audit.record(
        session,
        actor=actor,
        action="model.retire",
        subject_type="embedding_model",
        subject_id=model.id,
        before={"state": before},
        after={"state": ModelState.RETIRED.value, "forced": forced},
    )
    session.flush()
    return model
