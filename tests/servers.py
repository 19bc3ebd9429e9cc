"""Real servers on free local ports, for tests of fetching."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def image_handler(image: bytes, delay_s: float = 0.0) -> type[BaseHTTPRequestHandler]:
    """A handler that serves `image` at every path, after a pause: uploads stay in flight
    (for a worker to die holding them), and a backlog builds."""

    class ImageHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(delay_s)
            # The client may be gone by then (a killed intake process): say nothing, since
            # a traceback printed from this thread would land in a later test's output.
            with suppress(ConnectionError):
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

        def log_message(self, *_: object) -> None:
            pass

    return ImageHandler


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve with `handler` in a thread; yields the base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@dataclass
class Listener:
    """A TCP listener that counts the connections it accepted."""

    host: str
    port: int
    _accepted: list[socket.socket] = field(default_factory=list)
    # Who connected, in the order accepted: read at accept, before a handler closes it.
    _peers: list[tuple[str, int]] = field(default_factory=list)
    # The test's own connections that `connections_so_far` made, never counted.
    _sentinels: set[tuple[str, int]] = field(default_factory=set)

    @property
    def connections(self) -> int:
        return len(self._accepted)

    def connections_so_far(self, timeout_s: float = 10.0) -> int:
        """The connections made before now, each accepted: a connection of the test's own
        goes to the back of the listen queue and is waited for, so every connection made
        before it has been accepted (and counted) by then. No sleep that merely hopes."""
        with socket.create_connection((self.host, self.port), timeout=timeout_s) as sentinel:
            mine = sentinel.getsockname()[:2]
            self._sentinels.add(mine)
            deadline = time.monotonic() + timeout_s
            while mine not in self._peers:
                if time.monotonic() > deadline:
                    raise TimeoutError("the listener did not accept the sentinel connection")
                time.sleep(0.005)
        return len([peer for peer in self._peers if peer not in self._sentinels])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def close_at_once(conn: socket.socket) -> None:
    conn.close()


@contextmanager
def tcp_listener(
    host: str = "127.0.0.1", handle: Callable[[socket.socket], None] = close_at_once
) -> Iterator[Listener]:
    """Accept connections on `host` (any free port), each handled by `handle` on a thread
    of its own; yields the listener, whose count proves whether anything connected."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, 0))
    server.listen(16)
    server.settimeout(0.05)
    listener = Listener(host, server.getsockname()[1])
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        try:
            handle(conn)
        except OSError:
            pass  # the client hung up
        finally:
            conn.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            listener._peers.append(peer[:2])
            listener._accepted.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        stop.set()
        thread.join()
        server.close()


def read_request(conn: socket.socket) -> None:
    """Read an HTTP request's head, so answering it does not reset the connection."""
    conn.settimeout(5)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = conn.recv(4096)
        if not chunk:
            return
        received += chunk
