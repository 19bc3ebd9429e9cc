"""A model change on one worker: what computing two models, re-embedding and switching cost.

    python bench/reembed.py [--images N] [--clip-arch vit-b-32] [--siglip-arch vit-b-32-256]

One real `moderation worker` process follows the registry through every phase (it is
never restarted): full-size architectures with random weights (speed does not depend on
the weights), a CLIP and a SigLIP of about the same size, written once under
~/.cache/moderation. Rates are timed on the database's clock, from just before the first
submit to the last upload's screening transaction (or a job's start and finish).

1. CLIP active alone: screen N images (S_clip).
2. SigLIP added as a candidate: the worker computes both; screen N new images (S_dual).
   Ratio S_dual / S_clip: the forward passes should be the only extra cost.
3. Re-embed under SigLIP at full duty (`--duty 1`): the uploads of phase 1 (R, from the
   job's start to its finish, which includes the catch-up's settle time,
   MODERATION_REEMBED_SETTLE_S; and R_scan, to the scan's last record, without it).
4. SigLIP activated, CLIP retired: screen phase 1's images again under SigLIP alone
   (S_siglip, the same images and the same forward pass as R). Ratios R / S_siglip and
   R_scan / S_siglip.
   The images are screened twice more, untimed: uploads CLIP has not embedded.
5. CLIP back as a candidate; re-embed under it at the workers' default duty while N new
   images are screened (S_during); then N more once the job is done (S_after, the same two
   models). Ratio S_during / S_after.
6. A bank entry embedded by both; the API's search runtime following the registry; a copy
   of the banked image submitted every 0.25 s; CLIP activated: seconds until the first
   search and the first hit under CLIP (the hit's screening transaction, on the database's
   clock).

Written as JSON (bench/results/reembed.json) with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moderation.runtime import Runtime

CACHE = Path.home() / ".cache" / "moderation"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200, help="Timed images per phase.")
    parser.add_argument("--clip-arch", default="vit-b-32")
    parser.add_argument("--siglip-arch", default="vit-b-32-256")
    parser.add_argument("--out", type=Path, default=Path("bench/results/reembed.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    clip_dir = CACHE / f"random-{args.clip_arch}"
    siglip_dir = CACHE / f"random-siglip-{args.siglip_arch}"
    os.environ.update(
        {
            "MODERATION_QUEUE": "reembed-bench",
            "MODERATION_MODEL": str(clip_dir),
            "MODERATION_MODEL_POLL_S": "0.5",
            "MODERATION_SWEEP_INTERVAL_S": "1",
            "MODERATION_REEMBED_SETTLE_S": "1",
            "MODERATION_ALLOWED_URI_PREFIXES": f"{Path(tempfile.gettempdir()).resolve().as_uri()}/",
        }
    )
    from moderation.config import Settings
    from moderation.embedding.tiny import write_random_clip, write_random_siglip
    from moderation.runtime import Runtime

    if not (clip_dir / "config.json").exists():
        write_random_clip(clip_dir, args.clip_arch)
    if not (siglip_dir / "config.json").exists():
        write_random_siglip(siglip_dir, args.siglip_arch)
    load_before = os.getloadavg()
    # Settings from the environment just set, which the worker's process inherits too.
    runtime = Runtime(Settings())
    try:
        with tempfile.TemporaryDirectory(prefix="moderation-reembed-bench-") as tmp:
            results = run(runtime, Path(tmp), args.images, str(clip_dir), str(siglip_dir))
    finally:
        runtime.close()
    results.update(
        {
            "images_per_phase": args.images,
            "clip": args.clip_arch,
            "siglip": args.siglip_arch,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def run(runtime: Runtime, workdir: Path, n: int, clip: str, siglip: str) -> dict[str, Any]:
    import redis
    from sqlalchemy import text

    from moderation import schema
    from moderation.worker.child import WorkerProcess

    schema.upgrade(runtime.settings.database_url)
    with runtime.engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE reembed_jobs, hits, signals, embeddings, uploads, banks, "
                "bank_entry_embeddings, bank_entries CASCADE"
            )
        )
        conn.execute(text("UPDATE embedding_models SET state = 'retired'"))
    redis.Redis.from_url(runtime.settings.redis_url).flushdb()
    batch = runtime.settings.resolved_batch_size()
    images = {
        name: make_images(workdir / name, range(start, start + n))
        for name, start in (("a", 0), ("b", 10_000), ("during", 20_000), ("after", 30_000))
    }
    warmup = make_images(workdir / "warmup", range(90_000, 90_000 + 4 * batch))
    out: dict[str, Any] = {}
    with WorkerProcess(workdir / "worker.log") as worker:
        worker.wait_ready()
        screen(runtime, warmup)
        out["screening_clip_alone_per_s"] = rate(screen(runtime, images["a"]))

        add(runtime, siglip)
        wait_until_computed(runtime, siglip, workdir)
        out["screening_clip_and_siglip_per_s"] = rate(screen(runtime, images["b"]))
        out["two_models_over_one"] = ratio(
            out, "screening_clip_and_siglip_per_s", "screening_clip_alone_per_s"
        )

        job = reembed(runtime, siglip, duty=1.0)
        done = wait_job(runtime, job)
        out["reembed_siglip_per_s"] = round(done["embedded"] / done["seconds"], 2)
        out["reembed_siglip_scan_per_s"] = round(done["embedded"] / done["scan_seconds"], 2)
        out["reembed_siglip_embedded"] = done["embedded"]

        activate(runtime, siglip)
        retire(runtime, clip)
        wait_until_only(runtime, siglip, workdir)
        out["screening_siglip_alone_per_s"] = rate(screen(runtime, images["a"]))
        out["reembed_over_screening"] = ratio(
            out, "reembed_siglip_per_s", "screening_siglip_alone_per_s"
        )
        out["reembed_scan_over_screening"] = ratio(
            out, "reembed_siglip_scan_per_s", "screening_siglip_alone_per_s"
        )
        screen(runtime, images["a"])  # untimed: uploads CLIP has not embedded, for phase 5
        screen(runtime, images["a"])

        add(runtime, clip)
        wait_until_computed(runtime, clip, workdir)
        job = reembed(runtime, clip, duty=None)
        during = screen(runtime, images["during"])
        still_running = job_view(runtime, job)["status"] not in {"done", "failed", "cancelled"}
        out["screening_during_reembed_per_s"] = rate(during)
        out["reembed_ran_throughout"] = still_running
        wait_job(runtime, job)
        out["screening_after_reembed_per_s"] = rate(screen(runtime, images["after"]))
        out["during_over_alone"] = ratio(
            out, "screening_during_reembed_per_s", "screening_after_reembed_per_s"
        )

        out.update(switch_over(runtime, workdir, clip, siglip))
        worker.stop()
    return out


def ratio(out: dict[str, Any], top: str, bottom: str) -> float:
    return round(float(out[top]) / float(out[bottom]), 3)


def make_images(directory: Path, seeds: range) -> list[Path]:
    from moderation.demo.synthetic import textured

    directory.mkdir(parents=True)
    paths = []
    for seed in seeds:
        path = directory / f"{seed}.jpg"
        textured(seed, (640, 480)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def screen(runtime: Runtime, paths: list[Path]) -> dict[str, Any]:
    """Submit as the CLI does and wait; the count and the database's seconds."""
    from sqlalchemy import func, select

    from moderation.screening.cli import submit_uris, wait_until_final
    from moderation.screening.models import UploadStatus

    with runtime.session() as session:
        started = session.scalar(select(func.clock_timestamp()))
    uploads = wait_until_final(
        runtime, submit_uris(runtime, [p.as_uri() for p in paths]), timeout_s=3600
    )
    bad = [u.id for u in uploads if u.status is not UploadStatus.SCREENED]
    if bad or started is None:
        raise SystemExit(f"{len(bad)} uploads were not screened")
    finished = max(u.finished_at for u in uploads if u.finished_at is not None)
    return {"count": len(uploads), "seconds": (finished - started).total_seconds()}


