"""A soak with faults: a fixed number of uploads, hostile ones mixed in, through the API, two
workers and the webhook sender, while a fault is injected every 30 s; then the same run
without faults, as the baseline.

    python bench/soak.py [--uploads 20000] [--fault-every 30] [--workers 2] [--hostile 0.05]

The run starts a PostgreSQL and a Redis of its own (the embedded servers of
`moderation services`, on free ports in a directory of its own), so that restarting them is
a fault of this run only. Faults, in turn: SIGKILL a worker (a new one is started), SIGKILL
one of a worker's intake processes, restart Redis empty, restart PostgreSQL, stall the
webhook receiver for 20 s. Uploads go in through `POST /v1/uploads` (batches of 50; the
hostile ones one at a time, since a batch is refused whole), each with an external id, so
a request retried after a fault never makes a second upload. Every screening hit writes a
webhook event (`MODERATION_WEBHOOK_ON_SCREENING_HIT`), delivered to a receiver in this
process that acts once per idempotency key.

It reports, for each run, as JSON:
- lost: uploads accepted and not final when the drain ended (must be 0);
- duplicate hits and signals (0), good uploads failed (0), hits missed;
- seconds from the last fault to the last upload final, against `--final-bound`;
- webhook events not delivered (0) and deliveries beyond one per event;
- every process's peak RSS against its budget (`--*-budget-mb`);
- throughput (uploads final per second, first request to last final), faulted against
  the run without faults.

The model is the tiny random CLIP: this measures the service's reliability, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

CACHE = Path.home() / ".cache" / "moderation"
# The hostile corpus and the test servers live with the tests; import them from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.webhook_receiver import Receiver  # noqa: E402 (needs the path above)

if TYPE_CHECKING:
    from moderation.runtime import Runtime

FAULTS = ("kill_worker", "kill_intake", "restart_redis", "restart_postgres", "stall_receiver")
BATCH = 50
# Faults stop once fewer than this share of the uploads is still open, so that the time
# from the last fault to the last upload final measures recovery, not the backlog.
FAULTS_UNTIL_OPEN = 0.1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hostile", type=float, default=0.05, help="Fraction of hostile input.")
    parser.add_argument(
        "--rate", type=float, help="Uploads per second submitted (default: as fast as the API "
        "takes them); about the workers' throughput keeps requests arriving through the faults.",
    )  # fmt: skip
    parser.add_argument("--fault-every", type=float, default=30.0, help="Seconds between faults.")
    parser.add_argument("--stall-s", type=float, default=20.0, help="How long a stall lasts.")
    parser.add_argument(
        "--final-bound", type=float, default=180.0, help="Seconds after the last fault by which "
        "every upload must be final (the sweeper's stuck_after_s, 30 here, and a backlog).",
    )  # fmt: skip
    parser.add_argument("--drain-timeout", type=float, default=1800.0)
    parser.add_argument("--worker-budget-mb", type=float, default=3072.0)
    parser.add_argument("--api-budget-mb", type=float, default=1024.0)
    parser.add_argument("--sender-budget-mb", type=float, default=512.0)
    parser.add_argument("--no-baseline", action="store_true", help="Skip the run without faults.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="moderation-soak-"))
    workdir.chmod(0o755)  # the embedded PostgreSQL runs as `nobody` under root
    pg_port, redis_port = free_port(), free_port()
    model = CACHE / "tiny-clip"
    os.environ.update(
        {
            "MODERATION_DATABASE_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/soak",
            "MODERATION_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "MODERATION_QUEUE": "screening-soak",
            "MODERATION_MODEL": str(model),
            "MODERATION_DEVICE": "cpu",
            "MODERATION_ALLOWED_URI_PREFIXES": f"{workdir.as_uri()}/,http://,https://",
            "MODERATION_FETCH_ALLOWED_NETWORKS": "127.0.0.1/32",
            "MODERATION_FETCH_TIMEOUT_S": "3",
            # Recovery on the scale of the run: a lost message is sent again after 30 s,
            # a dead worker's uploads after 10.
            "MODERATION_STUCK_AFTER_S": "30",
            "MODERATION_SWEEP_INTERVAL_S": "5",
            "MODERATION_WORKER_DEAD_AFTER_S": "10",
            "MODERATION_WORKER_HEARTBEAT_S": "2",
            "MODERATION_HUNG_AFTER_S": "120",
            "MODERATION_WEBHOOK_ON_SCREENING_HIT": "true",
            "MODERATION_WEBHOOK_SECRET": "soak-secret",
            "MODERATION_WEBHOOK_TIMEOUT_S": "5",
            "MODERATION_WEBHOOK_RETRY_BASE_S": "1",
            "MODERATION_WEBHOOK_RETRY_MAX_S": "10",
            "MODERATION_WEBHOOK_LEASE_S": "20",
            "MODERATION_WEBHOOK_POLL_S": "0.2",
        }
    )
    from moderation.config import Settings
    from moderation.embedding.tiny import write_tiny_clip
    from moderation.local_services import LocalPostgres, LocalRedis
    from moderation.runtime import Runtime
    from tests.hostile import forbidden_targets, make_corpus
    from tests.servers import http_server, image_handler
    from tests.webhook_receiver import running_receiver

    if not (model / "config.json").exists():
        write_tiny_clip(model)
    postgres = LocalPostgres(workdir / "postgres", pg_port)
    redis_server = LocalRedis(workdir / "redis", redis_port)
    receiver = StallableReceiver()
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        postgres.start()
        stack.callback(postgres.stop)
        redis_server.start()
        stack.callback(redis_server.stop)
        create_database(pg_port)
        stack.enter_context(running_receiver(receiver))
        os.environ["MODERATION_WEBHOOK_URL"] = receiver.url
        # Settings from the environment, complete now, which the run's processes inherit.
        runtime = Runtime(Settings())
        stack.callback(runtime.close)
        listener, redirector = stack.enter_context(forbidden_targets())
        slow_image = make_good_images(workdir / "slow", 1, first_seed=10_000)[0].read_bytes()
        slow_base = stack.enter_context(http_server(image_handler(slow_image, delay_s=2.0)))
        corpus = Corpus(
            good=make_good_images(workdir / "good", 200),
            hostile=make_corpus(workdir / "hostile", listener, redirector),
            slow_base=slow_base,
        )
        services = Services(postgres, redis_server, receiver)
        phases = [True] if args.no_baseline else [True, False]
        for faulted in phases:  # the faulted run first, then the baseline
            reset_database_and_broker(runtime)
            banked = add_bank(runtime, corpus.good[:20])
            phase_dir = workdir / ("faulted" if faulted else "baseline")
            run = run_phase(runtime, args, phase_dir, corpus, services, banked, faulted=faulted)
            results["with_faults" if faulted else "without_faults"] = run
            print(json.dumps(run, indent=2), flush=True)
    if "with_faults" in results and "without_faults" in results:
        results["throughput_ratio"] = round(
            results["with_faults"]["uploads_per_s"] / results["without_faults"]["uploads_per_s"],
            3,
        )
    results["uploads"] = args.uploads
    results["workers"] = args.workers
    results["machine"] = f"{platform.platform()}, {os.cpu_count()} CPUs"
    results["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    verdicts = [
        run["lost"] == 0
        and run["duplicate_hits"] == 0
        and run["duplicate_signals"] == 0
        and run["good_failed"] == 0
        and run["webhooks_undelivered"] == 0
        and run["final_within_bound"]
        and all(p["within_budget"] for p in run["peak_rss_mb"].values())
        for key, run in results.items()
        if key in ("with_faults", "without_faults")
    ]
    print(f"\n{'PASS' if all(verdicts) else 'FAIL'}; written to {args.out}")


def create_database(port: int) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(
        f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT"
    )
    with engine.connect() as conn:
        conn.execute(text("CREATE DATABASE soak"))
    engine.dispose()


def make_good_images(directory: Path, count: int, first_seed: int = 0) -> list[Path]:
    """Distinct photos-like JPEGs, one per seed from `first_seed`."""
    from moderation.demo.synthetic import textured

    directory.mkdir(parents=True)
    paths = []
    for seed in range(first_seed, first_seed + count):
        path = directory / f"{seed}.jpg"
        textured(seed, (640, 480)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def reset_database_and_broker(runtime: Runtime) -> None:
    import redis
    from sqlalchemy import text

    from moderation import schema

    # Connections from before a PostgreSQL restart (the previous run's fault) are dead.
    runtime.engine.dispose()
    schema.upgrade(runtime.settings.database_url)
    with runtime.engine.begin() as conn:
        conn.execute(
            text("TRUNCATE webhook_attempts, webhook_events, hits, signals, embeddings, uploads, "
                 "banks, workers CASCADE")
        )  # fmt: skip
    redis.Redis.from_url(runtime.settings.redis_url).flushdb()


def add_bank(runtime: Runtime, banked: list[Path]) -> set[str]:
    """A bank of the SHA-256 of some good images: the URIs that must hit, once each (as
    `bench/load.py` makes it; a script cannot import another here without mypy seeing one
    file under two module names)."""
    from moderation.banks import service as banks
    from moderation.images.hashing import sha256

    with runtime.session() as session:
        bank = banks.create_bank(session, "soak")
        entries = [banks.NewEntry(sha256=sha256(path.read_bytes())) for path in banked]
        banks.add_entries(session, bank, entries, added_by="bench")
    return {path.as_uri() for path in banked}


@dataclass
class Corpus:
    good: list[Path]
    hostile: list[Any]  # tests.hostile.Case
    slow_base: str  # a server that answers after 2 s (within the 3 s fetch deadline)


class StallableReceiver(Receiver):
    """The tests' webhook receiver (acts once per idempotency key), which a fault can stall:
    requests wait, unanswered, until it opens again."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()
        self.open.set()

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        self.open.wait()
        return super().handle(headers, body)

    def forget(self) -> None:
        with self.lock:
            self.requests.clear()
            self.effects.clear()


