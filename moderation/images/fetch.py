"""Fetch the bytes of an upload by path, `file://` or `http(s)://` URI, within a size cap.

URIs come from uploaders, so each is checked by a `UriPolicy` before anything is opened
or connected to, and `timeout_s` is a deadline for the whole fetch (resolving, connecting,
every redirect, the body or a local read), not for each operation: a server that drips a
byte just inside a per-read timeout is cut off at the deadline all the same.

Error messages name the kind of failure and never carry what the target sent or holds:
a service that is not HTTP must not have its greeting echoed back to the uploader.
"""

from __future__ import annotations

import errno
import math
import os
import ssl
import stat
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import certifi
import httpcore
import httpx

from moderation.deadline_stream import DeadlineStream
from moderation.images.errors import (
    FetchRefused,
    FetchTimeout,
    FetchUnavailable,
    FileTooLarge,
    IntakeError,
    NotFound,
    UriRefused,
)
from moderation.images.uri_policy import FILE_REFUSED, UriPolicy, is_under

# Answers that may change if asked again later.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# Never blocks (a FIFO opens at once), never follows a symlink in the last component, and
# never leaks the descriptor into a child process.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
NOT_REGULAR = "only regular files are read, not directories, pipes, devices or sockets"


def to_uri(path_or_uri: str) -> str:
    """A URI as given, or a local path made absolute as a file:// URI (workers run elsewhere)."""
    scheme = urlsplit(path_or_uri).scheme
    if len(scheme) > 1:
        return path_or_uri
    return Path(path_or_uri).resolve().as_uri()


# Called with the bytes a body needs in all, and the seconds left to wait for them, before
# they are read (`images.body_budget`); raises to give up the fetch.
Reserve = Callable[[int, float], None]


def fetch(
    uri: str,
    *,
    policy: UriPolicy,
    max_bytes: int,
    timeout_s: float,
    reserve: Reserve | None = None,
) -> bytes:
    """The bytes at `uri`, if `policy` allows it, at most `max_bytes`, within `timeout_s`.
    `reserve`: told how many bytes an http(s) body needs before they are read (all of a
    declared length at once, then as it streams), within the deadline."""
    deadline = Deadline(timeout_s)
    canonical = policy.check_location(uri)
    if canonical.startswith("file:"):
        path, directory = policy.allowed_file(canonical)
        return _read_file(path, directory, max_bytes=max_bytes, deadline=deadline)
    return _fetch_http(
        canonical, policy=policy, max_bytes=max_bytes, deadline=deadline, reserve=reserve
    )


class Deadline:
    """One wall-clock limit shared by every step of a fetch."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._end = time.monotonic() + timeout_s

    def remaining(self) -> float:
        """Seconds left; `FetchTimeout` once there are none."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left

    def bound(self, timeout: float | None) -> float:
        return min(math.inf if timeout is None else timeout, self.remaining())

    def expired(self) -> FetchTimeout:
        return FetchTimeout(
            f"the fetch took longer than {self.timeout_s:g} s (MODERATION_FETCH_TIMEOUT_S)"
        )


def _too_large(size: int, max_bytes: int) -> FileTooLarge:
    return FileTooLarge(
        f"the file is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.1f} MiB "
        "(MODERATION_MAX_BYTES)"
    )


# Local files.


