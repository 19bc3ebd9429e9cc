"""Uploads accepted per second by `POST /v1/uploads`, against a plain INSERT of the same rows.

    python bench/api.py                      # batches of 1 and of 100, one client
    python bench/api.py --clients 4          # four clients at once, for both sides
    python bench/api.py --requests 2000
    python bench/api.py --clients 8 --api-workers 4   # a fleet of producers, more cores

The API runs as production runs it: `moderation api` (uvicorn) in a subprocess, over a
database of its own (MODERATION_BENCH_DATABASE_URL, default moderation_bench_api, created
and migrated) and a Redis queue of its own that no worker consumes (deleted afterwards).
Each request carries uploads with an external id, an https URI on a literal public address
(checked by the fetch policy without DNS) and a little metadata, with a submitter's key.
Bodies are encoded before the clock starts and sent with the standard library's HTTP
client, so that the load generator takes as little as it can of the cores it shares with
the server (`ApiSender`).

The baseline, in the same run: the same rows by a plain multi-row `INSERT INTO uploads`
(psycopg2, one statement and one commit per batch, the same number of clients), which is
what accepting an upload cannot be faster than. The API does that insert too, plus
authentication, the URI checks, the idempotency lookup, HTTP and JSON, and publishing the
screening messages to Redis after commit (from a thread of the API process, which the
request does not wait for; before the figures are written the benchmark checks that every
upload the API accepted is named by a message on the queue).

A second reference, with one API process: the framework's floor (`bench/api_floor.py`),
the same FastAPI and uvicorn stack, request models and insert with nothing else of ours
(no key check, no URI policy, no messages). It tells how much of the gap to the plain
insert is the framework's and how much is the API's own work.

Reported per batch size: uploads accepted per second, the ratio API / plain insert
(target for batches of 100: >= 0.5), the floor's ratio, the API's throughput as a fraction
of the floor's (targets: >= 0.7 for single events, >= 0.6 for batches of 100), and
per-request p50 and p99 latency. Printed, and written to bench/results/api.json.
The sides take turns (`--rounds`, 10 by default: plain insert, API, floor, again), so that
the load of a shared machine changes under all of them alike.
With one API process, the server processes' CPU per request is read too (`/proc`), for
the API and the floor: on a shared machine the load moves it far less than throughput.
`--no-key-cache` runs the API with every request reading its key from the table
(MODERATION_API_KEY_CACHE=false), to measure what the key cache saves.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import redis

if TYPE_CHECKING:
    from moderation.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
BENCH_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation_bench_api"
BENCH_REDIS = "redis://127.0.0.1:6379/0"
BATCHES = (1, 100)
# The API's throughput as a fraction of the framework floor's, by batch size (issue 24).
FLOOR_TARGETS = {1: 0.7, 100: 0.6}
# Requests before timing, per batch size: connections warm, statements prepared.
WARMUP = 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1, help="Concurrent clients.")
    parser.add_argument(
        "--api-workers", type=int, default=1, help="Server processes (`moderation api --workers`)."
    )
    parser.add_argument(
        "--requests", type=int, default=600, help="Timed requests for batches of 1."
    )
    parser.add_argument(
        "--uploads", type=int, default=20_000, help="Timed uploads for batches of 100."
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="Turns the sides take, alternating, so that load changes fall on all alike.",
    )
    parser.add_argument(
        "--no-key-cache",
        action="store_true",
        help="Read the key from the table on every request (MODERATION_API_KEY_CACHE=false).",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/api.json")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def prepare_database(url: str) -> None:
    from moderation import schema

    schema.upgrade(url)


def submitter_key(runtime: Runtime) -> str:
    from moderation.auth import service as auth
    from moderation.auth.models import Role

    with runtime.session() as session:
        _, secret = auth.create_key(session, role=Role.SUBMITTER, name="bench", actor="bench")
    return secret


class Uploads:
    """Upload events unique to this run, handed out in batches."""

    def __init__(self) -> None:
        self._run = uuid.uuid4().hex[:12]
        self._next = 0

    def batch(self, size: int) -> list[dict[str, Any]]:
        start, self._next = self._next, self._next + size
        return [
            {
                "uri": f"https://93.184.215.14/bench/{self._run}/{i}.jpg",
                "external_id": f"bench-{self._run}-{i}",
                "metadata": {"user": i % 1000, "surface": "bench"},
            }
            for i in range(start, start + size)
        ]


class Sender(Protocol):
    """One side of the comparison: a batch of rows made ready to send before the clock
    starts (encoded as a request body, or as a statement's parameters), then sent."""

    def prepare(self, rows: list[dict[str, Any]]) -> Any: ...

    def send(self, prepared: Any) -> None: ...

    def server_cpu_s(self) -> float | None:
        """CPU seconds the server process has used so far, where there is one to read."""
        ...


def timed(
    senders: dict[str, Sender],
    uploads: Uploads,
    batch: int,
    requests: int,
    clients: int,
    rounds: int,
) -> dict[str, dict[str, Any]]:
    """Send `requests` batches through each sender from `clients` threads, in `rounds`
    alternating turns (A, B, C, A, B, C, ...), so that a change in the machine's load
    falls on every side alike; throughput (over the time each side spent sending) and
    latency, by sender."""
    prepared: dict[str, list[Any]] = {}
    for name, sender in senders.items():
        for _ in range(WARMUP):
            sender.send(sender.prepare(uploads.batch(batch)))
        prepared[name] = [sender.prepare(uploads.batch(batch)) for _ in range(requests)]
    latencies: dict[str, list[float]] = {name: [] for name in senders}
    elapsed = dict.fromkeys(senders, 0.0)
    server_cpu = dict.fromkeys(senders, 0.0)
    turn = -(-requests // rounds)
    for start in range(0, requests, turn):
        for name, sender in senders.items():

            def one(payload: Any, sender: Sender = sender, name: str = name) -> None:
                started = time.perf_counter()
                sender.send(payload)
                latencies[name].append(time.perf_counter() - started)

            cpu_before = sender.server_cpu_s()
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(one, prepared[name][start : start + turn]))
            elapsed[name] += time.perf_counter() - started
            cpu_after = sender.server_cpu_s()
            if cpu_before is not None and cpu_after is not None:
                server_cpu[name] += cpu_after - cpu_before
    results = {}
    for name in senders:
        taken = sorted(latencies[name])
        results[name] = {
            "batch": batch,
            "requests": requests,
            "uploads_per_s": round(requests * batch / elapsed[name], 1),
            "p50_ms": round(1000 * statistics.median(taken), 2),
            "p99_ms": round(1000 * taken[min(len(taken) - 1, int(0.99 * len(taken)))], 2),
        }
        if server_cpu[name]:
            results[name]["server_cpu_ms_per_request"] = round(
                1000 * server_cpu[name] / requests, 2
            )
    return results


class ApiSender:
    """Producers' requests: the JSON body encoded beforehand, sent over a kept-alive
    connection per client thread with the standard library's HTTP client. The client
    shares the two cores with the server; httpx, encoding each body as it sent it, took
    1.0-1.3 ms of them per request of 100, against 0.4 for this."""

    def __init__(self, port: int, key: str, server: subprocess.Popen[bytes] | None = None) -> None:
        self._port = port
        self._server = server
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._local = threading.local()

    def prepare(self, rows: list[dict[str, Any]]) -> bytes:
        return json.dumps(rows[0] if len(rows) == 1 else {"uploads": rows}).encode()

    def send(self, body: bytes) -> None:
        try:
            status, answer = self._post(body)
        except (ConnectionError, http.client.RemoteDisconnected):
            # uvicorn closes a connection idle for 5 s (between phases); a keep-alive client
            # opens another. Sending again is safe: the events' external ids make it so.
            self._local.connection = None
            status, answer = self._post(body)
        if status != 202:
            raise RuntimeError(f"{status}: {answer[:300]!r}")

    def server_cpu_s(self) -> float | None:
        """The server process's user and system CPU (all its threads; Linux's /proc), for
        one server process: what a request costs it, which the load of a shared machine
        moves far less than it moves throughput. (The announcer's send of a turn's last
        uploads can fall into the next turn; a turn is many requests.)"""
        if self._server is None:
            return None
        try:
            with open(f"/proc/{self._server.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # utime and stime, the 14th and 15th fields, in clock ticks.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _post(self, body: bytes) -> tuple[int, bytes]:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection(
                "127.0.0.1", self._port, timeout=60
            )
        connection.request("POST", "/v1/uploads", body, self._headers)
        response = connection.getresponse()
        return response.status, response.read()


class InsertSender:
    """The baseline: one multi-row INSERT and one commit per batch, a connection per thread."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        self._engine = create_engine(url, pool_size=32)
        self._local = threading.local()

    def prepare(self, rows: list[dict[str, Any]]) -> tuple[str, list[Any]]:
        values = ", ".join(["(%s, %s, 'queued', now(), %s::jsonb, 0)"] * len(rows))
        parameters = [
            value for r in rows for value in (r["uri"], r["external_id"], json.dumps(r["metadata"]))
        ]
        statement = (
            "INSERT INTO uploads (uri, external_id, status, enqueued_at, metadata, attempts) "
            f"VALUES {values}"
        )
        return statement, parameters

    def server_cpu_s(self) -> float | None:
        return None

    def send(self, prepared: tuple[str, list[Any]]) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._engine.raw_connection()
        cursor = connection.cursor()
        cursor.execute(*prepared)
        cursor.close()
        connection.commit()


def announced(redis_url: str, queue: str, *, accepted: int, timeout_s: float = 30) -> int:
    """How many uploads the screening messages on `queue` name, once they stop growing."""
    from moderation.worker.recovery import uploads_of_message

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    while True:
        named = {
            upload_id
            for raw in client.lrange(queue, 0, -1)
            for upload_id in uploads_of_message(json.loads(raw))
        }
        if len(named) >= accepted or time.monotonic() > deadline:
            return len(named)
        time.sleep(0.2)


def start_api(port: int, workers: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = ["api", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    return start_server([sys.executable, "-m", "moderation", *command], port, env)


def start_floor(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return start_server([sys.executable, str(ROOT / "bench/api_floor.py"), str(port)], port, env)


def start_server(command: list[str], port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError(process.stderr.read().decode() if process.stderr else "api died")
    process.kill()
    raise RuntimeError(f"{command} did not answer /healthz within 60 s")


def main() -> None:
    args = parse_args()
    database = os.environ.get("MODERATION_BENCH_DATABASE_URL", BENCH_DATABASE)
    redis_url = os.environ.get("MODERATION_BENCH_REDIS_URL", BENCH_REDIS)
    queue = f"bench-api-{uuid.uuid4().hex[:8]}"
    from moderation.config import Settings
    from moderation.runtime import Runtime

    prepare_database(database)
    # The bench's own side of the database (its key); the servers read theirs from `env`.
    runtime = Runtime(Settings(database_url=database, redis_url=redis_url, queue=queue))
    try:
        key = submitter_key(runtime)
    finally:
        runtime.close()
    port = free_port()
    env = {
        **os.environ,
        "MODERATION_DATABASE_URL": database,
        "MODERATION_REDIS_URL": redis_url,
        "MODERATION_QUEUE": queue,
        "MODERATION_ALLOWED_URI_PREFIXES": "https://",
        "MODERATION_API_KEY_CACHE": "false" if args.no_key_cache else "true",
    }
    api = start_api(port, args.api_workers, env)
    floor_port = free_port()
    floor = start_floor(floor_port, env) if args.api_workers == 1 else None
    uploads = Uploads()
    results: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "clients": args.clients,
        "api_workers": args.api_workers,
        "key_cache": not args.no_key_cache,
        "rounds": args.rounds,
        "batches": [],
    }
    try:
        # One API process: its CPU per request is read too (with several, uvicorn's
        # supervisor is the process started, and the workers its children).
        send_api = ApiSender(port, key, api if args.api_workers == 1 else None)
        send_floor = ApiSender(floor_port, key, floor)
        send_insert = InsertSender(database)
        uploads_through_api = 0
        for batch in BATCHES:
            requests = args.requests if batch == 1 else max(1, args.uploads // batch)
            uploads_through_api += (WARMUP + requests) * batch
            senders: dict[str, Sender] = {"plain": send_insert, "api": send_api}
            if floor is not None:
                senders["floor"] = send_floor
            measured = timed(senders, uploads, batch, requests, args.clients, args.rounds)
            plain, through_api = measured["plain"], measured["api"]
            ratio = through_api["uploads_per_s"] / plain["uploads_per_s"]
            row: dict[str, Any] = {
                "batch": batch,
                "api": through_api,
                "plain_insert": plain,
                "ratio": round(ratio, 3),
            }
            print(
                f"batch {batch:>3}: API {through_api['uploads_per_s']:>8.1f} uploads/s "
                f"(p50 {through_api['p50_ms']:.1f} ms, p99 {through_api['p99_ms']:.1f} ms)   "
                f"plain INSERT {plain['uploads_per_s']:>8.1f} rows/s "
                f"(p50 {plain['p50_ms']:.1f} ms, p99 {plain['p99_ms']:.1f} ms)   "
                f"ratio {ratio:.2f}"
            )
            if floor is not None:
                row["floor"] = measured["floor"]
                row["floor_ratio"] = round(
                    row["floor"]["uploads_per_s"] / plain["uploads_per_s"], 3
                )
                row["api_to_floor"] = round(
                    through_api["uploads_per_s"] / row["floor"]["uploads_per_s"], 3
                )
                target = FLOOR_TARGETS.get(batch)
                row["api_to_floor_target"] = target
                print(
                    f"           floor {row['floor']['uploads_per_s']:>8.1f} uploads/s "
                    f"(p50 {row['floor']['p50_ms']:.1f} ms)   ratio {row['floor_ratio']:.2f}   "
                    f"API / floor {row['api_to_floor']:.2f}"
                    + (f" (target >= {target})" if target else "")
                )
                cpu = (
                    through_api.get("server_cpu_ms_per_request"),
                    row["floor"].get("server_cpu_ms_per_request"),
                )
                if cpu[0] and cpu[1]:
                    row["floor_to_api_cpu"] = round(cpu[1] / cpu[0], 3)
                    print(
                        f"           server CPU per request: API {cpu[0]:.2f} ms, floor "
                        f"{cpu[1]:.2f} ms   floor / API {row['floor_to_api_cpu']:.2f}"
                    )
            results["batches"].append(row)
        results["announced"] = announced(redis_url, queue, accepted=uploads_through_api)
        print(f"screening messages name {results['announced']} of {uploads_through_api} uploads")
    finally:
        for server in (api, floor):
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
        redis.Redis.from_url(redis_url).delete(queue)
    if results["announced"] != uploads_through_api:
        raise SystemExit("the API accepted uploads that no screening message names")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