@dataclass
class Services:
    postgres: Any  # LocalPostgres
    redis: Any  # LocalRedis
    receiver: StallableReceiver


@dataclass
class Processes:
    """The run's API, workers and webhook sender, and the peak memory each reached."""

    workdir: Path
    api_port: int
    workers: list[Any] = field(default_factory=list)  # WorkerProcess
    api: subprocess.Popen[bytes] | None = None
    sender: subprocess.Popen[bytes] | None = None
    peaks_kb: dict[str, int] = field(default_factory=dict)
    _started: int = 0

    def start_worker(self) -> None:
        from moderation.worker.child import WorkerProcess

        self._started += 1
        log = self.workdir / f"worker-{self._started}.log"
        self.workers.append(WorkerProcess(log).wait_ready())

    def sample_memory(self) -> None:
        """Each role's current RSS, kept when above its peak so far: a worker with its
        intake processes and forkserver (summed), the API, the sender."""
        from moderation.worker.child import process_tree

        current: dict[str, int] = {}
        for n, worker in enumerate(self.workers):
            if worker.process.poll() is None:
                current[f"worker-{n + 1}"] = sum(
                    rss_kb(p) for p in process_tree(worker.process.pid)
                )
        for role, process in (("api", self.api), ("sender", self.sender)):
            if process is not None and process.poll() is None:
                current[role] = rss_kb(process.pid)
        for role, kb in current.items():
            self.peaks_kb[role] = max(self.peaks_kb.get(role, 0), kb)


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@contextmanager
def running(workdir: Path, workers: int) -> Iterator[Processes]:
    workdir.mkdir(parents=True)
    processes = Processes(workdir, free_port())
    python = [sys.executable, "-m", "moderation"]
    logs = [(workdir / name).open("wb") for name in ("api.log", "sender.log")]
    try:
        processes.api = subprocess.Popen(
            [*python, "api", "--host", "127.0.0.1", "--port", str(processes.api_port)],
            stdout=logs[0],
            stderr=subprocess.STDOUT,
        )
        processes.sender = subprocess.Popen(
            [*python, "webhooks", "send"], stdout=logs[1], stderr=subprocess.STDOUT
        )
        for _ in range(workers):
            processes.start_worker()
        wait_for_api(processes)
        yield processes
    finally:
        for worker in processes.workers:
            worker.stop()
        for process in (processes.api, processes.sender):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        for log in logs:
            log.close()


