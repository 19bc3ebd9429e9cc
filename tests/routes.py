"""Walking an application's routes."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.routing import APIRoute


def app_routes(app: FastAPI) -> Iterator[tuple[str, APIRoute]]:
    """Every API route of the application with its full path. FastAPI 0.165 keeps included
    routers as `_IncludedRouter`s in `app.routes`, so a plain walk of `app.routes` for
    `APIRoute`s finds none; their `effective_route_contexts` name each route."""
    for route in app.routes:
        if isinstance(route, APIRoute):
            yield route.path, route
        for context in getattr(route, "effective_route_contexts", list)():
            if isinstance(context.original_route, APIRoute):
                yield context.path, context.original_route
