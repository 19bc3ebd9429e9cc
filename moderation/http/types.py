"""Parameter types shared by the routes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime


def _in_utc(value: datetime) -> datetime:
    # PostgreSQL refuses offsets beyond ±15:59 that ISO 8601 allows (and Python parses), so
    # every time is converted to UTC before a query sees it.
    return value.astimezone(UTC)


# A point in time from a request, with its zone (a time without one is ambiguous: 422).
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]
