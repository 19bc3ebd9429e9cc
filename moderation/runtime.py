"""What a process runs on: its settings, its database and its broker.

Each entry point builds one `Runtime` and passes it down: the API application keeps it in
its state (`moderation.main.app.create_app`), the `moderation` command in click's context
object (`pass_runtime`), the worker on its Celery application. Nothing reads the
environment or holds a connection pool at import, so a test builds a runtime of its own
from settings it writes out, and two runtimes can live in one process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from moderation.config import Settings
from moderation.db import create_database_engine, transaction
from moderation.messages import Producer

F = TypeVar("F", bound=Callable[..., Any])


class Runtime:
    """Settings, and what the process builds from them once and shares between threads:
    the database engine and the broker's producer, each made on first use (a command that
    touches neither never connects)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._producer: Producer | None = None

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = create_database_engine(self.settings)
            return self._engine

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Sessions on the engine; objects stay readable after their commit."""
        engine = self.engine
        with self._lock:
            if self._sessions is None:
                self._sessions = sessionmaker(engine, expire_on_commit=False)
            return self._sessions

    def session(self) -> AbstractContextManager[Session]:
        """A session whose transaction commits on success and rolls back on any error."""
        return transaction(self.sessions)

    @property
    def producer(self) -> Producer:
        """What the process sends messages with (`moderation.messages`)."""
        with self._lock:
            if self._producer is None:
                self._producer = Producer(self.settings)
            return self._producer

    def close(self) -> None:
        """Closes the broker's connections and the database's pool; a later use opens
        them again."""
        with self._lock:
            engine, producer = self._engine, self._producer
            self._engine = self._sessions = self._producer = None
        if producer is not None:
            producer.close()
        if engine is not None:
            engine.dispose()


def pass_runtime(command: F) -> F:
    """Gives a `moderation` subcommand the runtime its root group built (or a test passed
    as `obj`), as its first argument."""
    return click.make_pass_decorator(Runtime)(command)  # type: ignore[return-value]
