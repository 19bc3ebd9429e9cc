"""Banks of known-bad content. A bank holds signals of the content, never the content itself."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from moderation.db import Base, CreatedAtMixin, IdMixin, UpdatedAtMixin


class Bank(IdMixin, CreatedAtMixin, UpdatedAtMixin, Base):
    __tablename__ = "banks"

    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Cosine distance for CLIP matches against this bank; NULL means the global radius.
    radius: Mapped[float | None] = mapped_column(Float)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")

    entries: Mapped[list[BankEntry]] = relationship(back_populates="bank")


class BankEntry(IdMixin, CreatedAtMixin, UpdatedAtMixin, Base):
    """One known-bad item: any of its SHA-256, PDQ hash and per-model embeddings."""

    __tablename__ = "bank_entries"
    __table_args__ = (
        # Matching reads these as fixed-width rows; a malformed hash must not get in at all.
        CheckConstraint("octet_length(sha256) = 32", name="sha256_length"),
        CheckConstraint("octet_length(pdq) = 32", name="pdq_length"),
        CheckConstraint("pdq_quality BETWEEN 0 AND 100", name="pdq_quality_range"),
    )

    bank_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("banks.id", ondelete="CASCADE"), index=True
    )
    sha256: Mapped[bytes | None] = mapped_column(LargeBinary(32), index=True)
    pdq: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    # NULL when the hash was imported from a list that did not say.
    pdq_quality: Mapped[int | None] = mapped_column(Integer)
    # Where the source lives in restricted storage, for re-embedding under a new model.
    source_ref: Mapped[str | None] = mapped_column(Text)
    added_by: Mapped[str] = mapped_column(String(200))

    bank: Mapped[Bank] = relationship(back_populates="entries")
    embeddings: Mapped[list[BankEntryEmbedding]] = relationship(
        back_populates="entry", cascade="all, delete-orphan"
    )


class BankEntryEmbedding(IdMixin, CreatedAtMixin, Base):
    __tablename__ = "bank_entry_embeddings"
    __table_args__ = (UniqueConstraint("bank_entry_id", "model_id"),)

    bank_entry_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("bank_entries.id", ondelete="CASCADE")
    )
    model_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("embedding_models.id"))
    vector: Mapped[bytes] = mapped_column(LargeBinary)

    entry: Mapped[BankEntry] = relationship(back_populates="embeddings")


class BankChange(IdMixin, CreatedAtMixin, Base):
    """Something matching must apply, written by triggers on the three tables above
    (migration 0009), so that no way of changing them (the API, the CLI, an import by
    COPY, a cascade, plain SQL) escapes the workers. A row names what to read again, not
    what happened: a worker reads the current state of what it names.

    - `bank_id`: the bank itself was created, deleted, enabled or disabled, or its radius
      changed (a deleted bank's entries are not listed one by one).
    - `bank_entry_id`: the entry was added, removed, or its hashes or bank changed, or one
      of its embeddings (of `model_id`, then) was added, replaced or removed.
    - neither: a table was truncated; everything must be read again.

    Workers follow it by id (see `moderation.banks.changes`). No foreign keys: a row
    outlives what it names. Rows older than a retention are pruned
    (`moderation.banks.pruning`), below a horizon recorded in `BankChangesHorizon`.
    """

    __tablename__ = "bank_changes"
    __table_args__ = (
        CheckConstraint("bank_id IS NULL OR bank_entry_id IS NULL", name="one_subject"),
    )

    bank_id: Mapped[int | None] = mapped_column(BigInteger)
    bank_entry_id: Mapped[int | None] = mapped_column(BigInteger)
    model_id: Mapped[int | None] = mapped_column(BigInteger)


class BankChangesHorizon(Base):
    """Where `bank_changes` was pruned: one row. Every log row with an id up to
    `pruned_through` may be gone, so a worker whose checkpoint is below it cannot tell
    what it missed and loads the banks whole (`moderation.banks.changes`). Raised in the
    transaction that deletes the rows, never lowered."""

    __tablename__ = "bank_changes_horizon"
    __table_args__ = (CheckConstraint("one_row", name="one_row"),)

    one_row: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default="true")
    pruned_through: Mapped[int] = mapped_column(BigInteger, server_default="0")
    pruned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BankChangeReader(Base):
    """A process that follows `bank_changes` durably, from a checkpoint kept here (the
    retro-hunt's starter): every log row up to `checkpoint` has been read and acted on.
    Pruning never deletes a row above the lowest checkpoint, so such a reader never
    misses a change, however long it stops for. (Workers' bank indexes follow the log in
    memory and load the banks whole when they fall behind: they are not readers.)"""

    __tablename__ = "bank_change_readers"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    checkpoint: Mapped[int] = mapped_column(BigInteger, server_default="0")
    read_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