def rate(screened: dict[str, Any]) -> float:
    return round(float(screened["count"]) / float(screened["seconds"]), 2)


def _model(name: str) -> Any:
    from moderation.embedding.families import open_embedder

    return open_embedder(name)


def add(runtime: Runtime, name: str) -> None:
    from moderation.embedding import registry

    embedder = _model(name)
    with runtime.session() as session:
        registry.add(
            session,
            name,
            family=embedder.family,
            dim=embedder.dim,
            fingerprint=embedder.fingerprint,
            actor="bench",
        )


def activate(runtime: Runtime, name: str) -> None:
    from moderation.embedding import registry

    with runtime.session() as session:
        registry.activate(session, name, actor="bench")


def retire(runtime: Runtime, name: str) -> None:
    from moderation.lifecycle import service

    with runtime.session() as session:
        service.retire(session, name, actor="bench", force=True)


def _models_of_probe(runtime: Runtime, workdir: Path) -> set[str]:
    """Screen one new image; the names of the models that embedded it."""
    from sqlalchemy import select

    from moderation.embedding.models import Embedding, EmbeddingModel
    from moderation.screening.cli import submit_uris, wait_until_final

    seed = int(time.time() * 1000) % 1_000_000 + 1_000_000
    (path,) = make_images(workdir / f"probe-{seed}", range(seed, seed + 1))
    (upload,) = wait_until_final(runtime, submit_uris(runtime, [path.as_uri()]), timeout_s=600)
    with runtime.session() as session:
        return set(
            session.scalars(
                select(EmbeddingModel.name)
                .join(Embedding, Embedding.model_id == EmbeddingModel.id)
                .where(Embedding.upload_id == upload.id)
            )
        )


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.2)


