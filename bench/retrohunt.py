"""Retro-hunt: how fast a job searches past uploads, and what a running hunt costs screening.

    python bench/retrohunt.py [--uploads 50000] [--clip-entries 1000] [--pdq-entries 100000] \
        [--images 300] [--rounds 3]

1. Hunt rate, in this process, as the worker runs a job's steps: N synthetic screened
   uploads (a SHA-256, a PDQ hash and a 768-d embedding each, written by COPY) searched
   for a job of E CLIP entries and for a job of P PDQ hashes. Baseline in the same run:
   the same exact searches over the same arrays already in memory (`ClipBank.search`,
   Faiss range search), so the difference is what reading from PostgreSQL, checkpointing
   and recording cost. Planted hits (entries placed near some uploads) must all be found.
2. Screening while a hunt runs: a real worker (the tiny model) screens K images with no
   hunt, then K more while it runs a PDQ job like the one above from its retro-hunt
   queue, in alternating rounds; the medians of images/s, timed on the database's clock.

Prints the figures and writes them as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from moderation.runtime import Runtime

BENCH_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation_bench_retrohunt"
BENCH_REDIS = "redis://127.0.0.1:6379/14"
DIM = 768
PLANTED = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--uploads", type=int, default=50_000, help="Past uploads searched.")
    parser.add_argument("--clip-entries", type=int, default=1000, help="CLIP entries hunted.")
    parser.add_argument("--pdq-entries", type=int, default=100_000, help="PDQ hashes hunted.")
    parser.add_argument("--images", type=int, default=300, help="Images screened per run.")
    parser.add_argument("--rounds", type=int, default=3, help="Runs with and without a hunt.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/retrohunt.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="moderation-bench-retrohunt-"))
    # The bench's settings, as the worker it starts reads them from its environment.
    environment = {
        "MODERATION_DATABASE_URL": os.environ.get("MODERATION_BENCH_DATABASE_URL", BENCH_DATABASE),
        "MODERATION_REDIS_URL": os.environ.get("MODERATION_BENCH_REDIS_URL", BENCH_REDIS),
        "MODERATION_QUEUE": "screening-bench",
        "MODERATION_RETROHUNT_QUEUE": "retrohunt-bench",
        "MODERATION_MODEL": str(workdir / "tiny-clip"),
        "MODERATION_DEVICE": "cpu",
        "MODERATION_BANK_REFRESH_S": "1",
        "MODERATION_RETROHUNT_SETTLE_S": "0",
        "MODERATION_ALLOWED_URI_PREFIXES": f"{workdir.resolve().as_uri()}/",
    }
    from moderation.config import Settings, settings_fields
    from moderation.embedding.tiny import write_tiny_clip
    from moderation.runtime import Runtime

    runtime = Runtime(Settings(**settings_fields(environment)))
    write_tiny_clip(workdir / "tiny-clip")
    try:
        prepare_uploads(runtime, args.uploads)
        hunting = hunt_rates(runtime, args.uploads, args.clip_entries, args.pdq_entries)
        screening = screening_while_hunting(
            runtime, environment, workdir, args.images, args.pdq_entries, args.rounds
        )
    finally:
        runtime.close()
    results: dict[str, Any] = {
        "hunt": hunting,
        "screening": screening,
        "uploads": args.uploads,
        "dim": DIM,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    for kind in ("clip", "pdq"):
        run = hunting[kind]
        print(
            f"{kind}: {run['entries']:,} entries over {args.uploads:,} uploads: hunt "
            f"{run['uploads_per_s']:,.0f} uploads/s, the search alone in memory "
            f"{run['baseline_uploads_per_s']:,.0f} uploads/s"
        )
    print(
        f"screening {screening['alone_images_per_s']} images/s alone, "
        f"{screening['while_hunting_images_per_s']} while a hunt ran "
        f"(medians of {args.rounds} runs each; ratio {screening['ratio']})"
    )
    print(f"written to {args.out}")


def prepare_uploads(runtime: Runtime, count: int) -> None:
    """A fresh schema and `count` screened uploads, each with a SHA-256, a PDQ hash and one
    768-d embedding of a model of its own."""
    from sqlalchemy import text

    from moderation import pg_copy, schema
    from moderation.embedding.service import get_or_create_model, normalise

    schema.upgrade(runtime.settings.database_url)
    with runtime.engine.begin() as conn:
        conn.execute(
            text("TRUNCATE hits, signals, embeddings, uploads, banks, retrohunt_jobs CASCADE")
        )
    rng = np.random.default_rng(0)
    with runtime.session() as session:
        model = get_or_create_model(session, "bench-768", DIM)
        ids = list(
            session.scalars(
                text(
                    "INSERT INTO uploads (uri, status, attempts, enqueued_at, finished_at) "
                    "SELECT 'file:///bench/' || i || '.jpg', 'screened', 1, now(), now() "
                    "FROM generate_series(1, :n) AS i RETURNING id"
                ),
                {"n": count},
            )
        )
        session.execute(
            text(
                "INSERT INTO signals (upload_id, signal, frame_index, value, quality) "
                "SELECT id, 'sha256', 0, sha256(id::text::bytea), NULL FROM uploads"
            )
        )
        session.execute(
            text(
                "INSERT INTO signals (upload_id, signal, frame_index, value, quality) "
                "SELECT id, 'pdq', 0, sha256(('pdq' || id)::bytea), 100 FROM uploads"
            )
        )
        fields = [("upload_id", ">i8"), ("model_id", ">i8"), ("frame_index", ">i4")]
        fields.append(("vector", f"V{4 * DIM}"))
        for start in range(0, count, 20_000):
            chunk = ids[start : start + 20_000]
            rows = pg_copy.new_rows(fields, len(chunk))
            rows["upload_id"] = chunk
            rows["model_id"] = model.id
            vectors = normalise(rng.standard_normal((len(chunk), DIM), dtype=np.float32))
            rows["vector"] = np.ascontiguousarray(vectors, "<f4").view(f"V{4 * DIM}").reshape(-1)
            pg_copy.copy_in(session, "embeddings", rows)


def hunt_rates(
    runtime: Runtime, uploads: int, clip_entries: int, pdq_entries: int
) -> dict[str, Any]:
    from sqlalchemy import select

    from moderation.banks import service as banks
    from moderation.embedding.models import Embedding, EmbeddingModel
    from moderation.embedding.service import normalise, vector_from_bytes
    from moderation.screening.models import Signal

    rng = np.random.default_rng(1)
    with runtime.session() as session:
        model = session.scalars(
            select(EmbeddingModel).where(EmbeddingModel.name == "bench-768")
        ).one()
        # Plant entries near the first uploads' vectors and hashes.
        planted = session.execute(
            select(Embedding.vector).order_by(Embedding.upload_id).limit(PLANTED)
        ).scalars()
        vectors = normalise(rng.standard_normal((clip_entries, DIM), dtype=np.float32))
        for row, vector in enumerate(planted):
            vectors[row] = _at_cosine_distance(vector_from_bytes(vector), 0.03, rng)
        bank = banks.create_bank(session, "clip-hunted")
        banks.copy_entries(session, bank, model=model, vectors=vectors, added_by="bench")
        hashes = list(
            session.scalars(
                select(Signal.value)
                .where(Signal.signal == "pdq")
                .order_by(Signal.upload_id)
                .limit(PLANTED)
            )
        )
    clip = _run_job(runtime, _started_job(runtime), uploads)
    pdq_job = add_pdq_entries(runtime, "pdq-hunted", pdq_entries, hashes)
    pdq = _run_job(runtime, pdq_job, uploads)

    # The same searches, over arrays already in memory.
    from moderation.banks.clip_search import ClipRows
    from moderation.retrohunt.service import BLOCK_UPLOADS

    settings = runtime.settings
    upload_vectors = _all_upload_vectors(runtime)
    bank_vectors = ClipRows.holding(
        np.arange(len(vectors)),
        np.zeros(len(vectors), np.int64),
        np.ascontiguousarray(vectors, np.float32),
    ).bank({0: settings.match_radius})
    started = time.perf_counter()
    found = sum(
        len(hits)
        for start in range(0, len(upload_vectors), BLOCK_UPLOADS)
        for hits in bank_vectors.search(upload_vectors[start : start + BLOCK_UPLOADS])
    )
    clip["baseline_uploads_per_s"] = round(uploads / (time.perf_counter() - started), 1)
    clip["baseline_hits"] = found
    pdq["baseline_uploads_per_s"] = round(_pdq_in_memory(runtime, pdq_entries, hashes, uploads), 1)
    return {"clip": clip, "pdq": pdq}


def _at_cosine_distance(
    anchor: np.ndarray, distance: float, rng: np.random.Generator
) -> np.ndarray:
    """A unit vector at `distance` from the unit vector `anchor` (as `tests/vectors.py`)."""
    other = rng.standard_normal(anchor.shape)
    other -= (other @ anchor) * anchor
    other /= np.linalg.norm(other)
    similarity = 1.0 - distance
    vector: np.ndarray = similarity * anchor + np.sqrt(1.0 - similarity**2) * other
    return vector.astype(np.float32)


def add_pdq_entries(runtime: Runtime, bank_name: str, count: int, planted: list[bytes]) -> int:
    """A bank of `count` random PDQ hashes, some near the planted uploads' hashes, added
    as an import would add them; its retro-hunt job."""
    from sqlalchemy import text

    from moderation.banks import service as banks

    with runtime.session() as session:
        bank = banks.create_bank(session, bank_name)
        first, _last = session.execute(
            text(
                "WITH added AS (INSERT INTO bank_entries (bank_id, pdq, added_by) "
                "SELECT :bank, sha256(('entry' || i)::bytea), 'bench' "
                "FROM generate_series(1, :n) AS i RETURNING id) "
                "SELECT min(id), max(id) FROM added"
            ),
            {"bank": bank.id, "n": count},
        ).one()
        # Planted: 10 bits away from an upload's hash.
        for index, bits in enumerate(planted):
            near = bytes([bits[0] ^ 0xFF, bits[1] ^ 0x03]) + bits[2:]
            session.execute(
                text("UPDATE bank_entries SET pdq = :pdq WHERE id = :id"),
                {"pdq": near, "id": first + index},
            )
    return _started_job(runtime)


def _started_job(runtime: Runtime) -> int:
    """The one job the retro-hunt's starter makes of the entries just committed (as every
    worker's sweeper would), run here rather than sent."""
    from moderation.retrohunt import service as retrohunt

    with runtime.session() as session:
        (step,) = retrohunt.start_from_changes(session, settle_wait_s=60) or []
    return step.job_id


