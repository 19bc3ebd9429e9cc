"""Screening throughput: the whole pipeline against the model alone, in the same run.

    python bench/screening.py [--images N] [--arch vit-b-32] [--batch-size B]

Pipeline: N images submitted as the CLI does (rows committed, then messages) → Redis → a
real `moderation worker` process → PostgreSQL, timed on the database's clock from just
before the first submit to the last upload's screening transaction. Model only: the same
images, preprocessed beforehand, through the same model in batches of the same size, with
nothing else running. The model is a full-size CLIP architecture with random weights
(speed does not depend on the weights), loaded through MODERATION_MODEL like any
checkpoint. Intake only: the same images, fetch to preprocessed crop, through the worker's
intake processes and nothing else (the ceiling the rest of the pipeline is held to when
the model costs little, as with `--arch tiny`). The worker's log gives each stage's wait
per upload and each batched stage's busy share. The figures are printed and written as
JSON.

On a machine whose cores the model shares with everything else (a CPU worker), the JSON
also says where the CPU went during the pipeline run, per image: the worker, PostgreSQL,
Redis, this process (the producer) and idle time, beside the model alone's cost.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moderation.config import Settings
    from moderation.runtime import Runtime

BENCH_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation_bench"
BENCH_REDIS = "redis://127.0.0.1:6379/14"
CACHE = Path.home() / ".cache" / "moderation"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, help="Timed images (default: 1000 on CPU, 3000 on CUDA)."
    )
    parser.add_argument(
        "--arch", help="Random architecture (default: vit-b-32 on CPU, vit-l-14-336 on CUDA)."
    )
    parser.add_argument(
        "--batch-size", type=int, help="Images per forward pass (default: the service's)."
    )
    parser.add_argument("--bank-size", type=int, default=10_000, help="Random entries in the bank.")
    parser.add_argument(
        "--image-size",
        type=_size,
        default=(640, 480),
        help="WIDTHxHEIGHT of the JPEGs (default 640x480; a phone photo is 4032x3024).",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/screening.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    cuda = torch.cuda.is_available()
    arch = args.arch or ("vit-l-14-336" if cuda else "vit-b-32")
    n_images = args.images or (3000 if cuda else 1000)
    model_dir = Path(os.environ.get("MODERATION_MODEL") or CACHE / f"random-{arch}")
    # The runtime built below and the worker's process read their settings from it.
    os.environ.update(
        {
            "MODERATION_DATABASE_URL": os.environ.get(
                "MODERATION_BENCH_DATABASE_URL", BENCH_DATABASE
            ),
            "MODERATION_REDIS_URL": os.environ.get("MODERATION_BENCH_REDIS_URL", BENCH_REDIS),
            "MODERATION_QUEUE": "screening-bench",
            "MODERATION_MODEL": str(model_dir),
            # The benchmark's images are written under the temporary directory.
            "MODERATION_ALLOWED_URI_PREFIXES": f"{Path(tempfile.gettempdir()).resolve().as_uri()}/",
            **({"MODERATION_BATCH_SIZE": str(args.batch_size)} if args.batch_size else {}),
        }
    )
    from moderation.config import Settings
    from moderation.embedding.tiny import write_random_clip
    from moderation.runtime import Runtime

    if not (model_dir / "config.json").exists():
        print(f"writing a random {arch} checkpoint to {model_dir} ...")
        write_random_clip(model_dir, arch)
    # Settings from the environment just set, which the worker's process inherits too.
    runtime = Runtime(Settings())
    settings = runtime.settings
    batch = settings.resolved_batch_size()

    with tempfile.TemporaryDirectory(prefix="moderation-bench-") as tmp:
        workdir = Path(tmp)
        warmup = make_images(
            workdir / "warmup", range(1_000_000, 1_000_000 + 4 * batch), args.image_size
        )
        timed = make_images(workdir / "timed", range(n_images), args.image_size)
        prepare_database_and_bank(runtime, timed[:10], args.bank_size)

        model_before = model_only(settings, timed, batch)
        intake_ips = intake_only(settings, timed)
        pipeline = run_pipeline(runtime, workdir, warmup, timed)
        model_after = model_only(settings, timed, batch)
        cpu_work = per_image_cpu_work(settings, timed[:50])
    runtime.close()

    model_ips = statistics.mean([model_before, model_after])
    results: dict[str, Any] = {
        "pipeline_images_per_s": round(pipeline["images_per_s"], 2),
        "model_only_images_per_s": round(model_ips, 2),
        "ratio": round(pipeline["images_per_s"] / model_ips, 3),
        "model_only_runs_images_per_s": [round(model_before, 2), round(model_after, 2)],
        # Fetch to preprocessed crop alone, with the worker's intake processes.
        "intake_only_images_per_s": round(intake_ips, 2),
        "ratio_to_intake_only": round(pipeline["images_per_s"] / intake_ips, 3),
        "intake_processes": settings.resolved_intake_processes(),
        "intake_jobs_per_process": settings.intake_jobs_per_process,
        # Wall ms per upload in each stage, as task threads waited on it (worker's log),
        # and the share of the run each batched stage was busy (the model: embedding).
        "stage_ms_per_upload": pipeline["stage_ms_per_upload"],
        "busy": pipeline["busy"],
        "images": n_images,
        "image_size": "x".join(map(str, args.image_size)),
        "batch_size": batch,
        "inference_streams": settings.resolved_streams(),
        "mean_batch": pipeline["mean_batch"],
        "cpu_ms_per_image": {
            "model_only": round(1000 * (os.cpu_count() or 1) / model_ips, 2),
            **pipeline["cpu_ms_per_image"],
        }
        if not cuda
        else None,
        "hits": pipeline["hits"],
        "bank_size": args.bank_size,
        "architecture": arch,
        "model": str(model_dir),
        "device": settings.resolved_device(),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "intake_ms_per_image_single_thread": cpu_work,
        "machine": platform.platform(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(
        f"\npipeline {results['pipeline_images_per_s']} img/s vs model alone "
        f"{results['model_only_images_per_s']} img/s: ratio {results['ratio']} (target >= 0.9)"
    )
    print(
        f"pipeline {results['pipeline_images_per_s']} img/s vs intake alone "
        f"{results['intake_only_images_per_s']} img/s: ratio {results['ratio_to_intake_only']}"
    )
    print(f"written to {args.out}")


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def make_images(directory: Path, seeds: range, size: tuple[int, int]) -> list[Path]:
    """Distinct JPEGs (smooth synthetic textures, which decode faster than photos)."""
    from moderation.demo.synthetic import textured

    directory.mkdir(parents=True)
    paths = []
    for seed in seeds:
        path = directory / f"{seed}.jpg"
        textured(seed, size).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def prepare_database_and_bank(runtime: Runtime, banked: list[Path], bank_size: int) -> None:
    """A fresh schema and one bank: random embeddings and PDQ hashes, and the SHA-256 and PDQ
    of a few of the timed images (so some uploads hit)."""
    import numpy as np
    from sqlalchemy import text

    from moderation import schema
    from moderation.banks import service as banks
    from moderation.embedding.clip import ClipEmbedder
    from moderation.embedding.service import get_or_create_model, normalise
    from moderation.images.decode import DecodeLimits
    from moderation.images.signals import extract_signals

    settings = runtime.settings
    schema.upgrade(settings.database_url)
    with runtime.engine.begin() as conn:
        conn.execute(text("TRUNCATE hits, signals, embeddings, uploads, banks CASCADE"))
        # The worker computes the registry's models: retire them all, so that it seeds the
        # configured one (MODERATION_MODEL) as the active model of this run.
        conn.execute(text("UPDATE embedding_models SET state = 'retired'"))
    embedder = ClipEmbedder(settings.resolved_model(), "cpu")
    rng = np.random.default_rng(0)
    with runtime.session() as session:
        model = get_or_create_model(session, embedder.name, embedder.dim)
        bank = banks.create_bank(session, "bench")
        # By COPY, a block at a time: a million entries take minutes, not an object each.
        for start in range(0, bank_size, 100_000):
            count = min(100_000, bank_size - start)
            banks.copy_entries(
                session,
                bank,
                model=model,
                vectors=normalise(rng.standard_normal((count, embedder.dim), dtype=np.float32)),
                pdq=rng.integers(0, 256, (count, 32), dtype=np.uint8),
                added_by="bench",
            )
        limits = DecodeLimits.from_settings(settings)
        image_entries = []
        for path in banked:
            signals = extract_signals(path.read_bytes(), limits, embedder.preprocess)
            # Hashes only: with random weights every image is within 0.05 of every other, and
            # CLIP entries would give each upload a hit per banked image.
            first = signals.frames[0]
            image_entries.append(banks.NewEntry(sha256=signals.sha256, pdq=first.pdq))
        banks.add_entries(session, bank, image_entries, added_by="bench")


def run_pipeline(
    runtime: Runtime, workdir: Path, warmup: list[Path], timed: list[Path]
) -> dict[str, Any]:
    import redis
    from sqlalchemy import func, select

    from moderation.review.models import Hit
    from moderation.screening.cli import submit_uris, wait_until_final
    from moderation.screening.models import UploadStatus
    from moderation.worker.child import WorkerProcess

    redis.Redis.from_url(runtime.settings.redis_url).flushdb()
    with WorkerProcess(workdir / "worker.log") as worker:
        worker.wait_ready()
        wait_until_final(runtime, submit_uris(runtime, [p.as_uri() for p in warmup]), timeout_s=600)
        cpu_before = CpuTimes.now(worker.process.pid)
        with runtime.session() as session:
            started_at = session.scalar(select(func.clock_timestamp()))
        upload_ids = submit_uris(runtime, [p.as_uri() for p in timed])
        uploads = wait_until_final(runtime, upload_ids, timeout_s=3600)
        cpu_used = CpuTimes.now(worker.process.pid) - cpu_before
        worker.stop()
        log = worker.log()
    not_screened = [u.id for u in uploads if u.status is not UploadStatus.SCREENED]
    if not_screened:
        raise SystemExit(
            f"{len(not_screened)} uploads were not screened; see {workdir / 'worker.log'}"
        )
    finished = [u.finished_at for u in uploads if u.finished_at is not None]
    if started_at is None or len(finished) != len(uploads):
        raise SystemExit("the database did not record when screening started and finished")
    elapsed = (max(finished) - started_at).total_seconds()
    with runtime.session() as session:
        hits = session.scalar(select(func.count(Hit.id)).where(Hit.upload_id.in_(upload_ids)))
    # Model stages are named per model lane (`embedding-<model id>`); the one lane's.
    batches = {
        stage: re.search(
            rf"{stage}(?:-\d+)?: (\d+) items in (\d+) batches \(mean [\d.]+\), busy (\d+)%", log
        )
        for stage in ("embedding", "clip-search", "claim-writer", "result-writer")
    }
    stage_times = re.search(r"stage ms per upload: (\{.*\})", log)
    return {
        "stage_ms_per_upload": ast.literal_eval(stage_times[1]) if stage_times else None,
        "busy": {stage: int(found[3]) / 100 if found else None for stage, found in batches.items()},
        "images_per_s": len(timed) / elapsed,
        "hits": hits,
        "mean_batch": {
            stage: round(int(found[1]) / int(found[2]), 1) if found else None
            for stage, found in batches.items()
        },
        "cpu_ms_per_image": cpu_used.per_image_ms(len(timed), elapsed),
    }


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds used so far by the processes of the pipeline (Linux /proc), by role."""

    worker: float
    postgres: float
    redis: float
    producer: float
    wall: float

    @classmethod
    def now(cls, worker_pid: int) -> CpuTimes:
        postgres = redis = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text()
            except OSError:  # the process has exited
                continue
            name = fields[fields.index("(") + 1 : fields.rindex(")")]
            if name == "postgres":
                postgres += _cpu_seconds(fields)
            elif name.startswith("redis-server"):
                redis += _cpu_seconds(fields)
        worker = _cpu_seconds(Path(f"/proc/{worker_pid}/stat").read_text())
        return cls(worker, postgres, redis, time.process_time(), time.monotonic())

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(*(getattr(self, f) - getattr(other, f) for f in self.__dataclass_fields__))

    def per_image_ms(self, images: int, elapsed: float) -> dict[str, float]:
        """Per image: each role's CPU and the cores' idle time (PostgreSQL backends that
        ended in the window are not counted, so that figure is a lower bound)."""
        used = {
            "worker": self.worker,
            "postgres": self.postgres,
            "redis": self.redis,
            "producer": self.producer,
        }
        used["idle_or_other"] = max(0.0, (os.cpu_count() or 1) * elapsed - sum(used.values()))
        return {role: round(seconds * 1000 / images, 2) for role, seconds in used.items()}


