"""`moderation demo`: the whole service on the bundled samples, offline, start to finish.

It uses a database of its own (`moderation_demo` on the configured server, rebuilt each run),
a Redis database and queue of its own, and a real `moderation worker` process. The model is
MODERATION_MODEL if set, else the default CPU checkpoint if it is already downloaded, else a
tiny random CLIP written on the spot, and the demo says which.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import click
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from moderation.config import DEFAULT_CPU_MODEL, Settings, settings_fields
from moderation.demo.samples import SAMPLES
from moderation.embedding.tiny import TINY_MODEL_WARNING, write_tiny_clip
from moderation.local_services import LocalServices
from moderation.runtime import Runtime

if TYPE_CHECKING:
    from moderation.screening.models import Upload

TINY_MODEL_DIR = Path.home() / ".cache" / "moderation" / "tiny-clip"
DEMO_BANK = "demo-known-bad"


def run_demo() -> None:
    base = Settings()
    # Where nothing is configured and nothing answers at the default address, a PostgreSQL
    # and a Redis of the project's own, started for the demo and stopped after it.
    with LocalServices(
        base.database_url,
        base.redis_url,
        database_configured="database_url" in base.model_fields_set,
        redis_configured="redis_url" in base.model_fields_set,
    ) as services:
        for started in services.started:
            click.echo(f"started {started} for the demo; stopped when it ends")
        _run(base)


def _run(base: Settings) -> None:
    model, is_tiny = _choose_model(base)
    database_url = _demo_database_url(base.database_url)
    redis_url = base.redis_url.rsplit("/", 1)[0] + "/1"
    # The demo's settings, as its worker (a child process) reads them from its environment.
    environment = {
        "MODERATION_DATABASE_URL": database_url,
        "MODERATION_REDIS_URL": redis_url,
        "MODERATION_QUEUE": "screening-demo",
        "MODERATION_MODEL": model,
        "MODERATION_DEVICE": base.device,
        # The samples are the only files the demo's worker may read.
        "MODERATION_ALLOWED_URI_PREFIXES": f"{SAMPLES.resolve().as_uri()}/",
    }
    # Offline, this process and its worker: every model the demo runs is already here.
    os.environ["HF_HUB_OFFLINE"] = "1"
    with closing(Runtime(Settings(**settings_fields(environment)))) as runtime:
        click.secho("moderation demo", bold=True)
        click.echo(f"  model:    {model}")
        if is_tiny:
            click.secho(f"            {TINY_MODEL_WARNING}", fg="yellow")
        shown = make_url(database_url).render_as_string()
        click.echo(f"  database: {shown} (rebuilt for the demo)")
        click.echo(f"  broker:   {redis_url}, queue screening-demo\n")

        _reset_database(database_url)
        _reset_broker(redis_url)
        entries = _build_bank(runtime)
        click.echo(f"bank {DEMO_BANK!r}: {len(entries)} entries from {SAMPLES / 'bank'}")

        from moderation.screening.cli import expand, submit_uris, wait_until_final
        from moderation.worker.child import WorkerProcess

        with tempfile.TemporaryDirectory(prefix="moderation-demo-") as tmp:
            log = Path(tmp) / "worker.log"
            with WorkerProcess(log, env=environment) as worker:
                click.echo("starting a worker ...")
                worker.wait_ready()
                # Each file named: the broken ones too, which a directory submit would
                # leave out by their content, to show the worker's refusals.
                samples = sorted((SAMPLES / "uploads").iterdir())
                uris = expand(tuple(str(p) for p in samples)).uris
                click.echo(f"submitting {len(uris)} uploads from {SAMPLES / 'uploads'}\n")
                uploads = wait_until_final(runtime, submit_uris(runtime, uris), timeout_s=300)
        _report(runtime, uploads)


def _choose_model(settings: Settings) -> tuple[str, bool]:
    if settings.model:
        return settings.model, False
    try:
        from transformers import CLIPConfig

        CLIPConfig.from_pretrained(DEFAULT_CPU_MODEL, local_files_only=True)
        return DEFAULT_CPU_MODEL, False
    except OSError:
        pass
    if not (TINY_MODEL_DIR / "config.json").exists():
        write_tiny_clip(TINY_MODEL_DIR)
    return str(TINY_MODEL_DIR), True


def _demo_database_url(database_url: str) -> str:
    url = make_url(database_url).set(database="moderation_demo")
    return url.render_as_string(hide_password=False)


def _reset_database(url: str) -> None:
    from moderation import schema

    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS moderation_demo WITH (FORCE)"))
    admin.dispose()
    schema.upgrade(url)


def _reset_broker(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def _build_bank(runtime: Runtime) -> list[int]:
    from moderation.banks import service as banks
    from moderation.embedding import registry
    from moderation.embedding.families import open_embedder
    from moderation.embedding.service import get_or_create_model
    from moderation.images.decode import DecodeLimits

    settings = runtime.settings
    with runtime.session() as session:
        name = registry.serving_name(session, settings.resolved_model())
    embedder = open_embedder(name, settings.resolved_device())
    limits = DecodeLimits.from_settings(settings)
    with runtime.session() as session:
        model = get_or_create_model(session, embedder.name, embedder.dim)
        bank = banks.create_bank(session, DEMO_BANK)
        entries = []
        for path in sorted((SAMPLES / "bank").iterdir()):
            entries.append(
                banks.entry_from_image(path.read_bytes(), embedder, model, limits, path.as_uri())
            )
        rows = banks.add_entries(session, bank, entries, added_by="demo")
        return [row.id for row in rows]


def _report(runtime: Runtime, rows: list[Upload]) -> None:
    from moderation.console import emit_table
    from moderation.review import service as review
    from moderation.screening.models import UploadStatus

    click.secho("uploads", bold=True)
    emit_table(
        [
            {
                "upload_id": u.id,
                "file": Path(u.uri).name,
                "status": u.status.value,
                "error": f"{u.error_code}: {u.error_message}" if u.error_code else None,
            }
            for u in rows
        ],
        ["upload_id", "file", "status", "error"],
        empty="no uploads",
    )
    with runtime.session() as session:
        every = review.newest(session, runtime.settings, review.QueueFilter(status=None), None)
        hits = sorted(every, key=lambda h: (h.upload_id, h.signal))
    click.secho("\nhits", bold=True)
    emit_table(
        [{**vars(h), "file": Path(h.upload_uri).name} for h in hits],
        ["upload_id", "file", "bank_entry_id", "signal", "distance", "frame_index"],
        empty="no hits",
    )
    screened = sum(u.status is UploadStatus.SCREENED for u in rows)
    failed = sum(u.status is UploadStatus.FAILED for u in rows)
    flagged = len({h.upload_id for h in hits})
    click.echo(
        f"\n{len(rows)} uploads: {screened} screened, {failed} refused as bad input; "
        f"{flagged} matched the bank ({len(hits)} hits)."
    )
    click.echo(
        "Distances: SHA-256 0 = identical bytes; PDQ in bits of 256 (<= 31 is a match); "
        "CLIP cosine distance (<= 0.05 is a match)."
    )