def _run_job(runtime: Runtime, job_id: int, uploads: int) -> dict[str, Any]:
    from moderation.retrohunt import service as retrohunt

    settings = runtime.settings
    cache = retrohunt.TargetCache()
    step: retrohunt.NextStep | None = retrohunt.NextStep(job_id, 0)
    steps = 0
    started = time.perf_counter()
    while step is not None:
        with runtime.session() as session:
            step = retrohunt.run_step(session, job_id, step.step, settings, cache)
        steps += 1
    elapsed = time.perf_counter() - started
    with runtime.session() as session:
        job = retrohunt.get_job(session, job_id)
    return {
        "entries": job.entries,
        "uploads_per_s": round(uploads / elapsed, 1),
        "seconds": round(elapsed, 2),
        "steps": steps,
        "hits_found": job.hits_found,
        "planted": PLANTED,
        "status": job.status,
    }


def _all_upload_vectors(runtime: Runtime) -> np.ndarray:
    from sqlalchemy import select

    from moderation import pg_copy
    from moderation.embedding.models import Embedding

    blocks: list[np.ndarray] = []
    with runtime.session() as session:
        pg_copy.copy_out(
            session,
            select(Embedding.vector).order_by(Embedding.upload_id),
            [("vector", ("<f4", DIM))],
            lambda rows: blocks.append(rows["vector"].astype(np.float32)),
        )
    return np.ascontiguousarray(np.concatenate(blocks))


