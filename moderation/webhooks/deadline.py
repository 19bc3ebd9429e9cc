"""A wall-clock deadline over every network operation of one webhook attempt.

HTTP clients time each operation (connect, one write, one read), not the whole exchange:
a receiver that sends a byte every 5 s never trips a 10 s read timeout, and held one
attempt for 195 s, past its lease, so another sender posted the event meanwhile. This
network backend for httpcore gives each read and write only what is left of the attempt's
deadline (`within`), whichever connection of the pool carries it (`DeadlineStream`); past
the deadline the operation raises the timeout it would have raised on its own.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpcore
from httpcore._backends.sync import SyncBackend

from moderation.deadline_stream import DeadlineStream

# When the attempt running in this thread must be over (time.monotonic()); None: no limit.
_DEADLINE: ContextVar[float | None] = ContextVar("webhook_attempt_deadline", default=None)


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Network operations in the block, in this thread, end `seconds` from now at the latest."""
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _left(timeout: float | None, expired: type[Exception]) -> float | None:
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the attempt's deadline (MODERATION_WEBHOOK_TIMEOUT_S) has passed")
    return left if timeout is None else min(timeout, left)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's own blocking backend, each stream bounded by the attempt's deadline."""

    def __init__(self) -> None:
        self._backend = SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(
            host, port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options
        )
        return DeadlineStream(stream, _left)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
