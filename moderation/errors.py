"""The service's own errors: one base, with a stable code a client can branch on, the HTTP
status it answers and a message a person can act on.

Each domain subclasses one of the kinds below (`BankNotFound(NotFound)`, `AlreadyDecided(
Conflict)`). Each surface has one handler for all of them, so no route or command maps
errors by hand: the API answers `{"detail": message, "code": code, ...}` with the status
(`moderation.http.errors`), the pages render an error page (`moderation.web.pages`), the
command line prints the message and exits 1, or 4 when a service is unavailable
(`moderation.main.cli_errors`). Built-in exceptions are left to mean bugs.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ModerationError(Exception):
    code: ClassVar[str] = "error"
    status: ClassVar[int] = 500

    def __init__(self, message: str, **details: Any) -> None:
        """`details`: fields a client needs beside the message (the refused items of a
        batch, the upload an id already names), answered with it."""
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(ModerationError):
    """What the request names does not exist."""

    code = "not_found"
    status = 404


class Conflict(ModerationError):
    """The request is well formed, but the state of what it names refuses it."""

    code = "conflict"
    status = 409


class Invalid(ModerationError):
    """The request itself is wrong: a value out of range, bytes that are no image."""

    code = "invalid"
    status = 422


class Unavailable(ModerationError):
    """Something the request needs is down or not configured; trying later may work."""

    code = "unavailable"
    status = 503
