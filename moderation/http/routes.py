"""Walking an application's routes, whatever way FastAPI keeps the routers it includes."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import compile_path


def app_routes(app: FastAPI) -> Iterator[tuple[str, APIRoute]]:
    """Every API route of the application with its full path, in the order they match.

    FastAPI 0.165 keeps an included router as one `_IncludedRouter` entry of `app.routes`,
    so a plain walk of `app.routes` for `APIRoute`s finds none of them; its
    `effective_route_contexts` name each route with its prefixed path. Older versions copy
    the routes into `app.routes` themselves; both are walked."""
    for route in app.routes:
        if isinstance(route, APIRoute):
            yield route.path, route
        for context in getattr(route, "effective_route_contexts", list)():
            if isinstance(context.original_route, APIRoute):
                yield context.path, context.original_route


def route_for(app: FastAPI, path: str, method: str = "GET") -> APIRoute | None:
    """The API route that would answer `method path`, or None."""
    for full_path, route in app_routes(app):
        pattern, _, _ = compile_path(full_path)
        if pattern.match(path) and method in (route.methods or ()):
            return route
    return None
