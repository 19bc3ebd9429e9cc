"""The API's one handler for the service's errors (`moderation.errors`): the status the
error names, and `{"detail": message, "code": code}` with its details beside them.

And its answer to a request that fails validation: FastAPI's own echoes every input it
refused, whole (a 5 MB invalid batch was answered with a 14 MB 422), and fails outright
on inputs JSON cannot carry back (a float that overflowed to infinity, a lone surrogate):
a 500 for bad input. This one names at most `MAX_ERRORS_SHOWN` errors, each with a short
excerpt of what was sent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from moderation.errors import ModerationError

MAX_ERRORS_SHOWN = 20
EXCERPT_CHARS = 120


def error_answer(error: ModerationError) -> JSONResponse:
    return JSONResponse(
        {"detail": error.message, "code": error.code, **error.details}, status_code=error.status
    )


async def _answer(request: Request, error: Exception) -> Response:
    assert isinstance(error, ModerationError)
    return error_answer(error)


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """At most `limit` characters standing for `value`, always encodable as UTF-8."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=repr)
        except (ValueError, TypeError, RecursionError):
            text = repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text)} characters)"
    # A lone surrogate (JSON's "\ud800") cannot be written as UTF-8: shown escaped.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bounded_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Validation errors as a client needs them (where, what, a piece of the input),
    the first `MAX_ERRORS_SHOWN` only."""
    shown = []
    for error in list(errors)[:MAX_ERRORS_SHOWN]:
        item: dict[str, Any] = {
            "type": excerpt(error.get("type", "invalid")),
            "loc": [part if isinstance(part, int) else excerpt(part) for part in error["loc"]],
            "msg": excerpt(error.get("msg", ""), 2 * EXCERPT_CHARS),
        }
        if "input" in error:
            item["input"] = excerpt(error["input"])
        shown.append(item)
    return shown


def validation_answer(error: RequestValidationError) -> JSONResponse:
    errors = error.errors()
    body: dict[str, Any] = {"detail": bounded_errors(errors)}
    if len(errors) > MAX_ERRORS_SHOWN:
        body["errors_not_shown"] = len(errors) - MAX_ERRORS_SHOWN
    return JSONResponse(body, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _invalid(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    return validation_answer(error)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ModerationError, _answer)
    app.add_exception_handler(RequestValidationError, _invalid)
