"""Fetching over real local servers and the real file system, under the URI policy.

The test environment allows files under the temporary directory and HTTP to 127.0.0.1
(conftest). Forbidden targets listen on 127.0.0.2 and ::1, and count what connects to
them: a refused fetch must not connect at all, not merely fail afterwards.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, quote

import pytest

from moderation.config import Settings
from moderation.images import errors
from moderation.images.fetch import Deadline, _read_file, fetch, to_uri
from moderation.images.uri_policy import FILE_REFUSED, UriPolicy
from tests.conftest import TEST_SETTINGS
from tests.servers import Listener, http_server, read_request, tcp_listener

POLICY = UriPolicy.from_settings(TEST_SETTINGS)
Handle = Callable[[socket.socket], None]
DEFAULT_POLICY = UriPolicy.from_settings(Settings.model_construct())


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/to":
            self._redirect(parse_qs(query)["u"][0])
            return
        if path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            if left:
                self._redirect(f"/chain/{left - 1}")
                return
        if path == "/slow":
            time.sleep(3)
        status = {"/missing": 404, "/busy": 503, "/secret": 500}.get(path, 200)
        body = {"/big": b"x" * 5000, "/secret": b"SECRET-BODY"}.get(path, b"image bytes")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with http_server(_Handler) as url:
        yield url


@pytest.fixture
def forbidden() -> Iterator[Listener]:
    """A listener on 127.0.0.2: loopback, and outside the test environment's network."""
    with tcp_listener("127.0.0.2") as listener:
        yield listener


@pytest.fixture
def forbidden_v6() -> Iterator[Listener]:
    with tcp_listener("::1") as listener:
        yield listener


def assert_never_connected(listener: Listener) -> None:
    assert listener.connections_so_far() == 0


def refused(uri: str, policy: UriPolicy = POLICY) -> errors.UriRefused:
    with pytest.raises(errors.UriRefused) as caught:
        fetch(uri, policy=policy, max_bytes=1000, timeout_s=2)
    return caught.value


# HTTP, allowed.


def test_http_ok(server: str) -> None:
    assert fetch(f"{server}/ok", policy=POLICY, max_bytes=1000, timeout_s=2) == b"image bytes"


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
        fetch(f"{server}{path}", policy=POLICY, max_bytes=1000, timeout_s=1)


def test_transient_and_final_faults_are_told_apart() -> None:
    assert issubclass(errors.FetchTimeout, errors.TransientFault)
    assert issubclass(errors.FetchUnavailable, errors.TransientFault)
    assert issubclass(errors.FetchRefused, errors.BadInput)
    assert issubclass(errors.NotFound, errors.BadInput)
    assert issubclass(errors.UriRefused, errors.BadInput)


def test_connection_refused_is_transient() -> None:
    with pytest.raises(errors.FetchUnavailable):
        fetch("http://127.0.0.1:9/none", policy=POLICY, max_bytes=1000, timeout_s=1)


def test_redirects_are_followed_within_the_limit(server: str) -> None:
    target = quote(f"{server}/ok", safe="")
    assert fetch(f"{server}/to?u={target}", policy=POLICY, max_bytes=99, timeout_s=2) == (
        b"image bytes"
    )
    assert fetch(f"{server}/chain/5", policy=POLICY, max_bytes=99, timeout_s=2) == b"image bytes"


def test_too_many_redirects_are_refused(server: str) -> None:
    assert "more than 5 redirects" in refused(f"{server}/chain/6").message
    strict = UriPolicy(POLICY.allowed_prefixes, POLICY.allowed_networks, max_redirects=0)
    assert "more than 0 redirects" in refused(f"{server}/chain/1", strict).message


# HTTP, refused: nothing connects.


@pytest.mark.parametrize("host", ["127.0.0.2", "2130706434", "0x7f.0.0.2", "127.2"])
def test_forbidden_addresses_are_never_connected_to(host: str, forbidden: Listener) -> None:
    assert "(loopback)" in refused(f"http://{host}:{forbidden.port}/a.jpg").message
    assert_never_connected(forbidden)


def test_ipv4_mapped_ipv6_is_judged_as_ipv4(forbidden: Listener) -> None:
    assert "(loopback)" in refused(f"http://[::ffff:127.0.0.2]:{forbidden.port}/").message
    assert_never_connected(forbidden)


def test_default_settings_never_connect_to_loopback() -> None:
    # What `http://127.0.0.1:6379/` (Redis) or `:5432` (PostgreSQL) would be in production.
    with tcp_listener("127.0.0.1") as local:
        for uri in [local.url, f"http://localhost:{local.port}/", f"{local.url}/?x=GET%20key"]:
            assert "(loopback)" in refused(uri, DEFAULT_POLICY).message
        assert "(loopback)" in refused("http://127.0.0.1:6379/", DEFAULT_POLICY).message
        assert_never_connected(local)


