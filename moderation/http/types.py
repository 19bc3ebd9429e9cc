"""Parameter types shared by the routes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime

from moderation.errors import Invalid


def _in_utc(value: datetime) -> datetime:
    # PostgreSQL refuses offsets beyond ±15:59 that ISO 8601 allows (and Python parses), so
    # every time is converted to UTC before a query sees it.
    return value.astimezone(UTC)


# A point in time from a request, with its zone (a time without one is ambiguous: 422).
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]


class InvalidFormValue(Invalid):
    code = "invalid_form_value"


def form_datetime(value: str, name: str) -> datetime | None:
    """A form's `datetime-local` field (no zone: read as UTC); None when left empty."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidFormValue(f"{name}: {value!r} is not a date and time") from None
    return _in_utc(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))
