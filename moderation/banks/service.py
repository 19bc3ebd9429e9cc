"""Creating banks and adding entries to them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import exists, false, func, select
from sqlalchemy.orm import Session

from moderation import pg_copy
from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
from moderation.embedding.models import EmbeddingModel
from moderation.embedding.service import vector_to_bytes
from moderation.images.decode import DecodeLimits
from moderation.images.hashing import PdqHash
from moderation.images.signals import extract_signals
from moderation.retrohunt import service as retrohunt

if TYPE_CHECKING:
    from moderation.embedding.clip import ClipEmbedder


class BankNotFound(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no bank named {name!r}; create it with `moderation bank create {name}`")


class BankExists(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"a bank named {name!r} already exists")


@dataclass(frozen=True)
class NewEntry:
    """Signals of one known-bad item. At least one of them must be present."""

    sha256: bytes | None = None
    pdq: PdqHash | None = None
    embedding: np.ndarray | None = None  # L2-normalised, from `model`
    model: EmbeddingModel | None = None
    source_ref: str | None = None


@dataclass(frozen=True)
class BankSummary:
    id: int
    name: str
    radius: float | None
    enabled: bool
    entries: int
    # Entries with a CLIP embedding, per model: a worker matches only its own model's.
    clip_entries: dict[str, int]


def create_bank(session: Session, name: str, radius: float | None = None) -> Bank:
    if radius is not None and not 0 <= radius <= 2:
        raise ValueError(f"radius is a cosine distance between 0 and 2, got {radius}")
    if session.scalar(select(Bank.id).where(Bank.name == name)) is not None:
        raise BankExists(name)
    bank = Bank(name=name, radius=radius, enabled=True)
    session.add(bank)
    session.flush()
    return bank


def get_bank(session: Session, name: str) -> Bank:
    bank = session.scalar(select(Bank).where(Bank.name == name))
    if bank is None:
        raise BankNotFound(name)
    return bank


def list_banks(session: Session) -> list[BankSummary]:
    rows = session.execute(
        select(Bank, func.count(BankEntry.id))
        .outerjoin(BankEntry, BankEntry.bank_id == Bank.id)
        .group_by(Bank.id)
        .order_by(Bank.name)
    )
    clip = clip_entries_by_model(session)
    return [
        BankSummary(
            id=bank.id,
            name=bank.name,
            radius=bank.radius,
            enabled=bank.enabled,
            entries=n,
            clip_entries=clip.get(bank.id, {}),
        )
        for bank, n in rows
    ]


def clip_entries_by_model(session: Session) -> dict[int, dict[str, int]]:
    """Per bank id, its entries with a CLIP embedding under each model, by model name."""
    rows = session.execute(
        select(BankEntry.bank_id, EmbeddingModel.name, func.count())
        .join(BankEntryEmbedding, BankEntryEmbedding.bank_entry_id == BankEntry.id)
        .join(EmbeddingModel, EmbeddingModel.id == BankEntryEmbedding.model_id)
        .group_by(BankEntry.bank_id, EmbeddingModel.name)
        .order_by(EmbeddingModel.name)
    )
    counts: dict[int, dict[str, int]] = {}
    for bank_id, model, n in rows:
        counts.setdefault(bank_id, {})[model] = n
    return counts


def unmatchable_clip_entries(session: Session, model: str) -> dict[str, int]:
    """Per enabled bank, by name, the entries with CLIP embeddings under other models only:
    a worker running `model` cannot match them on CLIP (their hashes still match). Banks
    with none are left out; an empty result means `model` sees every CLIP entry."""
    model_id = session.scalar(select(EmbeddingModel.id).where(EmbeddingModel.name == model))
    embedded = exists().where(BankEntryEmbedding.bank_entry_id == BankEntry.id)
    under_model = (
        exists().where(
            BankEntryEmbedding.bank_entry_id == BankEntry.id,
            BankEntryEmbedding.model_id == model_id,
        )
        if model_id is not None
        else false()
    )
    rows = session.execute(
        select(Bank.name, func.count(BankEntry.id))
        .join(BankEntry, BankEntry.bank_id == Bank.id)
        # Disabled banks are not matched at all (see `matcher`).
        .where(Bank.enabled, embedded, ~under_model)
        .group_by(Bank.name)
        .order_by(Bank.name)
    )
    return {name: n for name, n in rows}


def add_entries(
    session: Session, bank: Bank, entries: list[NewEntry], *, added_by: str
) -> list[BankEntry]:
    rows = []
    for entry in entries:
        if entry.sha256 is None and entry.pdq is None and entry.embedding is None:
            raise ValueError("a bank entry needs at least one of SHA-256, PDQ or an embedding")
        row = BankEntry(
            bank=bank,
            sha256=entry.sha256,
            pdq=entry.pdq.bits if entry.pdq else None,
            pdq_quality=entry.pdq.quality if entry.pdq else None,
            source_ref=entry.source_ref,
            added_by=added_by,
        )
        if entry.embedding is not None:
            if entry.model is None:
                raise ValueError("an embedding must say which model produced it")
            if entry.embedding.shape != (entry.model.dim,):
                raise ValueError(
                    f"embedding has shape {entry.embedding.shape}; model {entry.model.name!r} "
                    f"produces ({entry.model.dim},)"
                )
            row.embeddings.append(
                BankEntryEmbedding(model_id=entry.model.id, vector=vector_to_bytes(entry.embedding))
            )
        rows.append(row)
    session.add_all(rows)
    session.flush()
    if rows:
        # In this transaction: the entries are never committed without their hunt.
        retrohunt.record_entries_added(
            session,
            bank,
            min(row.id for row in rows),
            max(row.id for row in rows),
            len(rows),
            created_by=added_by,
        )
    return rows


# Rows per COPY: 20,000 768-d embeddings are 60 MB of COPY data.
_ROWS_PER_COPY = 20_000


def copy_entries(
    session: Session,
    bank: Bank,
    *,
    model: EmbeddingModel,
    vectors: np.ndarray,
    pdq: np.ndarray | None = None,
    added_by: str,
) -> int:
    """Add one entry per row of `vectors` (L2-normalised, from `model`), with the PDQ hash
    of the same row of `pdq` (n x 32 bytes, quality unknown) if given, by binary COPY:
    a bank of a million entries in minutes, where `add_entries` builds an object per row.
    Returns the number of entries added. Like `add_entries`, makes the retro-hunt job that
    searches past uploads for them, in the same transaction."""
    if vectors.ndim != 2 or vectors.shape[1] != model.dim:
        raise ValueError(
            f"embeddings have shape {vectors.shape}; model {model.name!r} is {model.dim}-d"
        )
    if pdq is not None and pdq.shape != (len(vectors), 32):
        raise ValueError(f"PDQ hashes have shape {pdq.shape}; expected ({len(vectors)}, 32)")
    by = added_by.encode()
    entry_fields = [
        ("id", ">i8"),
        ("bank_id", ">i8"),
        ("added_by", f"V{len(by)}"),
        *([("pdq", "V32")] if pdq is not None else []),
    ]
    # Stored as `vector_to_bytes` stores them: little-endian float32.
    embedding_fields = [
        ("bank_entry_id", ">i8"),
        ("model_id", ">i8"),
        ("vector", f"V{4 * model.dim}"),
    ]
    first_id: int | None = None
    last_id: int | None = None
    for start in range(0, len(vectors), _ROWS_PER_COPY):
        chunk = np.ascontiguousarray(vectors[start : start + _ROWS_PER_COPY], "<f4")
        ids = session.scalars(
            select(func.nextval(func.pg_get_serial_sequence("bank_entries", "id"))).select_from(
                func.generate_series(1, len(chunk))
            )
        ).all()
        entries = pg_copy.new_rows(entry_fields, len(chunk))
        entries["id"] = ids
        entries["bank_id"] = bank.id
        entries["added_by"] = np.void(by)
        if pdq is not None:
            hashes = np.ascontiguousarray(pdq[start : start + _ROWS_PER_COPY], np.uint8)
            entries["pdq"] = hashes.view("V32").reshape(-1)
        pg_copy.copy_in(session, "bank_entries", entries)
        embeddings = pg_copy.new_rows(embedding_fields, len(chunk))
        embeddings["bank_entry_id"] = ids
        embeddings["model_id"] = model.id
        embeddings["vector"] = chunk.view(f"V{4 * model.dim}").reshape(-1)
        pg_copy.copy_in(session, "bank_entry_embeddings", embeddings)
        first_id = min(ids) if first_id is None else min(first_id, min(ids))
        last_id = max(ids) if last_id is None else max(last_id, max(ids))
    if first_id is not None and last_id is not None:
        retrohunt.record_entries_added(
            session, bank, first_id, last_id, len(vectors), created_by=added_by
        )
    return len(vectors)


def entry_from_image(
    data: bytes,
    embedder: ClipEmbedder,
    model: EmbeddingModel,
    limits: DecodeLimits,
    source_ref: str | None,
) -> NewEntry:
    """An entry for a known-bad image: its SHA-256, and its first frame's PDQ and embedding,
    computed exactly as screening computes them. Raises `BadInput`."""
    signals = extract_signals(data, limits, embedder.preprocess)
    vector = embedder.embed_one(signals.embedding_inputs()[0])
    return NewEntry(
        sha256=signals.sha256,
        pdq=signals.frames[0].pdq,
        embedding=vector,
        model=model,
        source_ref=source_ref,
    )