def test_redirects_to_forbidden_places_are_refused_before_connecting(
    server: str, forbidden: Listener, forbidden_v6: Listener, tmp_path: Path
) -> None:
    allowed_file = tmp_path / "a.jpg"
    allowed_file.write_bytes(b"abc")
    targets = {
        forbidden.url: "(loopback)",
        f"http://2130706434:{forbidden.port}/": "(loopback)",
        f"http://[::ffff:127.0.0.2]:{forbidden.port}/": "(loopback)",
        forbidden_v6.url: "(loopback)",
        "http://169.254.169.254/latest/meta-data/": "cloud metadata",
        "http://[fd00:ec2::254]/latest/meta-data/": "cloud metadata",
        "http://10.0.0.1/": "(private)",
        "file:///etc/passwd": "only to http(s)://",
        allowed_file.as_uri(): "only to http(s)://",
        "gopher://127.0.0.1:6379/_INFO": "only to http(s)://",
        "http://user@127.0.0.1/": "user information",
    }
    for target, reason in targets.items():
        error = refused(f"{server}/to?u={quote(target, safe='')}")
        assert error.message.startswith("a redirect was refused: "), target
        assert reason in error.message, target
        # A redirect's refusal is as final as any other.
        assert isinstance(error, errors.BadInput)
    assert_never_connected(forbidden)
    assert_never_connected(forbidden_v6)


# HTTP: the deadline is for the whole fetch.


def _drip_body(conn: socket.socket) -> None:
    read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(100):
        conn.sendall(b"x")
        time.sleep(0.2)


def _drip_headers(conn: socket.socket) -> None:
    read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    for n in range(100):
        conn.sendall(f"X-Drip-{n}: x\r\n".encode())
        time.sleep(0.2)


@pytest.mark.parametrize("drip", [_drip_body, _drip_headers])
def test_a_dripping_server_is_cut_off_at_the_deadline(drip: Handle) -> None:
    with tcp_listener("127.0.0.1", drip) as dripping:
        started = time.monotonic()
        with pytest.raises(errors.FetchTimeout) as caught:
            fetch(dripping.url, policy=POLICY, max_bytes=10**6, timeout_s=1)
        elapsed = time.monotonic() - started
    # Each byte arrives well within a per-read timeout of 1 s; only the deadline ends it.
    assert 0.9 < elapsed < 1.6
    assert "longer than 1 s" in caught.value.message


# HTTP: nothing the target sent is echoed.


def _answer(reply: bytes, *, read_first: bool = True) -> Handle:
    def handle(conn: socket.socket) -> None:
        if read_first:
            read_request(conn)
        conn.sendall(reply)

    return handle


@pytest.mark.parametrize(
    "handle",
    [
        _answer(b"-ERR wrong number of arguments for 'get' command SECRET\r\n"),
        _answer(b"SSH-2.0-OpenSSH_9.6 SECRET\r\n", read_first=False),
        _answer(b"HTTP/1.1 200 OK\r\nSECRET without a colon\r\n\r\n"),
        _answer(b"HTTP/1.1 200 OK\r\nContent-Length: SECRET\r\n\r\n"),
        _answer(b"HTTP/1.1 500 SECRET\r\nContent-Length: 6\r\n\r\nSECRET"),
        _answer(b"HTTP/1.1 302 Found\r\nLocation: http://SECRET\x00/\r\nContent-Length: 0\r\n\r\n"),
    ],
)
def test_errors_never_carry_what_the_target_sent(handle: Handle) -> None:
    with tcp_listener("127.0.0.1", handle) as target, pytest.raises(errors.IntakeError) as caught:
        fetch(target.url, policy=POLICY, max_bytes=1000, timeout_s=2)
    assert "SECRET" not in str(caught.value)
    assert "ERR" not in str(caught.value)
    assert target.connections == 1


def test_an_error_page_is_not_echoed(server: str) -> None:
    with pytest.raises(errors.FetchUnavailable) as caught:
        fetch(f"{server}/secret", policy=POLICY, max_bytes=1000, timeout_s=2)
    assert caught.value.message == f"GET {server}/secret answered 500"