def wait_until_computed(runtime: Runtime, name: str, workdir: Path) -> None:
    _until(lambda: name in _models_of_probe(runtime, workdir), f"the worker computing {name}")


def wait_until_only(runtime: Runtime, name: str, workdir: Path) -> None:
    _until(
        lambda: _models_of_probe(runtime, workdir) == {name}, f"the worker computing {name} alone"
    )


def reembed(runtime: Runtime, name: str, *, duty: float | None) -> int:
    from moderation.lifecycle import reembed as jobs
    from moderation.lifecycle.tasks import send_steps

    with runtime.session() as session:
        job, _ = jobs.start(session, name, actor="bench", duty=duty)
        job_id, step = job.id, job.step
    send_steps(runtime, [jobs.NextStep(job_id, step)])
    return job_id


def job_view(runtime: Runtime, job_id: int) -> dict[str, Any]:
    from dataclasses import asdict

    from moderation.lifecycle import reembed as jobs

    with runtime.session() as session:
        return asdict(jobs.get_job(session, job_id))


def wait_job(runtime: Runtime, job_id: int) -> dict[str, Any]:
    """The finished job's view, with its seconds from start to finish and to the last
    upload embedding it recorded (the scan's end, before the catch-up settles)."""
    from sqlalchemy import func, select

    from moderation.embedding.models import Embedding
    from moderation.lifecycle.models import ReembedJob

    _until(
        lambda: job_view(runtime, job_id)["status"] == "done", f"re-embedding job {job_id}", 3600
    )
    view = job_view(runtime, job_id)
    view["seconds"] = (view["finished_at"] - view["started_at"]).total_seconds()
    with runtime.session() as session:
        job = session.get_one(ReembedJob, job_id)
        last_record = session.scalar(
            select(func.max(Embedding.created_at)).where(
                Embedding.model_id == job.model_id, Embedding.created_at >= job.started_at
            )
        )
    scan_end = view["finished_at"] if last_record is None else last_record
    view["scan_seconds"] = (scan_end - view["started_at"]).total_seconds()
    return view


