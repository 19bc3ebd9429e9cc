"""The real Milvus 2.3.5 standalone server from PyPI's `milvus` wheel, for the tests.

The wheel's own `MilvusServer` picks ports by probing from well-known defaults (19530,
2379, ...) and starts the binary in the caller's process group. Here every port is set
explicitly, in a block derived from the Redis test database number so that sessions of
different engineers on one machine never meet, the components advertise 127.0.0.1, and the
binary runs in a session of its own so that `kill` stops it (and only it) by its process
group, as a crash would: that is how the tests take Milvus down mid-sync. The embedded
etcd gets a config file of its own so that it too listens in the block (on 127.0.0.1)
rather than on the fixed 2379/2380 that would keep a second server (a benchmark beside
the tests) from starting. The Milvus binary still listens on every interface for its gRPC
ports (2.3.5 has no listen-address setting), hence ports far from the defaults.

Start: 10-30 s on two busy cores (the first start also unpacks the binary); ~220 MB.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from os.path import dirname, join
from pathlib import Path

_PORT_KEYS = (
    "etcd_port",
    "root_coord_port",
    "proxy_port",
    "proxy_internal_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
)
_COMPONENTS = (
    "rootCoord",
    "proxy",
    "queryCoord",
    "queryNode",
    "indexCoord",
    "indexNode",
    "dataCoord",
    "dataNode",
)


class MilvusUnavailable(RuntimeError):
    """The wheel cannot run here (not installed, not this platform, or it did not start)."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@dataclass
class MilvusProcess:
    """One standalone server over `data_dir`, on ports `base`..`base + 12`."""

    data_dir: Path
    base: int
    # Settings of the server's milvus.yaml by dotted path ("dataCoord.segment.sealProportion").
    overrides: dict[str, object] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def proxy_port(self) -> int:
        return self.base + _PORT_KEYS.index("proxy_port")

    @property
    def metrics_port(self) -> int:
        return self.base + len(_PORT_KEYS)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def start(self, timeout_s: float = 180.0) -> None:
        try:
            import milvus
        except ImportError as error:
            raise MilvusUnavailable(f"the `milvus` wheel is not installed ({error})") from error
        busy = [p for p in range(self.base, self.base + 13) if not _port_free(p)]
        if busy:
            raise MilvusUnavailable(f"ports {busy} are taken (another Milvus runs here?)")
        config = milvus.MilvusServerConfig(data_dir=str(self.data_dir))
        # Ports set here, not through the wheel's `resolve`, whose probe binds without
        # SO_REUSEADDR and so refuses a port a restarted server's old connections linger on.
        for i, key in enumerate(_PORT_KEYS):
            config.configurable_items[key][1] = self.base + i
        for component in _COMPONENTS:
            config.set(f"{component}.ip", "127.0.0.1")
        for key, value in self.overrides.items():
            config.set(key, value)
        config.resolve_storage()
        config.write_config()  # configs/milvus.yaml under data_dir
        self._own_etcd_ports(Path(config.base_data_dir) / "configs")
        milvus._initialize_data_files(config.base_data_dir)
        executable = join(config.base_data_dir, "bin", "milvus")
        environment = os.environ.copy() | {
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(self.metrics_port),
            "MILVUS_RUN_DIR": join(config.base_data_dir, "run"),
            "LD_LIBRARY_PATH": ":".join(
                [dirname(executable), os.environ.get("LD_LIBRARY_PATH", "")]
            ),
        }
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / "stdout.log").open("ab") as out, (logs / "stderr.log").open("ab") as err:
            self.process = subprocess.Popen(
                [executable, "run", "standalone"],
                cwd=config.base_data_dir,
                env=environment,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: stopped as one
            )
        self._wait_healthy(timeout_s)

    def _own_etcd_ports(self, configs: Path) -> None:
        """The embedded etcd listens on 2379 and 2380 whatever the wheel's template says,
        so two servers on one machine collide; an etcd config file of its own (a setting
        the template lacks, added under `etcd:`) moves both into this server's block."""
        etcd = configs / "etcd.yaml"
        client, peer = self.base, self.base + 12  # the template's etcd_port is base
        etcd.write_text(
            f"listen-client-urls: http://127.0.0.1:{client}\n"
            f"advertise-client-urls: http://127.0.0.1:{client}\n"
            f"listen-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-cluster: default=http://127.0.0.1:{peer}\n"
        )
        milvus_yaml = configs / "milvus.yaml"
        text = milvus_yaml.read_text()
        text = text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd}\n", 1)
        milvus_yaml.write_text(text)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.metrics_port}/healthz"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise MilvusUnavailable(
                    f"milvus exited with {self.process.returncode}; see {self.data_dir}/logs"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if b"OK" in response.read():
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        self.stop()
        raise MilvusUnavailable(f"milvus did not answer {url} in {timeout_s:g} s")

    def stop(self, *, crash: bool = False) -> None:
        """Stop the server's process group: SIGKILL when `crash` (as a machine loss would),
        else SIGTERM and then SIGKILL after 10 s."""
        if self.process is None:
            return
        group = self.process.pid  # its own session: the group id is its pid
        try:
            os.killpg(group, signal.SIGKILL if crash else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(group, signal.SIGKILL)
                self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
        self.process = None


def port_base_for(redis_db: int) -> int:
    """A block of 13 ports per test Redis database: 29000 + 20 * db, below Linux's
    ephemeral range (32768-60999), where an outgoing connection's local port could hold one
    of them at any moment and skip the suite."""
    return 29_000 + 20 * redis_db