# HTTPS: connected by address, verified by name.


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_names_the_host_and_verifies_its_certificate(self_signed: tuple[Path, Path]) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed)
    names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)

    def handle(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            read_request(tls)

    with tcp_listener("127.0.0.1", handle) as server, pytest.raises(errors.FetchUnavailable):
        fetch(f"https://localhost:{server.port}/a.jpg", policy=POLICY, max_bytes=99, timeout_s=2)
    # The connection went to the checked address, the TLS server name stayed the host's,
    # and a certificate no authority signed was refused.
    assert names == ["localhost"]


# Local files.


def test_paths_and_file_uris(tmp_path: Path) -> None:
    image = tmp_path / "with space.jpg"
    image.write_bytes(b"abc")
    assert fetch(str(image), policy=POLICY, max_bytes=10, timeout_s=1) == b"abc"
    assert to_uri(str(image)).startswith("file:///")
    assert fetch(to_uri(str(image)), policy=POLICY, max_bytes=10, timeout_s=1) == b"abc"
    with pytest.raises(errors.FileTooLarge):
        fetch(str(image), policy=POLICY, max_bytes=2, timeout_s=1)
    with pytest.raises(errors.NotFound):
        fetch(str(tmp_path / "absent.jpg"), policy=POLICY, max_bytes=10, timeout_s=1)
    with pytest.raises(errors.UnsupportedUri):
        fetch("s3://bucket/key.jpg", policy=POLICY, max_bytes=10, timeout_s=1)


@pytest.mark.parametrize(
    ("existing", "missing"),
    [
        ("/etc/shadow", "/etc/shadow-absent"),
        ("file:///proc/self/environ", "file:///proc/self/environ-absent"),
        ("/dev/zero", "/dev/zero-absent"),
    ],
)
def test_files_outside_allowed_directories_are_refused_alike(existing: str, missing: str) -> None:
    assert os.path.exists(existing.removeprefix("file://"))
    assert str(refused(existing)) == str(refused(missing)) == f"uri_refused: {FILE_REFUSED}"


def test_symlinks_and_dots_out_of_the_allowed_directory_are_refused(tmp_path: Path) -> None:
    (tmp_path / "key").symlink_to("/etc/shadow")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "etc").symlink_to("/etc")
    for uri in [
        str(tmp_path / "key"),
        str(tmp_path / "zero"),
        str(tmp_path / "etc" / "shadow"),
        f"{tmp_path}/{'../' * (len(tmp_path.parts) - 1)}etc/shadow",
    ]:
        assert refused(uri).message == FILE_REFUSED


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    started = time.monotonic()
    assert "only regular files" in refused(str(pipe)).message
    assert time.monotonic() - started < 1


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(tmp_path / "sock"))
        for path in [tmp_path / "dir", tmp_path / "sock"]:
            assert "only regular files" in refused(str(path)).message
    # A device inside an allowed directory is no more readable than outside one.
    devices = UriPolicy(allowed_prefixes=("file:///dev/",))
    assert "only regular files" in refused("/dev/zero", devices).message


def test_the_opened_file_is_checked_not_only_its_path(tmp_path: Path) -> None:
    # What a symlink swapped in after the check looks like when the file is opened: the
    # policy's verdict on the path no longer holds for what the path now leads to.
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "swapped").symlink_to("/etc/shadow")
    (tmp_path / "uploads" / "dir").symlink_to("/etc")
    directory = str(tmp_path / "uploads")
    # Missing or not, what lies outside is refused alike.
    for path in [f"{directory}/swapped", f"{directory}/dir/shadow", f"{directory}/dir/absent"]:
        with pytest.raises(errors.UriRefused) as caught:
            _read_file(path, directory, max_bytes=10**6, deadline=Deadline(2))
        assert caught.value.message == FILE_REFUSED


def test_a_local_read_keeps_the_deadline(tmp_path: Path) -> None:
    large = tmp_path / "large.bin"
    large.write_bytes(b"\0" * (8 << 20))
    with pytest.raises(errors.FetchTimeout):
        fetch(str(large), policy=POLICY, max_bytes=16 << 20, timeout_s=1e-9)
    assert len(fetch(str(large), policy=POLICY, max_bytes=16 << 20, timeout_s=5)) == 8 << 20


def test_concurrent_fetches_share_one_policy(server: str, tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"abc")
    results: list[bytes] = []

    def worker() -> None:
        results.append(fetch(f"{server}/ok", policy=POLICY, max_bytes=99, timeout_s=2))
        results.append(fetch(str(image), policy=POLICY, max_bytes=99, timeout_s=2))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [b"abc"] * 8 + [b"image bytes"] * 8


def test_uri_in_error_is_the_submitted_one(server: str) -> None:
    error_uri = f"{server}/to?u={quote(f'{server}/missing', safe='')}"
    with pytest.raises(errors.FetchRefused) as caught:
        fetch(error_uri, policy=POLICY, max_bytes=99, timeout_s=2)
    assert caught.value.message == f"GET {error_uri} answered 404 (after 1 redirect)"


def test_the_listener_counts_every_connection_made_before_it_is_asked() -> None:
    """What `assert_never_connected` rests on: a connection made just before is counted."""
    with tcp_listener() as listener:
        socket.create_connection((listener.host, listener.port)).close()
        assert listener.connections_so_far() == 1
        assert listener.connections_so_far() == 1  # the sentinels are never counted
