"""Creating banks and adding entries to them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import exists, false, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from moderation import pg_copy
from moderation.audit import service as audit
from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
from moderation.embedding.models import EmbeddingModel
from moderation.embedding.service import embed_first_frame, vector_to_bytes
from moderation.errors import Conflict, Invalid, NotFound
from moderation.images.decode import DecodeLimits
from moderation.images.hashing import PdqHash

if TYPE_CHECKING:
    from moderation.embedding.embedder import Embedder


class BankNotFound(NotFound):
    code = "bank_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no bank named {name!r}; create it with `moderation bank create {name}`")


class InvalidBank(Invalid):
    """A bank name or radius the service cannot take."""

    code = "invalid_bank"


class InvalidEntry(Invalid):
    """A bank entry without a signal, or with an embedding of the wrong shape."""

    code = "invalid_entry"


class BankExists(Conflict):
    code = "bank_exists"

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


# A bank's name is a path segment of the API and of the pages (`/v1/banks/{name}`): no
# slash, no NUL (which PostgreSQL text cannot hold), and it fits the column.
BANK_NAME_PATTERN = r"^[^\x00/]+$"
MAX_BANK_NAME = 200


def check_bank_name(name: str) -> str:
    if not re.fullmatch(BANK_NAME_PATTERN, name) or len(name) > MAX_BANK_NAME:
        raise InvalidBank(
            f"a bank name is 1 to {MAX_BANK_NAME} characters without '/' (it names the bank "
            f"in URLs), got {name!r}"
        )
    return name


def create_bank(session: Session, name: str, radius: float | None = None) -> Bank:
    check_bank_name(name)
    if radius is not None and not 0 <= radius <= 2:
        raise InvalidBank(f"radius is a cosine distance between 0 and 2, got {radius}")
    if session.scalar(select(Bank.id).where(Bank.name == name)) is not None:
        raise BankExists(name)
    bank = Bank(name=name, radius=radius, enabled=True)
    try:
        # Two requests creating one name both pass the check above; the second insert waits
        # for the first transaction and then violates the unique name: still "exists".
        with session.begin_nested():
            session.add(bank)
            session.flush()
    except IntegrityError as error:
        if getattr(error.orig, "pgcode", None) != _UNIQUE_VIOLATION:
            raise
        raise BankExists(name) from None
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


def clip_coverage_lost(session: Session, model_id: int, kept: Sequence[int]) -> dict[str, int]:
    """Per bank, by name, the entries embedded under `model_id` and under none of the
    models `kept` (those still computed): retiring the model would leave them unmatched
    on CLIP (their hashes still match). Disabled banks count too: enabling one again must
    not find its entries blind. Banks with none are left out."""
    under = BankEntryEmbedding.bank_entry_id == BankEntry.id
    rows = session.execute(
        select(Bank.name, func.count(BankEntry.id))
        .join(BankEntry, BankEntry.bank_id == Bank.id)
        .where(
            exists().where(under, BankEntryEmbedding.model_id == model_id),
            ~exists().where(under, BankEntryEmbedding.model_id.in_(list(kept))),
        )
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
            raise InvalidEntry("a bank entry needs at least one of SHA-256, PDQ or an embedding")
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
                raise InvalidEntry("an embedding must say which model produced it")
            if entry.embedding.shape != (entry.model.dim,):
                raise InvalidEntry(
                    f"embedding has shape {entry.embedding.shape}; model {entry.model.name!r} "
                    f"produces ({entry.model.dim},)"
                )
            row.embeddings.append(
                BankEntryEmbedding(model_id=entry.model.id, vector=vector_to_bytes(entry.embedding))
            )
        rows.append(row)
    session.add_all(rows)
    session.flush()
    return rows


# Rows per COPY: 20,000 768-d embeddings are 60 MB of COPY data.
_ROWS_PER_COPY = 20_000
# The SQLSTATE the database raises for an entry that confirmed or escalated hits keep.
_RESTRICT_VIOLATION = "23001"
# ... and for a value a unique constraint already holds.
_UNIQUE_VIOLATION = "23505"


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
    Returns the number of entries added. The triggers log them, as any entries added
    (past uploads are then searched for them: `moderation.retrohunt`)."""
    if vectors.ndim != 2 or vectors.shape[1] != model.dim:
        raise InvalidEntry(
            f"embeddings have shape {vectors.shape}; model {model.name!r} is {model.dim}-d"
        )
    if pdq is not None and pdq.shape != (len(vectors), 32):
        raise InvalidEntry(f"PDQ hashes have shape {pdq.shape}; expected ({len(vectors)}, 32)")
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
    return len(vectors)


def entry_from_image(
    data: bytes,
    embedder: Embedder,
    model: EmbeddingModel,
    limits: DecodeLimits,
    source_ref: str | None,
) -> NewEntry:
    """An entry for a known-bad image: its SHA-256, and its first frame's PDQ and embedding,
    computed exactly as screening computes them. Raises `BadInput`."""
    signals, vector = embed_first_frame(data, embedder, limits)
    return NewEntry(
        sha256=signals.sha256,
        pdq=signals.frames[0].pdq,
        embedding=vector,
        model=model,
        source_ref=source_ref,
    )


