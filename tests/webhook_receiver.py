"""A webhook receiver for tests: a real HTTP server on 127.0.0.1, in a thread, that acts on
each event once (by its idempotency key) however often it is delivered."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str = ""
    # Answer 500 to this many requests first.
    fail_first: int = 0
    # Answer this status instead of 200 (with a Location, for redirects).
    status: int = 200
    # The request with this number (1-based) is held until `release` is set: a delivery
    # in flight, for killing its sender.
    hold_request: int | None = None
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    # Writes the whole answer itself, raw, instead of a status: a hostile receiver (one
    # that trickles, floods or sends what is not text). Returns how many bytes it sent.
    respond: Callable[[socket.socket], int] | None = None
    bytes_sent: list[int] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    # What the receiver did, once per idempotency key: the event's body.
    effects: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            self.requests.append(Request(headers, body))
            number = len(self.requests)
        if number == self.hold_request:
            self.held.set()
            self.release.wait(60)
            return 500
        if number <= self.fail_first:
            return 500
        if self.status != 200:
            return self.status
        with self.lock:
            # Dedup: a repeat of a key already acted on is acknowledged and dropped.
            self.effects.setdefault(headers["idempotency-key"], json.loads(body))
        return 200

    def keys_requested(self) -> list[str]:
        with self.lock:
            return [request.headers["idempotency-key"] for request in self.requests]


@contextmanager
def running_receiver(receiver: Receiver) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            headers = {name.lower(): value for name, value in self.headers.items()}
            if receiver.respond is not None:
                with receiver.lock:
                    receiver.requests.append(Request(headers, body))
                self.close_connection = True
                try:
                    sent = receiver.respond(self.connection)
                except OSError:  # the sender hung up: what the test wants to see
                    sent = -1
                with receiver.lock:
                    receiver.bytes_sent.append(sent)
                return
            status = receiver.handle(headers, body)
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", "2")
            self.end_headers()
            with contextlib.suppress(OSError):  # the sender is gone (killed mid-delivery)
                self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        # Senders post many events at once; the default backlog of 5 resets connections.
        request_queue_size = 128
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()
