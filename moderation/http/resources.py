"""Objects an API process makes on its first request that needs them and closes when it
shuts down: the search index, the announcer of screening messages, the key cache.

Made on first use, not at start-up, so a process that serves no such request never pays
for one; closed in the lifespan of the router that uses it (or of the application), after
uvicorn has finished the requests in flight. Each lives in the application's state, one
per process.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Generic, Protocol, TypeVar

from fastapi import FastAPI, Request


class Closable(Protocol):
    def close(self) -> None: ...


T = TypeVar("T", bound=Closable)


class ProcessResource(Generic[T]):
    def __init__(self, name: str, make: Callable[[Request], T]) -> None:
        """`name`: its attribute in the application's state; `make`: builds it for the
        application serving the request (its runtime: `access.app_runtime(request)`)."""
        self._name = name
        self._make = make
        self._lock = threading.Lock()

    def get(self, request: Request) -> T:
        state = request.app.state
        with self._lock:
            resource: T | None = getattr(state, self._name, None)
            if resource is None:
                resource = self._make(request)
                setattr(state, self._name, resource)
        return resource

    def lifespan(self) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
        """For the router whose routes use it: closes it when the application stops."""

        @asynccontextmanager
        async def closing(app: FastAPI) -> AsyncIterator[None]:
            yield
            resource: T | None = getattr(app.state, self._name, None)
            if resource is not None:
                resource.close()
                setattr(app.state, self._name, None)

        return closing