def wait_for_api(processes: Processes, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{processes.api_port}/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the API did not start; see {processes.workdir / 'api.log'}")


def submitter_key(runtime: Runtime) -> str:
    from moderation.auth import service as auth
    from moderation.auth.models import Role

    with runtime.session() as session:
        _, secret = auth.create_key(session, role=Role.SUBMITTER, name="soak", actor="bench")
    return secret


@dataclass
class Submitted:
    kinds: dict[int, str] = field(default_factory=dict)  # upload id -> good / banked / case
    refused: dict[str, int] = field(default_factory=dict)
    retried_requests: int = 0
    started: float = 0.0
    finished: float = 0.0


def submit_all(runtime: Runtime, args: argparse.Namespace, corpus: Corpus, banked: set[str],
               port: int, done: threading.Event) -> Submitted:  # fmt: skip
    """Every upload through the API, each request retried until answered: a fault makes
    requests fail (503, reset connections) and the same external ids make retries harmless."""
    import httpx

    rng = random.Random(0)
    key = submitter_key(runtime)
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    submitted = Submitted(started=time.monotonic())

    def post(events: list[dict[str, Any]]) -> httpx.Response:
        while True:
            try:
                answer = client.post("/v1/uploads", json={"uploads": events})
            except httpx.HTTPError:
                answer = None
            if answer is not None and answer.status_code < 500:
                return answer
            submitted.retried_requests += 1
            time.sleep(0.5)

    batch: list[tuple[dict[str, Any], str]] = []

    def flush() -> None:
        if not batch:
            return
        answer = post([event for event, _ in batch])
        answer.raise_for_status()
        for accepted, (_, kind) in zip(answer.json()["uploads"], batch, strict=True):
            submitted.kinds[accepted["upload_id"]] = kind
        batch.clear()

    for n in range(args.uploads):
        if args.rate:
            time.sleep(max(0.0, submitted.started + n / args.rate - time.monotonic()))
        external_id = f"soak-{os.getpid()}-{id(submitted)}-{n}"
        draw = rng.random()
        if draw < args.hostile / 2:
            case = rng.choice(corpus.hostile)
            event: dict[str, Any] = {"uri": case.uri, "external_id": external_id}
            if case.declared_sha256 is not None:
                event["sha256"] = case.declared_sha256.hex()
            answer = post([event])
            if answer.status_code == 202:
                submitted.kinds[answer.json()["uploads"][0]["upload_id"]] = f"hostile:{case.code}"
            else:
                code = answer.json().get("code", str(answer.status_code))
                submitted.refused[code] = submitted.refused.get(code, 0) + 1
            continue
        if draw < args.hostile:
            uri, kind = f"{corpus.slow_base}/{n}.jpg", "slow"
        else:
            path = rng.choice(corpus.good)
            uri = path.as_uri()
            kind = "banked" if uri in banked else "good"
        batch.append(({"uri": uri, "external_id": external_id}, kind))
        if len(batch) == BATCH:
            flush()
    flush()
    submitted.finished = time.monotonic()
    done.set()
    return submitted


def inject_faults(runtime: Runtime, args: argparse.Namespace, processes: Processes,
                  services: Services, done: threading.Event,
                  log: list[tuple[float, str]]) -> None:  # fmt: skip
    """A fault every `fault_every` seconds, in turn, until `done` (set once the submissions
    are in and less than `FAULTS_UNTIL_OPEN` of them is still open)."""
    import redis

    from moderation.worker.child import children_by_parent

    for turn in range(10**6):
        if done.wait(args.fault_every):
            return
        fault = FAULTS[turn % len(FAULTS)]
        at = time.monotonic()
        if fault == "kill_worker":
            victim = processes.workers.pop(0)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            victim.stop()
            processes.start_worker()
        elif fault == "kill_intake":
            children = children_by_parent()
            intake = [
                grandchild
                for worker in processes.workers
                for child in children.get(worker.process.pid, [])
                if "forkserver" in Path(f"/proc/{child}/cmdline").read_text(errors="replace")
                for grandchild in children.get(child, [])
            ]
            if intake:
                os.kill(random.Random(turn).choice(intake), signal.SIGKILL)
        elif fault == "restart_redis":
            services.redis.stop()
            services.redis.start()
            assert redis.Redis.from_url(runtime.settings.redis_url).dbsize() == 0
        elif fault == "restart_postgres":
            services.postgres.stop()
            services.postgres.start()
        elif fault == "stall_receiver":
            services.receiver.open.clear()
            threading.Timer(args.stall_s, services.receiver.open.set).start()
        log.append((at, fault))
        print(f"{time.strftime('%H:%M:%S')} fault: {fault}", flush=True)


def run_phase(runtime: Runtime, args: argparse.Namespace, workdir: Path, corpus: Corpus,
              services: Services, banked: set[str], *,
              faulted: bool) -> dict[str, Any]:  # fmt: skip
    services.receiver.forget()
    submissions_done = threading.Event()
    faults_done = threading.Event()
    faults: list[tuple[float, str]] = []
    with running(workdir, args.workers) as processes:
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.5):
                processes.sample_memory()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        injector = None
        if faulted:
            injector = threading.Thread(
                target=inject_faults,
                args=(runtime, args, processes, services, faults_done, faults),
                daemon=True,
            )
            injector.start()
        label = "with faults" if faulted else "without faults"
        print(f"{time.strftime('%H:%M:%S')} {label}: submitting {args.uploads}", flush=True)
        submitted = submit_all(runtime, args, corpus, banked, processes.api_port, submissions_done)
        ids = list(submitted.kinds)
        print(f"{time.strftime('%H:%M:%S')} {label}: {len(ids)} accepted; draining", flush=True)
        last_final = wait_final(
            runtime, ids, args.drain_timeout, faults_done, len(ids) * FAULTS_UNTIL_OPEN
        )
        faults_done.set()
        if injector is not None:
            injector.join()
        undelivered = wait_webhooks(runtime, timeout_s=300)
        sampling.set()
        sampler.join()
        peaks = dict(processes.peaks_kb)
    return report(
        runtime, args, submitted, banked, faults, last_final, undelivered, peaks, services
    )


