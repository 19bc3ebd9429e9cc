"""Fetch the bytes of an upload by path, `file://` or `http(s)://` URI, within a size cap."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from moderation.images.errors import (
    FetchRefused,
    FetchTimeout,
    FetchUnavailable,
    FileTooLarge,
    NotFound,
    UnsupportedUri,
)

# Answers that may change if asked again later.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def to_uri(path_or_uri: str) -> str:
    """A URI as given, or a local path made absolute as a file:// URI (workers run elsewhere)."""
    scheme = urlsplit(path_or_uri).scheme
    if len(scheme) > 1:
        return path_or_uri
    return Path(path_or_uri).resolve().as_uri()


def fetch(uri: str, *, max_bytes: int, timeout_s: float) -> bytes:
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch_http(uri, max_bytes=max_bytes, timeout_s=timeout_s)
    if scheme == "file":
        return _read_file(Path(unquote(urlsplit(uri).path)), max_bytes=max_bytes)
    # A one-letter "scheme" is a Windows drive, not a URI.
    if not scheme or len(scheme) == 1:
        return _read_file(Path(uri), max_bytes=max_bytes)
    raise UnsupportedUri(
        f"URI scheme {scheme!r} is not supported; use a path, file:// or http(s)://"
    )


def _too_large(size: int, max_bytes: int) -> FileTooLarge:
    return FileTooLarge(
        f"the file is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.1f} MiB "
        "(MODERATION_MAX_BYTES)"
    )


def _read_file(path: Path, *, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as handle:
            # Read one byte past the cap so an oversized file is refused without reading it all.
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise NotFound(f"no file at {path}") from None
    except IsADirectoryError:
        raise NotFound(f"{path} is a directory, not an image file") from None
    except PermissionError:
        raise FetchRefused(f"permission denied reading {path}") from None
    if len(data) > max_bytes:
        raise _too_large(path.stat().st_size, max_bytes)
    return data


def _fetch_http(uri: str, *, max_bytes: int, timeout_s: float) -> bytes:
    try:
        with (
            httpx.Client(timeout=timeout_s, follow_redirects=True, max_redirects=5) as client,
            client.stream("GET", uri) as response,
        ):
            if response.status_code in RETRYABLE_STATUS:
                raise FetchUnavailable(f"GET {uri} answered {response.status_code}")
            if response.status_code >= 400:
                raise FetchRefused(f"GET {uri} answered {response.status_code}")
            declared = int(response.headers.get("content-length") or 0)
            if declared > max_bytes:
                raise _too_large(declared, max_bytes)
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise _too_large(len(body), max_bytes)
            return bytes(body)
    except httpx.TimeoutException:
        raise FetchTimeout(f"GET {uri} took longer than {timeout_s:g} s") from None
    except httpx.TooManyRedirects:
        raise FetchRefused(f"GET {uri} redirected more than 5 times") from None
    except httpx.TransportError as exc:
        raise FetchUnavailable(f"GET {uri} failed: {exc}") from None
