"""The API's one handler for the service's errors (`moderation.errors`): the status the
error names, and `{"detail": message, "code": code}` with its details beside them."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from moderation.errors import ModerationError


def error_answer(error: ModerationError) -> JSONResponse:
    return JSONResponse(
        {"detail": error.message, "code": error.code, **error.details}, status_code=error.status
    )


async def _answer(request: Request, error: Exception) -> Response:
    assert isinstance(error, ModerationError)
    return error_answer(error)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ModerationError, _answer)