def wait_final(
    runtime: Runtime,
    upload_ids: list[int],
    timeout_s: float,
    nearly: threading.Event,
    nearly_open: float,
) -> float | None:
    """When the last of the uploads became final (monotonic), or None at the timeout; sets
    `nearly` once at most `nearly_open` of them are open."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import OperationalError

    from moderation.screening.models import Upload, UploadStatus

    final = (UploadStatus.SCREENED, UploadStatus.FAILED)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with runtime.session() as session:
                open_count = session.scalar(
                    select(func.count()).where(
                        Upload.id.in_(upload_ids), Upload.status.not_in(final)
                    )
                )
        except OperationalError:  # PostgreSQL restarting: a fault of the run
            open_count = None
        if open_count is not None and open_count <= nearly_open:
            nearly.set()
        if open_count == 0:
            return time.monotonic()
        time.sleep(1.0)
    return None


def wait_webhooks(runtime: Runtime, timeout_s: float) -> int:
    """Webhook events not delivered when the wait ended."""
    from moderation.webhooks import service as webhooks
    from moderation.webhooks.models import DeliveryStatus

    deadline = time.monotonic() + timeout_s
    while True:
        with runtime.session() as session:
            counts = webhooks.count_by_status(session)
        pending = sum(n for status, n in counts.items() if status is not DeliveryStatus.DELIVERED)
        if pending == 0 or time.monotonic() > deadline:
            return pending
        time.sleep(1.0)


def report(runtime: Runtime, args: argparse.Namespace, submitted: Submitted, banked: set[str],
           faults: list[tuple[float, str]], last_final: float | None, undelivered: int,
           peaks_kb: dict[str, int], services: Services) -> dict[str, Any]:  # fmt: skip
    from sqlalchemy import func, select, text

    from moderation.review.models import Hit
    from moderation.screening.models import Upload, UploadStatus
    from moderation.webhooks.models import WebhookEvent

    ids = list(submitted.kinds)
    with runtime.session() as session:
        rows = session.execute(
            select(Upload.id, Upload.status, Upload.error_code).where(Upload.id.in_(ids))
        ).all()
        statuses = {upload_id: status for upload_id, status, _ in rows}
        codes = {upload_id: code for upload_id, _, code in rows}
        hits: dict[int, int] = {
            upload_id: count
            for upload_id, count in session.execute(
                select(Hit.upload_id, func.count())
                .where(Hit.upload_id.in_(ids))
                .group_by(Hit.upload_id)
            )
        }
        duplicate_signals = session.scalar(
            text("SELECT count(*) FROM (SELECT 1 FROM signals GROUP BY upload_id, signal, "
                 "frame_index HAVING count(*) > 1) AS repeated")
        )  # fmt: skip
        events = session.scalar(select(func.count(WebhookEvent.id)))
    final = (UploadStatus.SCREENED, UploadStatus.FAILED)
    good = [i for i, kind in submitted.kinds.items() if kind in ("good", "banked", "slow")]
    failed_by_code: dict[str, int] = {}
    for upload_id, status in statuses.items():
        if status is UploadStatus.FAILED:
            code = codes.get(upload_id) or "unknown"
            failed_by_code[code] = failed_by_code.get(code, 0) + 1
    expected = {i: int(submitted.kinds[i] == "banked") for i in good}
    keys = services.receiver.keys_requested()
    last_fault = max((at for at, _ in faults), default=submitted.finished)
    after_last_fault = None if last_final is None else last_final - last_fault
    budgets = {"worker": args.worker_budget_mb, "api": args.api_budget_mb,
               "sender": args.sender_budget_mb}  # fmt: skip
    elapsed = (last_final or time.monotonic()) - submitted.started
    return {
        "accepted": len(ids),
        "refused_at_submission": submitted.refused,
        "requests_retried": submitted.retried_requests,
        "faults": [fault for _, fault in faults],
        "screened": sum(status is UploadStatus.SCREENED for status in statuses.values()),
        "failed_by_code": failed_by_code,
        "lost": sum(statuses.get(i) not in final for i in ids),
        "duplicate_hits": sum(max(0, hits.get(i, 0) - want) for i, want in expected.items()),
        "missed_hits": sum(max(0, want - hits.get(i, 0)) for i, want in expected.items()),
        "duplicate_signals": duplicate_signals,
        "good_failed": sum(statuses.get(i) is UploadStatus.FAILED for i in good),
        # Without faults: from the last request to the last upload final (the backlog).
        "final_after_last_fault_s": after_last_fault and round(after_last_fault, 1),
        "final_within_bound": after_last_fault is not None
        and (not faults or after_last_fault <= args.final_bound),
        "webhook_events": events,
        "webhooks_undelivered": undelivered,
        "webhook_requests_beyond_one_per_event": len(keys) - len(set(keys)),
        "webhook_effects": len(services.receiver.effects),
        "peak_rss_mb": {
            role: {
                "peak": round(kb / 1024, 1),
                "budget": budgets[role.split("-")[0]],
                "within_budget": kb / 1024 <= budgets[role.split("-")[0]],
            }
            for role, kb in sorted(peaks_kb.items())
        },
        "seconds": round(elapsed, 1),
        "uploads_per_s": round(len(ids) / elapsed, 1),
    }


if __name__ == "__main__":
    main()
