"""Creating banks and adding entries to them."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
from moderation.embedding.models import EmbeddingModel
from moderation.embedding.service import vector_to_bytes
from moderation.images.decode import DecodeLimits
from moderation.images.hashing import PdqHash
from moderation.images.signals import extract_signals

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
    return [
        BankSummary(id=bank.id, name=bank.name, radius=bank.radius, enabled=bank.enabled, entries=n)
        for bank, n in rows
    ]


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
    return rows


# Rows per COPY: 20,000 768-d embeddings are 60 MB of COPY data.
_ROWS_PER_COPY = 20_000
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


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
    Returns the number of entries added."""
    if vectors.ndim != 2 or vectors.shape[1] != model.dim:
        raise ValueError(
            f"embeddings have shape {vectors.shape}; model {model.name!r} is {model.dim}-d"
        )
    if pdq is not None and pdq.shape != (len(vectors), 32):
        raise ValueError(f"PDQ hashes have shape {pdq.shape}; expected ({len(vectors)}, 32)")
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    for start in range(0, len(vectors), _ROWS_PER_COPY):
        chunk = vectors[start : start + _ROWS_PER_COPY]
        ids = np.array(
            session.scalars(
                select(func.nextval(func.pg_get_serial_sequence("bank_entries", "id"))).select_from(
                    func.generate_series(1, len(chunk))
                )
            ).all(),
            np.int64,
        )
        hashes = None if pdq is None else pdq[start : start + _ROWS_PER_COPY]
        cursor.copy_expert(
            "COPY bank_entries (id, bank_id, pdq, added_by) FROM STDIN (FORMAT binary)",
            io.BytesIO(_copy_data(_entry_rows(ids, bank.id, hashes, added_by))),
        )
        cursor.copy_expert(
            "COPY bank_entry_embeddings (bank_entry_id, model_id, vector)"
            " FROM STDIN (FORMAT binary)",
            io.BytesIO(_copy_data(_embedding_rows(ids, model.id, chunk))),
        )
    return len(vectors)


def _copy_data(rows: np.ndarray) -> bytes:
    return _COPY_HEADER + rows.tobytes() + _COPY_TRAILER


def _entry_rows(ids: np.ndarray, bank_id: int, pdq: np.ndarray | None, added_by: str) -> np.ndarray:
    """Rows of PostgreSQL's binary COPY format: a field count, then each field's length
    (-1 for NULL) and big-endian value."""
    by = added_by.encode()
    pdq_field = [("pdq", "V32")] if pdq is not None else []
    rows = np.zeros(
        len(ids),
        [
            ("fields", ">i2"),
            ("id_length", ">i4"),
            ("id", ">i8"),
            ("bank_length", ">i4"),
            ("bank_id", ">i8"),
            ("pdq_length", ">i4"),
            *pdq_field,
            ("by_length", ">i4"),
            ("added_by", f"V{len(by)}"),
        ],
    )
    rows["fields"] = 4
    rows["id_length"] = rows["bank_length"] = 8
    rows["id"] = ids
    rows["bank_id"] = bank_id
    if pdq is not None:
        rows["pdq_length"] = 32
        rows["pdq"] = np.ascontiguousarray(pdq, np.uint8).view("V32").reshape(-1)
    else:
        rows["pdq_length"] = -1
    rows["by_length"] = len(by)
    rows["added_by"] = np.void(by)
    return rows


def _embedding_rows(ids: np.ndarray, model_id: int, vectors: np.ndarray) -> np.ndarray:
    width = 4 * vectors.shape[1]
    rows = np.zeros(
        len(ids),
        [
            ("fields", ">i2"),
            ("entry_length", ">i4"),
            ("bank_entry_id", ">i8"),
            ("model_length", ">i4"),
            ("model_id", ">i8"),
            ("vector_length", ">i4"),
            ("vector", f"V{width}"),
        ],
    )
    rows["fields"] = 3
    rows["entry_length"] = rows["model_length"] = 8
    rows["bank_entry_id"] = ids
    rows["model_id"] = model_id
    rows["vector_length"] = width
    # Stored as `vector_to_bytes` stores them: little-endian float32.
    rows["vector"] = np.ascontiguousarray(vectors, "<f4").view(f"V{width}").reshape(-1)
    return rows


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
