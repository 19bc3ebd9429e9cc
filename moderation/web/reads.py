"""What the upload and bank pages show, read in one place. Banks are shown by their
signals only: nothing here reads a bank entry's `source_ref`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.banks.models import Bank, BankEntry, BankEntryEmbedding
from moderation.config import Settings
from moderation.embedding.models import EmbeddingModel
from moderation.images.signals import SignalType
from moderation.screening.models import Hit, ReviewStatus, Signal, Upload

# Newest entries listed on a bank's page; the page says how many there are in all.
RECENT_ENTRIES = 50


@dataclass(frozen=True)
class Evidence:
    """Why an upload matched: one hit, measured against the threshold it had to meet."""

    hit_id: int
    upload_id: int
    signal: str
    distance: float
    # The largest distance that matches: PDQ bits, CLIP cosine distance (the bank's radius
    # or the global one), 0 for SHA-256.
    threshold: float
    threshold_source: str
    bank_id: int
    bank: str
    bank_entry_id: int
    frame_index: int
    model: str | None
    retroactive: bool
    review_status: str
    reviewed_by: str | None
    reviewed_at: datetime | None
    review_note: str | None
    created_at: datetime


def threshold(
    signal: SignalType, bank_radius: float | None, settings: Settings
) -> tuple[float, str]:
    if signal is SignalType.PDQ:
        return float(settings.pdq_threshold), "pdq"
    if signal is SignalType.CLIP:
        if bank_radius is not None:
            return bank_radius, "bank"
        return settings.match_radius, "global"
    return 0.0, "exact"


def evidence_for(session: Session, upload_ids: list[int], settings: Settings) -> list[Evidence]:
    """Every hit of these uploads with its evidence, newest first."""
    rows = session.execute(
        select(Hit, Bank.id, Bank.name, Bank.radius, EmbeddingModel.name)
        .join(BankEntry, BankEntry.id == Hit.bank_entry_id)
        .join(Bank, Bank.id == BankEntry.bank_id)
        .outerjoin(EmbeddingModel, EmbeddingModel.id == Hit.model_id)
        .where(Hit.upload_id.in_(upload_ids))
        .order_by(Hit.created_at.desc(), Hit.id.desc())
    )
    return [
        Evidence(
            hit_id=hit.id,
            upload_id=hit.upload_id,
            signal=hit.signal.value,
            distance=hit.distance,
            threshold=threshold(hit.signal, radius, settings)[0],
            threshold_source=threshold(hit.signal, radius, settings)[1],
            bank_id=bank_id,
            bank=bank_name,
            bank_entry_id=hit.bank_entry_id,
            frame_index=hit.frame_index,
            model=model,
            retroactive=hit.retroactive,
            review_status=hit.review_status.value,
            reviewed_by=hit.reviewed_by,
            reviewed_at=hit.reviewed_at,
            review_note=hit.review_note,
            created_at=hit.created_at,
        )
        for hit, bank_id, bank_name, radius, model in rows
    ]


@dataclass(frozen=True)
class UploadPage:
    upload: Upload
    signals: list[Signal]
    hits: list[Evidence]


def upload_page(session: Session, upload_id: int, settings: Settings) -> UploadPage | None:
    upload = session.get(Upload, upload_id)
    if upload is None:
        return None
    signals = session.scalars(
        select(Signal)
        .where(Signal.upload_id == upload_id)
        .order_by(Signal.signal, Signal.frame_index)
    )
    return UploadPage(upload, list(signals), evidence_for(session, [upload_id], settings))


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
