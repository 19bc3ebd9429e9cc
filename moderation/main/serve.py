"""Running the application under uvicorn, in one process or several."""

from __future__ import annotations

import socket

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

APP = "moderation.main.app:app_from_environment"


class TcpConfig(uvicorn.Config):
    """uvicorn's configuration, with a listening socket whose connections are not held
    back by Nagle's algorithm when several processes share it.

    With more than one worker uvicorn binds the socket itself as `socket.socket(family)`,
    protocol 0, and asyncio turns TCP_NODELAY on only for sockets that say IPPROTO_TCP.
    A response goes out in two sends (head, then body), so the body waited for the
    client's delayed ACK: 40-50 ms added to every request (`bench/api.py`, two workers).
    Re-opened from its descriptor the socket reports its real protocol, and so do the
    connections it accepts."""

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return sock
        tcp = socket.socket(fileno=sock.detach())
        tcp.set_inheritable(True)
        return tcp


def serve(host: str, port: int, workers: int) -> None:
    # Behind a proxy that terminates TLS, trust its X-Forwarded-* headers.
    config = TcpConfig(APP, factory=True, host=host, port=port, workers=workers, proxy_headers=True)
    if config.workers > 1:
        # What `uvicorn.run` does for several workers, with the socket above.
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    # One process: asyncio binds from getaddrinfo's answer, which says IPPROTO_TCP.
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)