def _cpu_seconds(stat: str) -> float:
    """utime + stime from a /proc/PID/stat line."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_only(settings: Settings, paths: list[Path], batch: int) -> float:
    """Forward passes alone over the same images, preprocessed beforehand, in the worker's
    configuration: the same batch size, streams and threads per stream."""
    import threading

    import numpy as np

    from moderation.embedding.families import embedder_for_worker
    from moderation.images.decode import DecodeLimits
    from moderation.images.signals import extract_signals

    embedder = embedder_for_worker(settings, settings.resolved_model())
    limits = DecodeLimits.from_settings(settings)
    pixels = np.stack(
        [
            extract_signals(p.read_bytes(), limits, embedder.preprocess).embedding_inputs()[0]
            for p in paths
        ]
    )
    batches = [pixels[start : start + batch] for start in range(0, len(pixels), batch)]
    embedder.embed(batches[0])  # warm-up
    pending = iter(batches)
    lock = threading.Lock()

    def stream() -> None:
        while True:
            with lock:
                chunk = next(pending, None)
            if chunk is None:
                return
            embedder.embed(chunk)

    threads = [threading.Thread(target=stream) for _ in range(settings.resolved_streams())]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(pixels) / (time.perf_counter() - started)


def intake_only(settings: Settings, paths: list[Path]) -> float:
    """Intake alone, fetch to preprocessed crop, as the worker runs it: the same intake
    processes (or none: in threads), kept busy by twice as many threads as they take jobs."""
    from concurrent.futures import ThreadPoolExecutor

    from moderation.embedding.families import preprocessing_of
    from moderation.worker.intake.pool import build_intake

    preprocess = preprocessing_of(settings.resolved_model())
    threads = 2 * max(1, settings.resolved_intake_processes()) * settings.intake_jobs_per_process
    intake = build_intake(settings, slots=threads)

    def one(path: Path) -> None:
        with intake.screened(path.as_uri(), None, [preprocess]) as (signals, _):
            signals.embedding_inputs()[0].sum()  # touch the crop, as the forward pass would

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, paths[: 2 * threads]))  # warm-up: processes started, caches
            started = time.perf_counter()
            list(pool.map(one, paths))
            elapsed = time.perf_counter() - started
    finally:
        intake.close()
    return len(paths) / elapsed


def per_image_cpu_work(settings: Settings, paths: list[Path]) -> dict[str, float]:
    """Milliseconds per image of each intake stage, one thread, for where the time goes."""
    from moderation.embedding.families import preprocessing_of
    from moderation.images.decode import DecodeLimits, decode
    from moderation.images.fetch import fetch
    from moderation.images.hashing import pdq, sha256
    from moderation.images.uri_policy import UriPolicy

    limits = DecodeLimits.from_settings(settings)
    policy = UriPolicy.from_settings(settings)
    preprocess = preprocessing_of(settings.resolved_model())
    timings: dict[str, float] = {"fetch": 0, "sha256": 0, "decode": 0, "pdq": 0, "preprocess": 0}
    for path in paths:
        t0 = time.perf_counter()
        data = fetch(path.as_uri(), policy=policy, max_bytes=settings.max_bytes, timeout_s=5)
        t1 = time.perf_counter()
        sha256(data)
        t2 = time.perf_counter()
        frame = decode(data, limits).frames[0][1]
        t3 = time.perf_counter()
        pdq(frame)
        t4 = time.perf_counter()
        preprocess(frame)
        t5 = time.perf_counter()
        for stage, seconds in zip(
            timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True
        ):
            timings[stage] += seconds
    return {stage: round(total / len(paths) * 1000, 3) for stage, total in timings.items()}


if __name__ == "__main__":
    main()
