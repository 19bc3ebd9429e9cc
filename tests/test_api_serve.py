"""The listening socket `moderation api --workers N` shares between its processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from moderation.main.serve import APP, TcpConfig
from tests.conftest import TEST_ENV


def test_connections_on_the_shared_socket_send_without_waiting_for_acks() -> None:
    """asyncio sets TCP_NODELAY on a connection only when its socket says IPPROTO_TCP;
    uvicorn's own socket for several workers says protocol 0, and every response then
    waited for the client's delayed ACK."""
    config = TcpConfig(APP, factory=True, host="127.0.0.1", port=0, workers=2)
    listening = config.bind_socket()
    assert listening.proto == socket.IPPROTO_TCP
    assert listening.get_inheritable()

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connection, sock=listening)
        async with server:
            _, writer = await asyncio.open_connection(*listening.getsockname()[:2])
            try:
                return await asyncio.wait_for(seen, 10)
            finally:
                writer.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_several_workers_serve_on_the_shared_socket(tmp_path: Path) -> None:
    """`moderation api --workers 2` as operators run it: both processes start from the
    pickled configuration and answer on the one port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "api.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moderation", "api", "--port", str(port), "--workers", "2"],
        env={**os.environ, **TEST_ENV},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                answers = [
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5) for _ in range(4)
                ]
                break
            except httpx.TransportError:
                assert server.poll() is None, (tmp_path / "api.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert [answer.status_code for answer in answers] == [200] * 4
    assert (tmp_path / "api.log").read_text().count("Application startup complete") == 2
