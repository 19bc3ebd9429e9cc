"""Reading banks' entries for matching, by binary COPY into row stores.

One reading serves both a full load (every entry of every enabled bank, into the stores
a new index is made of) and a refresh (the entries a change names, into small stores
whose rows then replace those entries' rows).

Both read by binary COPY (see `moderation.pg_copy`) into arrays, the vectors into one
preallocated float32 array. `bench/matching.py --load` on a 2-core machine shared with
other jobs, 768-d: 100,000 entries in 2.1 s, peak RSS 405 MB above the process's (the
vectors are 293 MB), where building lists of rows, stacking them and adding them to Faiss
took 5.6 s and 975 MB; 1,000,000 in 20-31 s, peak 3.2 GB above (2.9 GB of vectors):
PostgreSQL producing the rows about 8 s of it, filling the array 5, its norms 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from moderation import pg_copy
from moderation.banks.clip_plan import ClipPlan
from moderation.banks.clip_search import ClipRows
from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
from moderation.banks.pdq_search import PdqRows
from moderation.banks.rows import Sha256Rows, SignalRows
from moderation.images.hashing import PDQ_BYTES


@dataclass
class SignalStores:
    """The rows of each signal (see `moderation.banks.rows`)."""

    sha256: Sha256Rows
    pdq: PdqRows
    clip: ClipRows

    @classmethod
    def empty(
        cls, dim: int, *, device: str = "cpu", plan: ClipPlan | None = None, capacity: int = 0
    ) -> SignalStores:
        """`plan`: how the CLIP rows are searched, which decides the copies they keep."""
        return cls(
            sha256=Sha256Rows(),
            pdq=PdqRows(),
            clip=ClipRows(dim, device=device, plan=plan, capacity=capacity),
        )

    def seal(self) -> None:
        for store in self.all():
            store.seal()

    def all(self) -> tuple[SignalRows, SignalRows, SignalRows]:
        return self.sha256, self.pdq, self.clip

    def compact_where_needed(self) -> None:
        """Replace each store that has too many retired rows by a compacted copy (the
        snapshots made before keep the old one)."""
        if self.sha256.needs_compaction():
            self.sha256 = self.sha256.compacted()
        if self.pdq.needs_compaction():
            self.pdq = self.pdq.compacted()
        if self.clip.needs_compaction():
            self.clip = self.clip.compacted()


@dataclass(frozen=True)
class Reading:
    """What to read: which entries, for which model and settings."""

    model_id: int
    dim: int
    default_radius: float
    pdq_min_quality: int


def read_radii(
    session: Session, reading: Reading, where: ColumnElement[bool] | None = None
) -> dict[int, float]:
    """Each enabled bank's CLIP radius (its own, or the default), of the banks `where`."""
    query = select(Bank.id, func.coalesce(Bank.radius, reading.default_radius)).where(Bank.enabled)
    if where is not None:
        query = query.where(where)
    return {bank_id: float(radius) for bank_id, radius in session.execute(query)}


def read_entries(
    session: Session, reading: Reading, where: ColumnElement[bool], into: SignalStores
) -> np.ndarray:
    """Append the signals of the entries of enabled banks that satisfy `where` to the
    stores; the ids of the entries read (whether or not they had a usable signal)."""
    entry_ids = _read_hashes(session, reading, where, into)
    _read_vectors(session, reading, where, into.clip)
    return entry_ids


def _read_hashes(
    session: Session, reading: Reading, where: ColumnElement[bool], into: SignalStores
) -> np.ndarray:
    """SHA-256 hashes, and PDQ hashes good enough to match on."""
    no_hash = func.decode(func.repeat("00", 32), "hex")  # NULLs have no place in fixed rows
    query = (
        select(
            BankEntry.id,
            BankEntry.bank_id,
            BankEntry.sha256.is_not(None),
            func.coalesce(BankEntry.sha256, no_hash),
            BankEntry.pdq.is_not(None)
            & (
                BankEntry.pdq_quality.is_(None) | (BankEntry.pdq_quality >= reading.pdq_min_quality)
            ),
            func.coalesce(BankEntry.pdq, no_hash),
        )
        .join(Bank)
        .where(Bank.enabled, where)
    )
    fields = [
        ("id", ">i8"),
        ("bank_id", ">i8"),
        ("has_sha256", "?"),
        ("sha256", "V32"),
        ("has_pdq", "?"),
        ("pdq", (np.uint8, PDQ_BYTES)),
    ]
    read: list[np.ndarray] = [np.empty(0, np.int64)]

    def add(rows: np.ndarray) -> None:
        read.append(rows["id"].astype(np.int64))
        sha = rows[rows["has_sha256"]]
        into.sha256.append(sha["id"], sha["bank_id"], sha["sha256"])
        pdq = rows[rows["has_pdq"]]
        into.pdq.append(pdq["id"], pdq["bank_id"], pdq["pdq"])

    pg_copy.copy_out(session, query, fields, add)
    return np.concatenate(read)


def _read_vectors(
    session: Session, reading: Reading, where: ColumnElement[bool], into: ClipRows
) -> None:
    """The embeddings of the model, streamed into the store's preallocated array: the bank
    is held once, never as a list of rows and then a copy of it."""
    of_entries = (
        select(BankEntryEmbedding.bank_entry_id)
        .join(BankEntry, BankEntry.id == BankEntryEmbedding.bank_entry_id)
        .join(Bank, Bank.id == BankEntry.bank_id)
        .where(Bank.enabled, where, BankEntryEmbedding.model_id == reading.model_id)
    )
    # The stream takes rows of one width (the length of a stored value is read without
    # reading the value). Entries committed between this count and the stream are
    # appended by growing the arrays.
    other_width = func.octet_length(BankEntryEmbedding.vector) != 4 * reading.dim
    count, malformed = session.execute(
        of_entries.with_only_columns(
            func.count(), func.min(BankEntryEmbedding.bank_entry_id).filter(other_width)
        )
    ).one()
    if malformed is not None:
        length = session.scalar(
            select(func.octet_length(BankEntryEmbedding.vector)).where(
                BankEntryEmbedding.bank_entry_id == malformed,
                BankEntryEmbedding.model_id == reading.model_id,
            )
        )
        raise ValueError(
            f"bank entry {malformed} has a {(length or 0) // 4}-d embedding for model "
            f"{reading.model_id}, which is {reading.dim}-d"
        )
    into.reserve(count or 0)
    pg_copy.copy_out(
        session,
        of_entries.add_columns(BankEntry.bank_id, BankEntryEmbedding.vector),
        [("entry_id", ">i8"), ("bank_id", ">i8"), ("vector", ("<f4", reading.dim))],
        lambda rows: into.append(rows["entry_id"], rows["bank_id"], rows["vector"]),
    )