def switch_over(runtime: Runtime, workdir: Path, clip: str, siglip: str) -> dict[str, Any]:
    """Seconds from activating CLIP (a candidate, fully re-embedded) to the first search
    answered under it by a search runtime that follows the registry, and to the first hit
    under it on a copy of a banked image."""
    from sqlalchemy import func, select

    from moderation.banks import service as banks
    from moderation.embedding import registry
    from moderation.images.decode import DecodeLimits
    from moderation.review.models import Hit
    from moderation.runtime import Runtime
    from moderation.screening.cli import submit_uris
    from moderation.screening.models import Upload
    from moderation.search import service as search_service
    from moderation.search.runtime import SearchRuntime

    (banked,) = make_images(workdir / "banked", range(50_000, 50_001))
    settings = runtime.settings
    with runtime.session() as session:
        bank = banks.create_bank(session, "bench-switch")
        rows = []
        for name in (siglip, clip):
            embedder = _model(name)
            model = registry.registered(session, embedder)
            rows.append(
                banks.entry_from_image(
                    banked.read_bytes(),
                    embedder,
                    model,
                    DecodeLimits.from_settings(settings),
                    banked.as_uri(),
                )
            )
        (entry,) = banks.add_entries(session, bank, [rows[0]], added_by="bench")
        clip_vector = rows[1].embedding
        assert clip_vector is not None
        entry_id = entry.id
    with runtime.session() as session:
        from moderation.banks.models import BankEntryEmbedding

        session.add(
            BankEntryEmbedding(
                bank_entry_id=entry_id,
                model_id=registry.get_model(session, clip).id,
                vector=clip_vector.astype("<f4").tobytes(),
            )
        )
    searching = Runtime(settings.model_copy(update={"index_dir": workdir / "index"}))
    search = SearchRuntime(searching, follow=True)
    first = search.upload_query(_any_upload(runtime))
    assert search.model_name == siglip, search.model_name
    search.search(first, 5, search_service.Filters())
    with runtime.session() as session:
        clip_id = registry.get_model(session, clip).id
    # Uploads keep coming, as they do in service: a copy of the banked image every 0.25 s
    # from before the switch, so the first hit under the new model is not held back by a
    # screening that started before it.
    stop = threading.Event()

    def traffic() -> None:
        with closing(Runtime(settings)) as sending:
            while not stop.wait(0.25):
                submit_uris(sending, [banked.as_uri()])

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    time.sleep(2)
    with runtime.session() as session:
        activated_db = session.scalar(select(func.clock_timestamp()))
    activated = time.monotonic()
    activate(runtime, clip)
    searched_at = hit_after_s = None
    try:
        while searched_at is None or hit_after_s is None:
            if time.monotonic() - activated > 120:
                raise SystemExit("no search or hit under the new model within 120 s")
            if searched_at is None:
                query = search.upload_query(_any_upload(runtime))
                if query.model_id == clip_id and search.search(query, 5, search_service.Filters()):
                    searched_at = time.monotonic()
            if hit_after_s is None:
                with runtime.session() as session:
                    first = session.scalar(
                        select(func.min(Upload.finished_at))
                        .join(Hit, Hit.upload_id == Upload.id)
                        .where(
                            Hit.model_id == clip_id,
                            Hit.signal == "clip",
                            Upload.finished_at >= activated_db,
                        )
                    )
                if first is not None:
                    hit_after_s = (first - activated_db).total_seconds()
            time.sleep(0.1)
    finally:
        stop.set()
        sender.join()
    search.close()
    searching.close()
    return {
        "activate_to_first_search_s": round(searched_at - activated, 2),
        "activate_to_first_hit_s": round(hit_after_s, 2),
        "model_poll_s": settings.model_poll_s,
    }


def _any_upload(runtime: Runtime) -> int:
    from sqlalchemy import func, select

    from moderation.screening.models import Upload, UploadStatus

    with runtime.session() as session:
        found = session.scalar(
            select(func.max(Upload.id)).where(Upload.status == UploadStatus.SCREENED)
        )
    assert found is not None
    return int(found)


if __name__ == "__main__":
    main()
