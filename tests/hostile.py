"""The hostile corpus: every input an attacker was seen to try against the service, each
with the code it must fail with (or None: it must be screened, within bounds). Used by the
end-to-end test against a real worker, by `bench/load.py`, and to seed the fuzzer.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from moderation.images.hashing import sha256
from tests.images import (
    declared_huge_jpeg,
    decompression_bomb,
    encode,
    many_frame_gif,
    textured,
    write,
)
from tests.servers import Listener, http_server, tcp_listener


@dataclass(frozen=True)
class Case:
    name: str
    uri: str
    code: str | None  # None: must be screened
    declared_sha256: bytes | None = None
    # Screened animations: PDQ hashes at most this many of their frames.
    max_frames_hashed: int = 1

    @property
    def refused_at_submission(self) -> bool:
        """Producers apply the fetch policy too; these never become uploads through them."""
        return self.code in ("uri_refused", "unsupported_uri")


def _banner(connection: socket.socket) -> None:
    connection.sendall(b"-ERR secret service banner\r\n")


@contextmanager
def forbidden_targets() -> Iterator[tuple[Listener, str]]:
    """A listener on a loopback address that production never fetches from, which must
    never be connected to, and an allowed server (127.0.0.1) that redirects to it."""
    with tcp_listener("127.0.0.2", handle=_banner) as listener:

        class Redirect(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(302)
                self.send_header("Location", f"{listener.url}/image.jpg")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        with http_server(Redirect) as redirector:
            yield listener, redirector


def make_corpus(directory: Path, listener: Listener, redirector: str) -> list[Case]:
    """Write the hostile files under `directory` (which the fetch policy must allow)."""
    directory.mkdir(parents=True, exist_ok=True)
    shadow_copy = write(directory / "shadow-copy.txt", b"root:*:20228:0:99999:7:::\n")
    link = directory / "innocent.jpg"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/passwd")
    fifo = directory / "pipe.jpg"
    if not fifo.exists():
        os.mkfifo(fifo)
    image = encode(textured(11))
    good = write(directory / "good.jpg", image)
    return [
        Case("a system file", "file:///etc/shadow", "uri_refused"),
        Case("a missing system file", "file:///root/.ssh/id_rsa", "uri_refused"),
        Case("the process environment", "file:///proc/self/environ", "uri_refused"),
        Case("a plain path outside", "/etc/passwd", "uri_refused"),
        Case("a symlink out", link.as_uri(), "uri_refused"),
        # More `..` than the directory is deep: any more stay at /.
        Case("a .. escape", f"{directory.as_uri()}{'/..' * 32}/etc/passwd", "uri_refused"),
        Case("a named pipe", fifo.as_uri(), "uri_refused"),
        Case("a directory", directory.as_uri(), "uri_refused"),
        Case("a device", "file:///dev/zero", "uri_refused"),
        Case("a loopback service", f"{listener.url}/", "uri_refused"),
        Case("a redirect to loopback", f"{redirector}/start.jpg", "uri_refused"),
        Case("cloud metadata", "http://169.254.169.254/latest/meta-data/", "uri_refused"),
        Case("an unsupported scheme", "gopher://127.0.0.1:6379/_INFO", "unsupported_uri"),
        Case("a text file", shadow_copy.as_uri(), "unsupported_format"),
        Case("zero bytes", write(directory / "zero.jpg", b"").as_uri(), "empty_file"),
        Case(
            "a decompression bomb",
            write(directory / "bomb.png", decompression_bomb()).as_uri(),
            "decompression_bomb",
        ),
        Case(
            "bytes other than declared",
            good.as_uri(),
            "content_mismatch",
            declared_sha256=sha256(b"some other image"),
        ),
        Case("the bytes declared", good.as_uri(), None, declared_sha256=sha256(image)),
        Case(
            "a JPEG declaring 16000x3000 in 631 bytes",
            write(directory / "declared-huge.jpg", declared_huge_jpeg()).as_uri(),
            "truncated_image",
        ),
        Case(
            "200,000 one-pixel frames",
            write(directory / "frames.gif", many_frame_gif(200_000)).as_uri(),
            None,
            max_frames_hashed=64,
        ),
    ]
