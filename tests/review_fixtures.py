"""Banks, uploads and hits written straight to the database, for review and webhook tests."""

from __future__ import annotations

import os
from datetime import datetime

from sqlalchemy.orm import Session

from moderation.banks import service as banks
from moderation.banks.models import Bank, BankEntry
from moderation.images.signals import SignalType
from moderation.review.models import Hit
from moderation.screening import service as screening
from moderation.screening.models import Upload


def make_bank(session: Session, name: str, radius: float | None = None) -> Bank:
    return banks.create_bank(session, name, radius)


def make_entry(session: Session, bank: Bank) -> BankEntry:
    entry = BankEntry(bank_id=bank.id, sha256=os.urandom(32), added_by="test")
    session.add(entry)
    session.flush()
    return entry


def make_upload(session: Session, external_id: str | None = None) -> Upload:
    upload, _ = screening.submit(
        session, f"https://img.example/{os.urandom(4).hex()}.jpg", external_id
    )
    return upload


def make_hit(
    session: Session,
    upload: Upload,
    entry: BankEntry,
    *,
    signal: SignalType = SignalType.SHA256,
    distance: float = 0.0,
    created_at: datetime | None = None,
    retroactive: bool = False,
    threshold: float | None = None,
) -> Hit:
    hit = Hit(
        upload_id=upload.id,
        bank_entry_id=entry.id,
        signal=signal,
        distance=distance,
        frame_index=0,
        retroactive=retroactive,
        threshold=threshold,
    )
    if created_at is not None:
        hit.created_at = created_at
    session.add(hit)
    session.flush()
    session.refresh(hit)
    return hit
