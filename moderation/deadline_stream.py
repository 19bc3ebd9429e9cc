"""An httpcore network stream whose every operation ends by a deadline.

HTTP clients time each operation (connect, one write, one read), not the whole exchange:
a peer that sends a byte just inside a per-read timeout is never cut off. Wrapped in this
stream, each operation gets only what is left of a deadline of the caller's: the fetch of
an upload (`images.fetch`) or one webhook attempt (`webhooks.deadline`).
"""

from __future__ import annotations

import ssl
import typing
from collections.abc import Callable

import httpcore

# Seconds an operation may take, given its own timeout and the httpcore timeout error it
# would raise itself (raised, or another error, once the deadline has passed).
TimeLeft = Callable[[float | None, type[Exception]], float | None]


class DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, time_left: TimeLeft) -> None:
        self._inner = inner
        self._time_left = time_left

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._time_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._time_left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = self._time_left(timeout, httpcore.ConnectTimeout)
        tls = self._inner.start_tls(ssl_context, server_hostname, left)
        return DeadlineStream(tls, self._time_left)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)
