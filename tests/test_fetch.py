"""Fetching over a real local HTTP server and the real file system."""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from moderation.images import errors
from moderation.images.fetch import fetch, to_uri
from tests.servers import http_server


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(3)
        status = {"/missing": 404, "/busy": 503, "/slow": 200, "/big": 200}.get(self.path, 200)
        body = b"x" * 5000 if self.path == "/big" else b"image bytes"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with http_server(_Handler) as url:
        yield url


def test_http_ok(server: str) -> None:
    assert fetch(f"{server}/ok", max_bytes=1000, timeout_s=2) == b"image bytes"


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/missing", errors.FetchRefused),
        ("/busy", errors.FetchUnavailable),
        ("/slow", errors.FetchTimeout),
        ("/big", errors.FileTooLarge),
    ],
)
def test_http_failures_are_typed(server: str, path: str, error: type[errors.IntakeError]) -> None:
    with pytest.raises(error):
        fetch(f"{server}{path}", max_bytes=1000, timeout_s=1)


def test_transient_and_final_faults_are_told_apart() -> None:
    assert issubclass(errors.FetchTimeout, errors.TransientFault)
    assert issubclass(errors.FetchUnavailable, errors.TransientFault)
    assert issubclass(errors.FetchRefused, errors.BadInput)
    assert issubclass(errors.NotFound, errors.BadInput)


def test_connection_refused_is_transient() -> None:
    with pytest.raises(errors.FetchUnavailable):
        fetch("http://127.0.0.1:9/none", max_bytes=1000, timeout_s=1)


def test_paths_and_file_uris(tmp_path: Path) -> None:
    image = tmp_path / "with space.jpg"
    image.write_bytes(b"abc")
    assert fetch(str(image), max_bytes=10, timeout_s=1) == b"abc"
    assert to_uri(str(image)).startswith("file:///")
    assert fetch(to_uri(str(image)), max_bytes=10, timeout_s=1) == b"abc"
    with pytest.raises(errors.FileTooLarge):
        fetch(str(image), max_bytes=2, timeout_s=1)
    with pytest.raises(errors.NotFound):
        fetch(str(tmp_path / "absent.jpg"), max_bytes=10, timeout_s=1)
    with pytest.raises(errors.UnsupportedUri):
        fetch("s3://bucket/key.jpg", max_bytes=10, timeout_s=1)
