"""The application under a real uvicorn server, in this process, on a free port.

In this process so that a test can watch what the server does with SQLAlchemy's events
(when each transaction commits, against when the response went out) and break it (end a
session's PostgreSQL backend just before it commits). The requests go over real sockets:
`TestClient` waits for the whole application call, dependencies' exit code included,
before it hands back a response, so it cannot tell "answered, then committed" from
"committed, then answered"; a client on a socket can.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import uvicorn
from sqlalchemy import event
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moderation.main.app import create_app
from moderation.runtime import Runtime
from tests.conftest import TEST_RUNTIME


@dataclass
class Timeline:
    """What happened, in order, while the server answered: "commit <METHOD> <path>" for
    every transaction a request committed (in the server's threads: the request's context
    goes with its work), "response <METHOD> <path>" when its response's head went out,
    "done ..." when the application returned from it."""

    events: list[str] = field(default_factory=list)
    finished: queue.Queue[str] = field(default_factory=queue.Queue)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str) -> None:
        with self.lock:
            self.events.append(what)

    def request_done(self, name: str, timeout_s: float = 10.0) -> list[str]:
        """Wait until the application has finished the request `name` ("POST /v1/banks"),
        dependencies' exit code included; that request's events."""
        while self.finished.get(timeout=timeout_s) != name:
            pass
        with self.lock:
            return [e for e in self.events if e.endswith(f" {name}")]


# The request a server thread is working for, for the commit listener.
_REQUEST: ContextVar[str] = ContextVar("request", default="(none)")


def _recording(app: ASGIApp, timeline: Timeline) -> ASGIApp:
    async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        name = f"{scope['method']} {scope['path']}"
        _REQUEST.set(name)

        async def send_noted(message: Message) -> None:
            if message["type"] == "http.response.start":
                timeline.add(f"response {name}")
            await send(message)

        try:
            await app(scope, receive, send_noted)
        finally:
            timeline.add(f"done {name}")
            timeline.finished.put(name)

    return recorded


@dataclass
class LiveApi:
    url: str
    timeline: Timeline


@contextmanager
def live_api(runtime: Runtime = TEST_RUNTIME) -> Iterator[LiveApi]:
    """Serve `create_app(runtime)` on 127.0.0.1 until the block ends."""
    timeline = Timeline()

    def committed(_: Session) -> None:
        timeline.add(f"commit {_REQUEST.get()}")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        _recording(create_app(runtime), timeline),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-api", daemon=True)
    event.listen(Session, "after_commit", committed)
    thread.start()
    try:
        started = threading.Event()

        def wait_started() -> None:
            while thread.is_alive() and not server.started:
                started.wait(0.02)

        wait_started()
        assert server.started, "the API server did not start"
        yield LiveApi(f"http://127.0.0.1:{port}", timeline)
    finally:
        server.should_exit = True
        thread.join(10)
        event.remove(Session, "after_commit", committed)
