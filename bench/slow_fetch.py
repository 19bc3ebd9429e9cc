"""Slow servers against a normal upload: its latency alone, and with slow-server uploads in
flight, both measured in the same run on one real worker.

    python bench/slow_fetch.py [--slow 50] [--samples 7] [--out bench/results/slow_fetch.json]

A normal upload is a 640x480 JPEG served at once over HTTP from 127.0.0.1; its latency is
from submission (row committed, message sent) to its row being final, polled every 10 ms.
First `--samples` normal uploads one after another with nothing else in flight (the
baseline); then `--slow` uploads, each in a message of its own, whose servers (one per
upload, on 127.0.0.2, 127.0.0.3, ...) read the request and then trickle the answer's head a
byte every 0.2 s; once every slow fetch has connected, `--samples` normal uploads again,
one after another, while the slow ones trickle. Target (issue 27): the median with slow
uploads in flight within 2x of the median alone. The slow servers are released at the end
and every slow upload must then be screened.

The worker runs with the defaults except the tiny model on CPU, a fetch deadline long
enough for the slow fetches to outlast the measurement, and the run's database
(MODERATION_BENCH_DATABASE_URL, default moderation_bench_slow_fetch, recreated) and Redis
(MODERATION_BENCH_REDIS_URL, default db 11, flushed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moderation.runtime import Runtime

BENCH_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation_bench_slow_fetch"
BENCH_REDIS = "redis://127.0.0.1:6379/11"
CACHE = Path.home() / ".cache" / "moderation"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", type=int, default=50, help="slow-server uploads in flight")
    parser.add_argument(
        "--slow-hosts",
        type=int,
        default=None,
        help="loopback addresses the slow servers share (default: one each); fewer hosts "
        "than uploads puts the rest behind MODERATION_WORKER_FETCHES_PER_HOST",
    )
    parser.add_argument("--samples", type=int, default=7, help="normal uploads per phase")
    parser.add_argument(
        "--cpu-uploads", type=int, default=200, help="uploads per phase of the CPU measure"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "slow_fetch.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="moderation-slow-fetch-"))
    model = CACHE / "tiny-clip"
    database = os.environ.get("MODERATION_BENCH_DATABASE_URL", BENCH_DATABASE)
    os.environ.update(
        {
            "MODERATION_DATABASE_URL": database,
            "MODERATION_REDIS_URL": os.environ.get("MODERATION_BENCH_REDIS_URL", BENCH_REDIS),
            "MODERATION_QUEUE": "screening-slow-fetch",
            "MODERATION_MODEL": str(model),
            "MODERATION_DEVICE": "cpu",
            "MODERATION_CLIP_MATCH_METHODS": "torch-float32",
            "MODERATION_ALLOWED_URI_PREFIXES": f"{workdir.as_uri()}/,http://",
            # The normal server on 127.0.0.1, a slow one per upload on 127.0.0.2 onwards.
            "MODERATION_FETCH_ALLOWED_NETWORKS": "127.0.0.0/8",
            # The slow fetches must outlast the measurement rather than time out in it.
            "MODERATION_FETCH_TIMEOUT_S": "120",
            "MODERATION_INTAKE_TIMEOUT_S": "180",
            "MODERATION_STUCK_AFTER_S": "3600",
        }
    )
    from moderation.config import Settings
    from moderation.embedding.tiny import write_tiny_clip
    from moderation.runtime import Runtime
    from moderation.worker.child import WorkerProcess
    from tests.servers import http_server, image_handler

    # The run's settings, as set above; the worker reads the same from its environment.
    runtime = Runtime(Settings())

    if not (model / "config.json").exists():
        write_tiny_clip(model)
    recreate_database(database)
    flush_broker(runtime)
    image = normal_image()
    hosts = args.slow_hosts or args.slow
    slow_servers = [Trickler(f"127.0.0.{2 + n % hosts}") for n in range(args.slow)]
    with ExitStack() as stack:
        normal_url = stack.enter_context(http_server(image_handler(image)))
        for server in slow_servers:
            stack.enter_context(server.listening())
        worker = stack.enter_context(WorkerProcess(workdir / "worker.log")).wait_ready()
        # A first upload warms the worker (its first forward pass, its connections).
        latency(runtime, f"{normal_url}/warm.jpg")
        alone = [latency(runtime, f"{normal_url}/alone-{n}.jpg") for n in range(args.samples)]
        # Alternated, twice each, since the first burst after the latencies pays more.
        files = local_files(workdir, image, args.cpu_uploads)
        cpu: dict[str, list[float]] = {"http_fetched_by_the_worker": [], "file_read_by_intake": []}
        for round_ in range(2):
            cpu["file_read_by_intake"].append(
                worker_cpu_ms_per_upload(runtime, worker.process.pid, files)
            )
            cpu["http_fetched_by_the_worker"].append(
                worker_cpu_ms_per_upload(
                    runtime,
                    worker.process.pid,
                    [f"{normal_url}/cpu-{round_}-{n}.jpg" for n in range(args.cpu_uploads)],
                )
            )
        slow_ids = submit_each(runtime, [f"{s.url}/slow.jpg" for s in slow_servers])
        # Every slow fetch its host's slots allow connected; the rest wait for them.
        per_host = runtime.settings.worker_fetches_per_host
        connecting = sum(min(per_host, len(range(h, args.slow, hosts))) for h in range(hosts))
        in_flight_after_s = wait_for_connections(slow_servers, connecting)
        behind_slow = [
            latency(runtime, f"{normal_url}/behind-{n}.jpg") for n in range(args.samples)
        ]
        still_processing = count_processing(runtime, slow_ids)
        for server in slow_servers:
            server.released.set()
        slow_final_s = wait_final(runtime, slow_ids, timeout_s=300)
        log = worker.log()
    results = report(args, alone, behind_slow, in_flight_after_s, still_processing, slow_ids)
    results["worker_main_process_cpu_ms_per_upload"] = cpu
    results["slow_screened"] = count_screened(runtime, slow_ids)
    results["slow_final_after_release_s"] = round(slow_final_s, 2)
    runtime.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(
        f"\nnormal upload, median: alone {results['alone_median_s']:.2f} s, with "
        f"{args.slow} slow-server uploads in flight {results['behind_slow_median_s']:.2f} s: "
        f"{results['ratio']:.2f}x (target <= 2)"
    )
    print(f"written to {args.out}; worker log {workdir / 'worker.log'} ({len(log)} chars)")


class Trickler:
    """A server on its own loopback address that reads a request, then sends its answer's
    head a byte every 0.2 s until released."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.released = threading.Event()
        self.connections = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @contextmanager
    def listening(self) -> Iterator[None]:
        from tests.servers import tcp_listener

        with tcp_listener(self.host, self._handle) as listener:
            self.port = listener.port
            try:
                yield
            finally:
                self.released.set()

    def _handle(self, conn: socket.socket) -> None:
        from tests.servers import read_request

        self.connections += 1
        read_request(conn)
        head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100_000
        sent = 0
        while sent < len(head) and not self.released.wait(0.2):
            conn.sendall(head[sent : sent + 1])
            sent += 1
        body = normal_image()
        conn.sendall(head[sent:] + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


_IMAGE: bytes | None = None


def normal_image() -> bytes:
    global _IMAGE
    if _IMAGE is None:
        from moderation.demo.synthetic import textured

        buffer = io.BytesIO()
        textured(7, (640, 480)).save(buffer, "JPEG", quality=90)
        _IMAGE = buffer.getvalue()
    return _IMAGE


def recreate_database(url: str) -> None:
    from sqlalchemy import create_engine, text

    from moderation import schema

    admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()
    schema.upgrade(url)


def flush_broker(runtime: Runtime) -> None:
    import redis

    redis.Redis.from_url(runtime.settings.redis_url).flushdb()


def submit_each(runtime: Runtime, uris: list[str]) -> list[int]:
    """Rows committed, then a message per upload (as separate uploaders' requests send)."""
    from moderation.screening import service

    with runtime.session() as session:
        ids = [service.submit(session, uri)[0].id for uri in uris]
    for upload_id in ids:
        runtime.producer.send_screening([upload_id])
    return ids


def final_ids(runtime: Runtime, ids: list[int]) -> set[int]:
    from sqlalchemy import select

    from moderation.screening.models import Upload, UploadStatus

    final = (UploadStatus.SCREENED, UploadStatus.FAILED)
    with runtime.session() as session:
        return set(
            session.scalars(select(Upload.id).where(Upload.id.in_(ids), Upload.status.in_(final)))
        )


def count_status(runtime: Runtime, ids: list[int], status: str) -> int:
    from sqlalchemy import func, select

    from moderation.screening.models import Upload, UploadStatus

    with runtime.session() as session:
        query = select(func.count()).where(
            Upload.id.in_(ids), Upload.status == UploadStatus(status)
        )
        return session.scalar(query) or 0


def count_processing(runtime: Runtime, ids: list[int]) -> int:
    return count_status(runtime, ids, "processing")


def count_screened(runtime: Runtime, ids: list[int]) -> int:
    return count_status(runtime, ids, "screened")


def wait_final(runtime: Runtime, ids: list[int], timeout_s: float) -> float:
    started = time.monotonic()
    while len(final_ids(runtime, ids)) < len(ids):
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{len(ids) - len(final_ids(runtime, ids))} uploads not final")
        time.sleep(0.01)
    return time.monotonic() - started


def latency(runtime: Runtime, uri: str) -> float:
    """Seconds from submitting one normal upload to its row being final (it must be
    screened: a failure would measure something else)."""
    started = time.monotonic()
    (upload_id,) = submit_each(runtime, [uri])
    wait_final(runtime, [upload_id], timeout_s=300)
    elapsed = time.monotonic() - started
    assert count_screened(runtime, [upload_id]) == 1, f"upload {upload_id} was not screened"
    return elapsed


def local_files(workdir: Path, image: bytes, count: int) -> list[str]:
    directory = workdir / "files"
    directory.mkdir()
    uris = []
    for n in range(count):
        path = directory / f"{n}.jpg"
        path.write_bytes(image)
        uris.append(path.as_uri())
    return uris


def cpu_seconds(pid: int) -> float:
    """The process's own CPU time (its threads; not its intake processes')."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_cpu_ms_per_upload(runtime: Runtime, pid: int, uris: list[str]) -> float:
    """The worker's main process CPU per upload over a burst of `uris` (16 a message, as a
    batch submission sends): where the fetch runs moves CPU into or out of it."""
    from moderation.screening import service

    before = cpu_seconds(pid)
    with runtime.session() as session:
        ids = [service.submit(session, uri)[0].id for uri in uris]
    runtime.producer.send_screening(ids)
    wait_final(runtime, ids, timeout_s=600)
    assert count_screened(runtime, ids) == len(ids), (
        "the CPU measure's uploads were not all screened"
    )
    return round((cpu_seconds(pid) - before) * 1000 / len(ids), 2)


def wait_for_connections(servers: list[Trickler], count: int, timeout_s: float = 120) -> float:
    """Seconds until `count` slow servers have their fetch connected, in flight at once."""
    started = time.monotonic()
    while sum(1 for s in servers if s.connections) < count:
        if time.monotonic() - started > timeout_s:
            connected = sum(1 for s in servers if s.connections)
            raise TimeoutError(f"only {connected} of {count} slow fetches connected")
        time.sleep(0.02)
    return time.monotonic() - started


def report(
    args: argparse.Namespace,
    alone: list[float],
    behind_slow: list[float],
    in_flight_after_s: float,
    still_processing: int,
    slow_ids: list[int],
) -> dict[str, object]:
    alone_median = statistics.median(alone)
    behind_median = statistics.median(behind_slow)
    return {
        "slow_uploads": args.slow,
        "slow_hosts": args.slow_hosts or args.slow,
        "samples": args.samples,
        "alone_s": [round(s, 3) for s in alone],
        "behind_slow_s": [round(s, 3) for s in behind_slow],
        "alone_median_s": round(alone_median, 3),
        "behind_slow_median_s": round(behind_median, 3),
        "ratio": round(behind_median / alone_median, 2),
        "target_ratio": 2.0,
        "slow_connected_after_s": round(in_flight_after_s, 2),
        "slow_still_processing_after_measurement": still_processing,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


if __name__ == "__main__":
    main()
