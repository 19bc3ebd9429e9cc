"""Parameter types shared by the routes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator


def _in_utc(value: datetime) -> datetime:
    # PostgreSQL refuses offsets beyond ±15:59 that ISO 8601 allows (and Python parses), so
    # every time is converted to UTC before a query sees it. A time without a zone is UTC.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# A point in time from a request: any ISO 8601 offset, or none for UTC; always UTC after.
UtcDatetime = Annotated[datetime, AfterValidator(_in_utc)]