def _read_file(path: str, directory: str, *, max_bytes: int, deadline: Deadline) -> bytes:
    """Read a regular file the policy allowed, checking the opened file itself: the path
    may have been swapped for a symlink, a FIFO or a device since it was checked."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _open_failed(exc, path, directory) from None
    try:
        if not is_under(_opened_path(fd), directory):
            raise UriRefused(FILE_REFUSED)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UriRefused(NOT_REGULAR)
        if info.st_size > max_bytes:
            raise _too_large(info.st_size, max_bytes)
        data = bytearray()
        # One byte past the cap, so a file that grew since fstat is still refused.
        while len(data) <= max_bytes:
            deadline.remaining()
            chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - len(data)))
            if not chunk:
                return bytes(data)
            data += chunk
        raise _too_large(len(data), max_bytes)
    finally:
        os.close(fd)


def _open_failed(exc: OSError, path: str, directory: str) -> IntakeError:
    # A path swapped since the check may lead outside: then the error must not tell
    # whether the file there exists, any more than the check did.
    if not is_under(os.path.realpath(path), directory):
        return UriRefused(FILE_REFUSED)
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return NotFound(f"no file at {path}")
    if isinstance(exc, PermissionError):
        return FetchRefused(f"permission denied reading {path}")
    if exc.errno in (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
        return UriRefused(NOT_REGULAR)  # a socket, a device without a driver
    # ELOOP: the last component has become a symlink since the check.
    return UriRefused(FILE_REFUSED)


def _opened_path(fd: int) -> str:
    """Where the descriptor really points, whatever the path said (Linux's /proc)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        raise UriRefused(FILE_REFUSED) from None


# HTTP.


def _fetch_http(
    uri: str, *, policy: UriPolicy, max_bytes: int, deadline: Deadline, reserve: Reserve | None
) -> bytes:
    """GET `uri` with httpcore directly: no proxies or other settings from the environment,
    connections only through `PinnedBackend`, and redirects followed here, each checked."""
    url, location = httpx.URL(uri), None
    limit = deadline.timeout_s
    timeouts = {"connect": limit, "read": limit, "write": limit, "pool": limit}
    try:
        with httpcore.ConnectionPool(
            ssl_context=_ssl_context(),
            network_backend=PinnedBackend(policy, deadline),
            retries=0,
        ) as pool:
            for redirects in range(policy.max_redirects + 1):
                with _naming_the_redirect(redirects):
                    if location is not None:
                        url = _redirect_target(url, location, policy)
                    with pool.stream(
                        "GET",
                        _request_url(url),
                        headers=_headers(url),
                        extensions={"timeout": timeouts},
                    ) as response:
                        location = _location(response)
                        if location is None:
                            return _body(response, uri, redirects, max_bytes, deadline, reserve)
    except httpcore.TimeoutException:
        raise deadline.expired() from None
    except httpcore.ConnectError:
        raise FetchUnavailable(f"GET {uri}: could not connect (TCP or TLS)") from None
    except httpcore.ProtocolError:
        raise FetchUnavailable(f"GET {uri}: the server's answer is not valid HTTP") from None
    except httpcore.NetworkError:
        raise FetchUnavailable(f"GET {uri}: the connection failed") from None
    raise UriRefused(f"more than {policy.max_redirects} redirects (MODERATION_MAX_REDIRECTS)")


def _request_url(url: httpx.URL) -> httpcore.URL:
    return httpcore.URL(
        scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
    )


def _headers(url: httpx.URL) -> list[tuple[bytes, bytes]]:
    return [
        # httpcore would write an IPv6 host without its brackets.
        (b"Host", url.netloc),
        (b"User-Agent", b"moderation-fetch"),
        (b"Accept", b"*/*"),
        # Bytes as stored: a compressed transfer would be decompressed past the size cap.
        (b"Accept-Encoding", b"identity"),
    ]


def _location(response: httpcore.Response) -> bytes | None:
    if response.status not in REDIRECT_STATUS:
        return None
    for name, value in response.headers:
        if name.lower() == b"location":
            return value
    return None


@contextmanager
def _naming_the_redirect(redirects: int) -> Iterator[None]:
    """A refusal after a redirect says so: the uploader's URI itself was allowed."""
    try:
        yield
    except UriRefused as refused:
        if not redirects:
            raise
        raise UriRefused(f"a redirect was refused: {refused.message}") from None


def _redirect_target(url: httpx.URL, location: bytes, policy: UriPolicy) -> httpx.URL:
    """The next hop, checked like the first (its addresses when connecting): an allowed
    server may redirect anywhere."""
    try:
        target = url.join(location.decode("latin-1"))
    except httpx.InvalidURL:
        raise UriRefused("its Location is not a valid URL") from None
    if target.scheme not in ("http", "https"):
        raise UriRefused("redirects are followed only to http(s)://")
    return httpx.URL(policy.check_location(str(target)))


def _body(
    response: httpcore.Response,
    uri: str,
    redirects: int,
    max_bytes: int,
    deadline: Deadline,
    reserve: Reserve | None,
) -> bytes:
    status = response.status
    answered = f"GET {uri} answered {status}"
    if redirects:
        answered += f" (after {redirects} redirect{'s' if redirects > 1 else ''})"
    if status in RETRYABLE_STATUS:
        raise FetchUnavailable(answered)
    if status >= 300:
        raise FetchRefused(answered)
    declared = _content_length(response)
    if declared is not None and declared > max_bytes:
        raise _too_large(declared, max_bytes)
    if reserve is not None and declared:
        reserve(declared, deadline.remaining())
    body = bytearray()
    for chunk in response.iter_stream():
        if len(body) + len(chunk) > max_bytes:
            raise _too_large(len(body) + len(chunk), max_bytes)
        if reserve is not None:
            reserve(len(body) + len(chunk), deadline.remaining())
        body += chunk
        deadline.remaining()
    return bytes(body)


def _content_length(response: httpcore.Response) -> int | None:
    for name, value in response.headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


@cache
def _ssl_context() -> ssl.SSLContext:
    # Built once: loading the CA bundle takes milliseconds. Verification is on the host
    # name, since httpcore passes it, not the pinned address, as the TLS server name.
    return ssl.create_default_context(cafile=certifi.where())


class PinnedBackend(httpcore.NetworkBackend):
    """Resolves the host, checks every address with the policy, and connects to a checked
    address: no second DNS lookup happens between the check and the connection."""

    def __init__(self, policy: UriPolicy, deadline: Deadline) -> None:
        self._policy = policy
        self._deadline = deadline
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = self._policy.resolve(host, timeout_s=self._deadline.bound(timeout))
        except FetchTimeout:
            raise httpcore.ConnectTimeout("resolving timed out") from None
        for address in addresses:
            try:
                stream = self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=self._deadline.bound(timeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError:
                continue
            return DeadlineStream(stream, self._time_left)
        raise httpcore.ConnectError("no address accepted the connection")

    def _time_left(self, timeout: float | None, _: type[Exception]) -> float:
        # Past the deadline, the fetch's own `FetchTimeout`, whatever the operation.
        return self._deadline.bound(timeout)
