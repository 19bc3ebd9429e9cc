"""Load with hostile input: a fixed rate of submissions for a bounded time, two workers.

    python bench/load.py [--rate 20] [--duration 120] [--workers 2] [--hostile 0.1]

Uploads go in through `submit_uris`, the producer path of `moderation submit` (and of the
API): rows committed, then messages. A tenth of them (by default) are hostile, drawn from
the corpus in `tests/hostile.py`; those whose URI the fetch policy refuses are refused at
submission and never become uploads. After the submissions stop, the run waits for every
accepted upload to reach a final state, then reports, as JSON:

- accepted, refused at submission, screened, failed by code;
- lost: accepted but not final when the drain timed out (must be 0);
- duplicate hits (must be 0) and good uploads failed (must be 0);
- p50/p99 seconds from acceptance to final state, on the database's clock;
- peak queue depth, sampled; each worker's peak RSS;
- the baseline, measured in the same run: the producer alone, committing and publishing
  the same number of rows with no worker, in submissions per second.

The model is the tiny random CLIP by default (this measures the service's reliability
under load, not the model): `--model DIR` for another checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moderation.runtime import Runtime

LOAD_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation_load"
LOAD_REDIS = "redis://127.0.0.1:6379/10"
CACHE = Path.home() / ".cache" / "moderation"
# The hostile corpus lives with the tests; run from anywhere, import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=20.0, help="Submissions per second.")
    parser.add_argument("--duration", type=float, default=120.0, help="Seconds of submitting.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hostile", type=float, default=0.1, help="Fraction of hostile input.")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--model", type=Path, help="A CLIP checkpoint (default: the tiny one).")
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="moderation-load-"))
    model = args.model or CACHE / "tiny-clip"
    os.environ.update(
        {
            "MODERATION_DATABASE_URL": os.environ.get(
                "MODERATION_LOAD_DATABASE_URL", LOAD_DATABASE
            ),
            "MODERATION_REDIS_URL": os.environ.get("MODERATION_LOAD_REDIS_URL", LOAD_REDIS),
            "MODERATION_QUEUE": "screening-load",
            "MODERATION_MODEL": str(model),
            "MODERATION_DEVICE": "cpu",
            # The run's files, and the redirecting server on 127.0.0.1; 127.0.0.2 (the
            # corpus's forbidden listener) stays refused.
            "MODERATION_ALLOWED_URI_PREFIXES": f"{workdir.as_uri()}/,http://,https://",
            "MODERATION_FETCH_ALLOWED_NETWORKS": "127.0.0.1/32",
            "MODERATION_FETCH_TIMEOUT_S": "3",
        }
    )
    from moderation.config import Settings
    from moderation.embedding.tiny import write_tiny_clip
    from moderation.runtime import Runtime
    from tests.hostile import forbidden_targets, make_corpus

    # The run's settings, as set above; the workers read the same from their environment.
    runtime = Runtime(Settings())

    if args.model is None and not (model / "config.json").exists():
        write_tiny_clip(model)
    good = make_good_images(workdir / "good", count=200)
    try:
        with forbidden_targets() as (listener, redirector):
            hostile = make_corpus(workdir / "hostile", listener, redirector)
            reset_database_and_broker(runtime)
            banked = add_bank(runtime, good[:20])
            baseline = producer_alone(runtime, good, int(args.rate * args.duration))
            reset_database_and_broker(runtime, keep_bank=True)
            run = run_load(runtime, args, workdir, good, hostile)
            forbidden_connections = listener.connections_so_far()
        results = report(runtime, run, banked, baseline, args, forbidden_connections)
    finally:
        runtime.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    verdict = all(results[key] == 0 for key in ("lost", "duplicate_hits", "good_failed"))
    print(
        f"\nlost {results['lost']}, duplicate hits {results['duplicate_hits']}, good uploads "
        f"failed {results['good_failed']}: {'PASS' if verdict else 'FAIL'}"
    )
    print(f"written to {args.out}")


def make_good_images(directory: Path, count: int) -> list[Path]:
    from moderation.demo.synthetic import textured

    directory.mkdir(parents=True)
    paths = []
    for seed in range(count):
        path = directory / f"{seed}.jpg"
        textured(seed, (640, 480)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def reset_database_and_broker(runtime: Runtime, keep_bank: bool = False) -> None:
    import redis
    from sqlalchemy import text

    from moderation import schema

    schema.upgrade(runtime.settings.database_url)
    tables = "hits, signals, embeddings, uploads" + ("" if keep_bank else ", banks")
    with runtime.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} CASCADE"))
    redis.Redis.from_url(runtime.settings.redis_url).flushdb()


def add_bank(runtime: Runtime, banked: list[Path]) -> set[str]:
    """A bank of the SHA-256 of some good images: the URIs that must hit, once each."""
    from moderation.banks import service as banks
    from moderation.images.hashing import sha256

    with runtime.session() as session:
        bank = banks.create_bank(session, "load")
        banks.add_entries(
            session,
            bank,
            [banks.NewEntry(sha256=sha256(path.read_bytes())) for path in banked],
            added_by="bench",
        )
    return {path.as_uri() for path in banked}


def producer_alone(runtime: Runtime, good: list[Path], count: int) -> float:
    """Submissions per second of the producer alone (one at a time, no worker): the
    ceiling of any submission rate this run can ask for."""
    from moderation.screening.cli import submit_uris

    uris = [good[i % len(good)].as_uri() for i in range(min(count, 500))]
    started = time.perf_counter()
    for uri in uris:
        submit_uris(runtime, [uri])
    return len(uris) / (time.perf_counter() - started)


def run_load(
    runtime: Runtime, args: argparse.Namespace, workdir: Path, good: list[Path], hostile: list[Any]
) -> dict[str, Any]:
    import redis

    from moderation.images.errors import IntakeError
    from moderation.screening.cli import submit_uris, wait_until_final
    from moderation.worker.child import WorkerProcess

    settings = runtime.settings
    broker = redis.Redis.from_url(settings.redis_url)
    rng = random.Random(0)
    accepted: dict[int, str] = {}  # upload id -> kind ("good", "banked" or the case name)
    refused: dict[str, int] = {}
    queue_depths: list[int] = []
    stop_sampling = threading.Event()

    def sample_queue() -> None:
        while not stop_sampling.wait(0.5):
            queue_depths.append(int(broker.llen(settings.queue)))

    workers = [WorkerProcess(workdir / f"worker-{n}.log").wait_ready() for n in range(args.workers)]
    sampler = threading.Thread(target=sample_queue, daemon=True)
    sampler.start()
    try:
        total = int(args.rate * args.duration)
        started = time.monotonic()
        for n in range(total):
            time.sleep(max(0.0, started + n / args.rate - time.monotonic()))
            if rng.random() < args.hostile:
                case = rng.choice(hostile)
                try:
                    (upload_id,) = submit_uris(
                        runtime, [case.uri], declared_sha256=case.declared_sha256
                    )
                except IntakeError as error:
                    refused[error.code] = refused.get(error.code, 0) + 1
                    continue
                accepted[upload_id] = f"hostile: {case.name}"
            else:
                path = rng.choice(good)
                (upload_id,) = submit_uris(runtime, [path.as_uri()])
                accepted[upload_id] = path.as_uri()
        submit_seconds = time.monotonic() - started
        uploads = wait_until_final(runtime, list(accepted), timeout_s=args.drain_timeout)
        peak_rss_mb = [peak_rss(w.process.pid) for w in workers]
    finally:
        stop_sampling.set()
        for worker in workers:
            worker.stop()
    return {
        "accepted": accepted,
        "refused": refused,
        "uploads": uploads,
        "submit_seconds": submit_seconds,
        "peak_queue_depth": max(queue_depths, default=0),
        "worker_peak_rss_mb": peak_rss_mb,
    }


def peak_rss(pid: int) -> float:
    """A worker's peak RSS with its intake processes: each process's own peak, added up
    (an upper bound on their peak together)."""
    from moderation.worker.child import process_tree

    total_kb = 0
    for member in process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total_kb += int(line.split()[1])
    return round(total_kb / 1024, 1)


def report(
    runtime: Runtime,
    run: dict[str, Any],
    banked: set[str],
    baseline: float,
    args: argparse.Namespace,
    forbidden_connections: int,
) -> dict[str, Any]:
    from sqlalchemy import func, select

    from moderation.review.models import Hit
    from moderation.screening.models import Upload, UploadStatus

    accepted: dict[int, str] = run["accepted"]
    uploads = run["uploads"]
    failed_by_code: dict[str, int] = {}
    for upload in uploads:
        if upload.status is UploadStatus.FAILED:
            code = upload.error_code or "unknown"
            failed_by_code[code] = failed_by_code.get(code, 0) + 1
    good = [u for u in uploads if not accepted[u.id].startswith("hostile:")]
    with runtime.session() as session:
        hits = dict(
            session.execute(
                select(Hit.upload_id, func.count())
                .where(Hit.upload_id.in_(list(accepted)))
                .group_by(Hit.upload_id)
            ).all()
        )
        latencies = [
            float(seconds)
            for (seconds,) in session.execute(
                select(func.extract("epoch", Upload.finished_at - Upload.created_at)).where(
                    Upload.id.in_(list(accepted)), Upload.finished_at.is_not(None)
                )
            )
        ]
    # A banked image hits once (its SHA-256 entry); anything else must not hit at all.
    expected_hits = {u.id: int(accepted[u.id] in banked) for u in good}
    duplicate_hits = sum(max(0, hits.get(i, 0) - want) for i, want in expected_hits.items())
    missed_hits = sum(max(0, want - hits.get(i, 0)) for i, want in expected_hits.items())
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "submit_seconds": round(run["submit_seconds"], 1),
        "workers": args.workers,
        "hostile_fraction": args.hostile,
        "accepted": len(accepted),
        "refused_at_submission": run["refused"],
        "screened": sum(u.status is UploadStatus.SCREENED for u in uploads),
        "failed_by_code": failed_by_code,
        "lost": sum(u.status not in (UploadStatus.SCREENED, UploadStatus.FAILED) for u in uploads)
        + (len(accepted) - len(uploads)),
        "duplicate_hits": duplicate_hits,
        "missed_hits": missed_hits,
        "good_failed": sum(u.status is UploadStatus.FAILED for u in good),
        "redeliveries": sum(max(0, u.attempts - 1) for u in uploads),
        "forbidden_connections": forbidden_connections,
        "accept_to_final_s": {
            "p50": round(quantiles[49], 3),
            "p99": round(quantiles[98], 3),
            "max": round(max(latencies, default=0.0), 3),
        },
        "peak_queue_depth": run["peak_queue_depth"],
        "worker_peak_rss_mb": run["worker_peak_rss_mb"],
        "baseline_producer_alone_per_s": round(baseline, 1),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


if __name__ == "__main__":
    main()
