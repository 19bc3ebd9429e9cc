"""What a search may be restricted to: conditions on the upload a result comes from.

One set of conditions, two readings: SQL clauses over `uploads` and `hits` (the source of
truth, applied to every candidate whatever the index), and a Milvus boolean expression
over the scalar fields the sync keeps on every vector (`milvus_index.FIELDS`), so that a
Milvus search returns only passing rows rather than the nearest rows of any kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, exists

from moderation.banks.models import Bank, BankEntry
from moderation.review.models import Hit, ReviewStatus
from moderation.screening.models import Upload, UploadStatus


def epoch_us(moment: datetime) -> int:
    """A timestamp as Milvus stores it: whole microseconds since 1970 (UTC)."""
    return int(moment.timestamp() * 1_000_000)


# `finished_at` of an upload that never finished: below every real time, so that a time
# range excludes it as SQL's NULL comparison does.
NO_TIME = -(2**62)


@dataclass(frozen=True)
class Filters:
    """Conditions on the upload a result comes from; None means any."""

    screened_from: datetime | None = None
    screened_until: datetime | None = None
    status: UploadStatus | None = None
    has_hit: bool | None = None
    bank: str | None = None
    error_code: str | None = None
    # Uploads with at least one hit in this review status (pending, confirmed, ...).
    review_status: ReviewStatus | None = None

    @property
    def active(self) -> bool:
        return any(value is not None for value in vars(self).values())

    def clauses(self) -> list[ColumnElement[bool]]:
        clauses: list[ColumnElement[bool]] = []
        if self.screened_from is not None:
            clauses.append(Upload.finished_at >= self.screened_from)
        if self.screened_until is not None:
            clauses.append(Upload.finished_at < self.screened_until)
        if self.status is not None:
            clauses.append(Upload.status == self.status)
        if self.error_code is not None:
            clauses.append(Upload.error_code == self.error_code)
        if self.has_hit is not None:
            any_hit = exists().where(Hit.upload_id == Upload.id)
            clauses.append(any_hit if self.has_hit else ~any_hit)
        if self.bank is not None:
            clauses.append(
                exists()
                .where(Hit.upload_id == Upload.id)
                .where(BankEntry.id == Hit.bank_entry_id)
                .where(Bank.id == BankEntry.bank_id, Bank.name == self.bank)
            )
        if self.review_status is not None:
            clauses.append(
                exists().where(Hit.upload_id == Upload.id, Hit.review_status == self.review_status)
            )
        return clauses

    def milvus_expression(self) -> str:
        """The same conditions as a Milvus filter expression ("" for none). Strings are
        quoted as JSON strings, which Milvus' expression grammar reads the same way."""
        terms: list[str] = []
        if self.screened_from is not None:
            terms.append(f"finished_at >= {epoch_us(self.screened_from)}")
        if self.screened_until is not None:
            terms.append(f"finished_at < {epoch_us(self.screened_until)}")
            terms.append(f"finished_at > {NO_TIME}")
        if self.status is not None:
            terms.append(f"status == {json.dumps(self.status.value)}")
        if self.error_code is not None:
            terms.append(f"error_code == {json.dumps(self.error_code)}")
        if self.has_hit is not None:
            terms.append(f"has_hit == {str(self.has_hit).lower()}")
        if self.bank is not None:
            terms.append(f"array_contains(banks, {json.dumps(self.bank)})")
        if self.review_status is not None:
            terms.append(f"array_contains(review_statuses, {json.dumps(self.review_status.value)})")
        return " and ".join(terms)
