"""Parameter types shared by the routes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime

from moderation.errors import Invalid


def _in_utc(value: datetime) -> datetime:
    # PostgreSQL refuses offsets beyond ±15:59 that ISO 8601 allows (and Python parses), so
    # every time is converted to UTC before a query sees it.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00+01:00 is in year 0 in UTC: outside what Python (and we) count.
        raise ValueError("is outside the years 1 to 9999 once converted to UTC") from None


def _in_utc_form(value: datetime, name: str) -> datetime:
    try:
        return _in_utc(value)
    except ValueError as error:
        raise InvalidFormValue(f"{name}: {value.isoformat()} {error}") from None


# A point in time from a request, with its zone (a time without one is ambiguous: 422).
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]


def plain_text(value: str) -> str:
    """Text PostgreSQL can hold: no NUL, and no lone surrogate (JSON's "\\ud800", which
    parses into a Python string but has no UTF-8 form)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"must be valid Unicode: a lone surrogate at character {error.start}"
        ) from None
    return value


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
    return _in_utc_form(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC), name)