# Changes made through the API and the CLI, each audited in its own transaction. `create_bank`
# and `add_entries` stay plain (many callers, and retro-hunts hook `add_entries`); the
# surfaces record those two with `audit_created` and `audit_added`.


class EntryNotFound(NotFound):
    code = "entry_not_found"

    def __init__(self, bank: str, entry_id: int) -> None:
        super().__init__(
            f"bank {bank!r} has no entry {entry_id}; `GET /v1/banks/{bank}/entries` lists them"
        )


class EntryHasDecidedHits(Conflict):
    """Removing an entry removes its hits (they cascade); confirmed or escalated hits are a
    reviewer's decision on record, so an entry that has any is kept."""

    code = "entry_has_decided_hits"

    def __init__(self, entry_id: int, count: int) -> None:
        super().__init__(
            f"entry {entry_id} has {count} confirmed or escalated hit(s), which removing it "
            "would delete; disable the bank instead, or dismiss those hits first"
        )


def bank_state(bank: Bank) -> dict[str, Any]:
    return {"name": bank.name, "radius": bank.radius, "enabled": bank.enabled}


def entry_state(entry: BankEntry) -> dict[str, Any]:
    return {
        "bank_entry_id": entry.id,
        "sha256": entry.sha256.hex() if entry.sha256 else None,
        "pdq": entry.pdq.hex() if entry.pdq else None,
        "pdq_quality": entry.pdq_quality,
        "models": sorted(e.model_id for e in entry.embeddings),
        # Where the source lives is restricted: the audit log says only that there was one.
        "has_source_ref": entry.source_ref is not None,
        "added_by": entry.added_by,
    }


def audit_created(session: Session, bank: Bank, *, actor: str) -> None:
    audit.record(
        session,
        actor=actor,
        action="bank.create",
        subject_type="bank",
        subject_id=bank.id,
        after=bank_state(bank),
    )


def audit_added(
    session: Session, bank: Bank, rows: list[BankEntry], *, actor: str, how: str
) -> None:
    """One event per call, listing the new entry ids (an import may add thousands)."""
    audit.record(
        session,
        actor=actor,
        action="bank.entries.add",
        subject_type="bank",
        subject_id=bank.id,
        after={"bank": bank.name, "how": how, "count": len(rows), "ids": [r.id for r in rows]},
    )


_UNSET: Any = object()


def update_bank(
    session: Session,
    bank: Bank,
    *,
    actor: str,
    enabled: bool | None = None,
    radius: float | None = _UNSET,
) -> Bank:
    """Enable or disable a bank, or change its CLIP radius (None: the global radius)."""
    before = bank_state(bank)
    if enabled is not None:
        bank.enabled = enabled
    if radius is not _UNSET:
        if radius is not None and not 0 <= radius <= 2:
            raise InvalidBank(f"radius is a cosine distance between 0 and 2, got {radius}")
        bank.radius = radius
    after = bank_state(bank)
    if after != before:
        session.flush()
        audit.record(
            session,
            actor=actor,
            action="bank.update",
            subject_type="bank",
            subject_id=bank.id,
            before=before,
            after=after,
        )
    return bank


def pdq_in_bank(session: Session, bank: Bank, hashes: list[bytes]) -> set[bytes]:
    """Those of `hashes` the bank already has as an entry's PDQ."""
    found: set[bytes] = set()
    unique = list(set(hashes))
    for start in range(0, len(unique), 10_000):
        found.update(
            session.scalars(
                select(BankEntry.pdq).where(
                    BankEntry.bank_id == bank.id, BankEntry.pdq.in_(unique[start : start + 10_000])
                )
            )
        )
    return found


def list_entries(
    session: Session, bank: Bank, *, after_id: int | None = None, limit: int = 100
) -> list[BankEntry]:
    """Entries in id order, after `after_id` when given (keyset pagination)."""
    query = (
        select(BankEntry)
        .where(BankEntry.bank_id == bank.id)
        .options(selectinload(BankEntry.embeddings))
        .order_by(BankEntry.id)
        .limit(limit)
    )
    if after_id is not None:
        query = query.where(BankEntry.id > after_id)
    return list(session.scalars(query))


def remove_entry(session: Session, bank: Bank, entry_id: int, *, actor: str) -> dict[str, Any]:
    """Delete an entry, and with it its undecided hits (the foreign key's cascade); what it
    was, as audited. An entry with confirmed or escalated hits is kept: the database
    refuses to delete it (migration 0012), whoever asks, and this raises
    `EntryHasDecidedHits`."""
    entry = session.scalar(
        select(BankEntry)
        .where(BankEntry.id == entry_id, BankEntry.bank_id == bank.id)
        .with_for_update()
    )
    if entry is None:
        raise EntryNotFound(bank.name, entry_id)
    before = {**entry_state(entry), "bank": bank.name}
    try:
        with session.begin_nested():
            session.delete(entry)
            session.flush()
    except IntegrityError as error:
        diagnosis = getattr(error.orig, "diag", None)
        if getattr(error.orig, "pgcode", None) != _RESTRICT_VIOLATION or diagnosis is None:
            raise
        raise EntryHasDecidedHits(entry_id, int(diagnosis.message_detail)) from None
    audit.record(
        session,
        actor=actor,
        action="bank.entries.remove",
        subject_type="bank",
        subject_id=bank.id,
        before=before,
    )
    return before
