"""What the upload and bank pages show, read in one place (the hits' evidence is the review
queue's own). Banks are shown by their signals only: nothing here reads a bank entry's
`source_ref`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
from moderation.config import Settings
from moderation.embedding.models import EmbeddingModel
from moderation.review import service as review
from moderation.review.models import Hit, ReviewStatus
from moderation.review.service import HitEvidence
from moderation.screening import service as screening
from moderation.screening.models import Signal, Upload

# Newest entries listed on a bank's page; the page says how many there are in all.
RECENT_ENTRIES = 50


@dataclass(frozen=True)
class UploadPage:
    upload: Upload
    signals: list[Signal]
    hits: list[HitEvidence]


def upload_page(session: Session, settings: Settings, upload_id: int) -> UploadPage | None:
    upload = session.get(Upload, upload_id)
    if upload is None:
        return None
    signals = screening.upload_signals(session, upload_id)
    return UploadPage(upload, signals, review.upload_hits(session, settings, upload_id))


@dataclass(frozen=True)
class EntryRow:
    id: int
    sha256: bytes | None
    pdq: bytes | None
    pdq_quality: int | None
    models: list[str]
    added_by: str
    created_at: datetime


@dataclass(frozen=True)
class BankPage:
    bank: Bank
    # The radius CLIP matches use: the bank's own, else the global one.
    effective_radius: float
    entries: int
    with_sha256: int
    with_pdq: int
    # Entries with an embedding, by model name.
    by_model: dict[str, int]
    hits_pending: int
    recent: list[EntryRow]


def bank_page(session: Session, bank_id: int, settings: Settings) -> BankPage | None:
    bank = session.get(Bank, bank_id)
    if bank is None:
        return None
    entries, with_sha256, with_pdq = session.execute(
        select(func.count(), func.count(BankEntry.sha256), func.count(BankEntry.pdq)).where(
            BankEntry.bank_id == bank_id
        )
    ).one()
    by_model: dict[str, int] = {
        name: count
        for name, count in session.execute(
            select(EmbeddingModel.name, func.count())
            .join(BankEntryEmbedding, BankEntryEmbedding.model_id == EmbeddingModel.id)
            .join(BankEntry, BankEntry.id == BankEntryEmbedding.bank_entry_id)
            .where(BankEntry.bank_id == bank_id)
            .group_by(EmbeddingModel.name)
            .order_by(EmbeddingModel.name)
        )
    }
    hits_pending = session.scalar(
        select(func.count())
        .select_from(Hit)
        .join(BankEntry, BankEntry.id == Hit.bank_entry_id)
        .where(BankEntry.bank_id == bank_id, Hit.review_status == ReviewStatus.PENDING)
    )
    recent_rows = session.execute(
        select(
            BankEntry.id,
            BankEntry.sha256,
            BankEntry.pdq,
            BankEntry.pdq_quality,
            BankEntry.added_by,
            BankEntry.created_at,
        )
        .where(BankEntry.bank_id == bank_id)
        .order_by(BankEntry.id.desc())
        .limit(RECENT_ENTRIES)
    ).all()
    models: dict[int, list[str]] = {}
    for entry_id, name in session.execute(
        select(BankEntryEmbedding.bank_entry_id, EmbeddingModel.name)
        .join(EmbeddingModel, EmbeddingModel.id == BankEntryEmbedding.model_id)
        .where(BankEntryEmbedding.bank_entry_id.in_([row.id for row in recent_rows]))
        .order_by(EmbeddingModel.name)
    ):
        models.setdefault(entry_id, []).append(name)
    recent = [
        EntryRow(
            id=row.id,
            sha256=row.sha256,
            pdq=row.pdq,
            pdq_quality=row.pdq_quality,
            models=models.get(row.id, []),
            added_by=row.added_by,
            created_at=row.created_at,
        )
        for row in recent_rows
    ]
    return BankPage(
        bank=bank,
        effective_radius=bank.radius if bank.radius is not None else settings.match_radius,
        entries=entries,
        with_sha256=with_sha256,
        with_pdq=with_pdq,
        by_model=by_model,
        hits_pending=hits_pending or 0,
        recent=recent,
    )


@dataclass(frozen=True)
class BankRow:
    id: int
    name: str
    enabled: bool
    radius: float | None
    entries: int


def bank_list(session: Session) -> list[BankRow]:
    rows = session.execute(
        select(Bank.id, Bank.name, Bank.enabled, Bank.radius, func.count(BankEntry.id))
        .outerjoin(BankEntry, BankEntry.bank_id == Bank.id)
        .group_by(Bank.id)
        .order_by(Bank.name)
    )
    return [BankRow(*row) for row in rows]
