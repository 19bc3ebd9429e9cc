"""Admission: who is calling, and how much they may send, decided before the body is read.

FastAPI reads and parses a request's body before it runs any dependency, the access check
(`moderation.http.access.authorize`) included: a 30 MB JSON array sent without a key cost
~580 MiB before its 401, and a 300 MiB multipart body was spooled to disk first. This ASGI
middleware finds the route a request is for, runs the same check (`access.admit`) on its
headers, and refuses the request, unread, when the check fails or the declared length is
over the route's limit; a body that turns out longer than it declared (chunked, or lying)
is cut off at the limit with a 413 as it streams.

Each route's limit: `MODERATION_MAX_BODY_BYTES` by default; a route that takes an image
declares `image_body()` (the image limit, `MODERATION_MAX_BYTES`, plus a form's framing);
others may declare a byte count (`body_up_to`). Both appear in the OpenAPI operation.
Refusals are answered through the application's own exception handlers, so the web pages'
answer (the login redirect, an error page) is what it always was.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.routing import APIRoute
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moderation.config import Settings
from moderation.http.access import DatabaseUnavailable, admit, route_roles
from moderation.http.routes import app_routes
from moderation.runtime import Runtime

BODY_KEY = "x-max-body-bytes"
# A route whose form a refused login must not lose (a reviewer's decision and note, kept by
# the pages for after the next login): its body, small and capped, is read even when the
# access check refuses the request, by the refusal's handler.
KEEPS_REFUSED_FORM = "x-keeps-refused-form"
IMAGE = "image"
# A multipart form's boundaries, part headers and small fields around the image.
FORM_FRAMING_BYTES = 64 * 1024


def image_body() -> dict[str, Any]:
    """`openapi_extra` for a route whose body is a form carrying one image."""
    return {BODY_KEY: IMAGE}


def body_up_to(limit: int) -> dict[str, Any]:
    """`openapi_extra` for a route that accepts bodies up to `limit` bytes."""
    return {BODY_KEY: limit}


def form_kept_when_refused(limit: int) -> dict[str, Any]:
    """`openapi_extra` for a form route whose fields (at most `limit` bytes) are kept when
    its sender's login has lapsed (see `KEEPS_REFUSED_FORM`)."""
    return {BODY_KEY: limit, KEEPS_REFUSED_FORM: True}


def body_limit(route: APIRoute, settings: Settings) -> int:
    declared = (route.openapi_extra or {}).get(BODY_KEY)
    if declared == IMAGE:
        return settings.max_bytes + FORM_FRAMING_BYTES
    if isinstance(declared, int):
        return declared
    return settings.max_body_bytes


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"the request body is over this route's limit of {limit} bytes "
        "(MODERATION_MAX_BODY_BYTES; for images, MODERATION_MAX_BYTES): send less per request",
    )


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _refuse_nul(scope: Scope) -> None:
    """PostgreSQL text cannot hold NUL, and no name, id or filter here has one: refused in
    the address, for every route, rather than failing a query."""
    if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "the address must not contain NUL characters (%00)",
        )


def _capped(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def receive_capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                # Raised inside the application while it reads: its handlers answer 413.
                raise _too_large(limit)
        return message

    return receive_capped


class Admission:
    """The middleware: `app.add_middleware(Admission, application=app)`."""

    def __init__(self, app: ASGIApp, application: FastAPI) -> None:
        self.app = app
        self.application = application
        self._table: list[tuple[re.Pattern[str], APIRoute]] | None = None

    def _route(self, scope: Scope) -> APIRoute | None:
        """The API route that will answer the request (the first whose path and method
        match, as the router picks), or None: a 404, a 405 or a mounted app."""
        if self._table is None:  # built on first use: routers are included after start-up
            self._table = [
                (compile_path(path)[0], route) for path, route in app_routes(self.application)
            ]
        path, method = scope["path"], scope["method"]
        for pattern, route in self._table:
            if method in (route.methods or ()) and pattern.match(path):
                return route
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        runtime: Runtime = self.application.state.runtime
        limit = body_limit(route, runtime.settings)
        try:
            if route_roles(route) is not None:
                # A database read: off the event loop, as the handlers' own.
                await run_in_threadpool(admit, Request(scope), route)
            _refuse_nul(scope)
            declared = _declared_length(scope)
            if declared is not None and declared > limit:
                raise _too_large(limit)
        except StarletteHTTPException as refusal:
            declared = _declared_length(scope)
            keeps_form = (
                refusal.status_code == status.HTTP_401_UNAUTHORIZED
                and bool((route.openapi_extra or {}).get(KEEPS_REFUSED_FORM))
                and (declared is None or declared <= limit)
            )
            body = _capped(receive, limit) if keeps_form else None
            await self._refuse(scope, route, refusal, send, body)
            return
        except OperationalError:
            # The key could not be looked up (the database restarting, a pooled connection
            # it dropped): the same 503 a handler's session answers, not a 500.
            unavailable = DatabaseUnavailable(
                "the database did not answer the key check; nothing was done: retry"
            )
            await self._refuse(scope, route, unavailable, send)
            return
        await self.app(scope, _capped(receive, limit), send)

    async def _refuse(
        self,
        scope: Scope,
        route: APIRoute,
        refusal: Exception,
        send: Send,
        body: Receive | None = None,
    ) -> None:
        """Answer as the application's handler for the refusal would (the pages redirect a
        missing login to the login form), without reading the body unless `body` is given
        (a form kept when refused, read within its route's limit)."""
        request = (
            Request({**scope, "route": route}, body) if body else Request({**scope, "route": route})
        )
        handlers = self.application.exception_handlers
        handler: Callable[[Request, Any], Any] = next(
            (handlers[kind] for kind in type(refusal).__mro__ if kind in handlers),
            http_exception_handler,
        )
        answer = handler(request, refusal)
        response = await answer if inspect.isawaitable(answer) else answer

        async def nothing_read() -> Message:
            return {"type": "http.disconnect"}

        await response({**scope, "route": route}, body or nothing_read, send)