def _pdq_in_memory(runtime: Runtime, entries: int, planted: list[bytes], uploads: int) -> float:
    """Uploads/s of the Faiss range search alone, the hashes already in memory."""
    import faiss
    from sqlalchemy import select

    from moderation.retrohunt.service import BLOCK_UPLOADS
    from moderation.screening.models import Signal

    with runtime.session() as session:
        queries = np.frombuffer(
            b"".join(
                session.scalars(
                    select(Signal.value).where(Signal.signal == "pdq").order_by(Signal.upload_id)
                )
            ),
            np.uint8,
        ).reshape(-1, 32)
    import hashlib

    bank = np.frombuffer(
        b"".join(hashlib.sha256(f"entry{i}".encode()).digest() for i in range(1, entries + 1)),
        np.uint8,
    ).reshape(-1, 32)
    index = faiss.IndexBinaryFlat(256)
    index.add(bank)
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    for start in range(0, len(queries), BLOCK_UPLOADS):
        index.range_search(queries[start : start + BLOCK_UPLOADS], 32)
    return float(uploads / (time.perf_counter() - started))


def screening_while_hunting(
    runtime: Runtime,
    environment: dict[str, str],
    workdir: Path,
    images: int,
    pdq_entries: int,
    rounds: int,
) -> dict[str, Any]:
    """Rounds of K images screened with no hunt, then K while a fresh hunt runs (each hunt
    is waited for before the next round): the host's load varies between runs, so the
    rounds alternate and the medians are compared."""
    import statistics

    import redis
    from sqlalchemy import func, select

    from moderation.banks import service as banks
    from moderation.demo.synthetic import textured
    from moderation.retrohunt import service as retrohunt
    from moderation.retrohunt.cli import wait_for_jobs
    from moderation.retrohunt.tasks import send_steps
    from moderation.screening.cli import submit_uris, wait_until_final
    from moderation.worker.child import WorkerProcess

    redis.Redis.from_url(runtime.settings.redis_url).flushdb()
    paths = []
    for seed in range(16 + 2 * rounds * images):
        path = workdir / f"{seed}.jpg"
        textured(seed, (640, 480)).save(path, "JPEG", quality=90)
        paths.append(path.as_uri())
    warmup, timed = paths[:16], paths[16:]

    def images_per_s(uris: list[str]) -> float:
        with runtime.session() as session:
            started_at = session.scalar(select(func.clock_timestamp()))
        uploads = wait_until_final(runtime, submit_uris(runtime, uris), timeout_s=3600)
        finished = max(u.finished_at for u in uploads if u.finished_at is not None)
        assert started_at is not None
        return float(len(uris) / (finished - started_at).total_seconds())

    alone: list[float] = []
    hunting: list[float] = []
    during: list[str] = []
    # Banked before the worker starts and hunted again each round, so that every run
    # screens against the same banks: adding entries makes workers reload their snapshot
    # and match against a larger bank, which is not the hunt's cost.
    _run_job(runtime, add_pdq_entries(runtime, "pdq-hunted-by-worker", pdq_entries, []), 1)
    with WorkerProcess(workdir / "worker.log", env=environment) as worker:
        worker.wait_ready()
        wait_until_final(runtime, submit_uris(runtime, warmup), timeout_s=600)
        for round_ in range(rounds):
            batch = timed[2 * round_ * images : 2 * (round_ + 1) * images]
            alone.append(images_per_s(batch[:images]))
            with runtime.session() as session:
                bank = banks.get_bank(session, "pdq-hunted-by-worker")
                job_id = retrohunt.hunt_bank(session, bank, created_by="bench").id
            send_steps(runtime, [retrohunt.NextStep(job_id, 0)])
            time.sleep(1)  # the job's first message is taken
            hunting.append(images_per_s(batch[images:]))
            with runtime.session() as session:
                # Still scanning: the hunt ran for the whole timed run.
                during.append(retrohunt.get_job(session, job_id).status)
            wait_for_jobs(runtime, [job_id], 3600, quiet=True)
        worker.stop()
    runtime.close()
    return {
        "alone_images_per_s": round(statistics.median(alone), 2),
        "while_hunting_images_per_s": round(statistics.median(hunting), 2),
        "ratio": round(statistics.median(hunting) / statistics.median(alone), 3),
        "alone_runs": [round(x, 2) for x in alone],
        "hunting_runs": [round(x, 2) for x in hunting],
        "hunt_status_when_screening_ended": during,
        "images_per_run": images,
    }


if __name__ == "__main__":
    main()
