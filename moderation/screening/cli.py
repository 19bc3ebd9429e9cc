"""`moderation submit | hits | uploads | worker | sweep`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from moderation.config import get_settings
from moderation.console import emit_json, emit_table
from moderation.db import session_scope
from moderation.images.fetch import to_uri
from moderation.screening import service
from moderation.screening.models import Upload, UploadStatus

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})


def expand(paths_or_uris: tuple[str, ...]) -> list[str]:
    """URIs as given; directories expand to the image files inside them, recursively."""
    uris: list[str] = []
    for item in paths_or_uris:
        path = Path(item)
        if "://" not in item and path.is_dir():
            uris += [
                to_uri(str(p))
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            ]
        else:
            uris.append(to_uri(item))
    return uris


def upload_json(upload: Upload) -> dict[str, Any]:
    error = (
        {"code": upload.error_code, "message": upload.error_message} if upload.error_code else None
    )
    return {
        "upload_id": upload.id,
        "uri": upload.uri,
        "status": upload.status.value,
        "error": error,
    }


def _emit_uploads(
    rows: list[dict[str, Any]], columns: list[str], as_json: bool, empty: str
) -> None:
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        if row["error"]:
            row["error"] = f"{row['error']['code']}: {row['error']['message']}"
    emit_table(rows, columns, empty=empty)


# Uploads recorded and published per transaction: workers start on the first chunk of a
# large submission instead of waiting for all of it.
SUBMIT_CHUNK = 100


def submit_uris(uris: list[str], external_id: str | None = None) -> list[int]:
    """Record uploads, commit, then publish: a message is never sent for an uncommitted row."""
    from moderation.screening.tasks import publish_screening

    if external_id is not None:
        if len(uris) != 1:
            raise ValueError("an external id names exactly one upload")
        with session_scope() as session:
            upload, created = service.submit(session, uris[0], external_id)
        if created:
            publish_screening([upload.id])
        return [upload.id]
    upload_ids: list[int] = []
    for start in range(0, len(uris), SUBMIT_CHUNK):
        with session_scope() as session:
            chunk = service.submit_many(session, uris[start : start + SUBMIT_CHUNK])
        publish_screening(chunk)
        upload_ids += chunk
    return upload_ids


def wait_until_final(upload_ids: list[int], timeout_s: float) -> list[Upload]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope() as session:
            if not service.count_unfinished(session, upload_ids):
                break
        time.sleep(0.2)
    with session_scope() as session:
        return service.get_uploads(session, upload_ids)


@click.command()
@click.argument("paths_or_uris", nargs=-1, required=True)
@click.option("--external-id", help="The caller's id for the upload (one upload only).")
@click.option("--wait", is_flag=True, help="Wait until every upload is screened or failed.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one object per upload.")
def submit(
    paths_or_uris: tuple[str, ...],
    external_id: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Queue images for screening: paths, directories, file:// or http(s):// URIs."""
    uris = expand(paths_or_uris)
    if not uris:
        raise click.UsageError("no images found in the given paths")
    if external_id and len(uris) > 1:
        raise click.UsageError("--external-id names one upload; give one image")
    upload_ids = submit_uris(uris, external_id)
    if wait:
        uploads = wait_until_final(upload_ids, timeout)
    else:
        with session_scope() as session:
            uploads = service.get_uploads(session, upload_ids)
    rows = [upload_json(u) for u in uploads]
    _emit_uploads(rows, ["upload_id", "status", "uri", "error"], as_json, "nothing submitted")
    if wait and any(u.status not in service.FINAL_STATUSES for u in uploads):
        raise click.ClickException(f"not every upload finished within {timeout:g} s")


@click.command()
@click.option("--upload", "upload_id", type=int, help="Only this upload's hits.")
@click.option("--limit", default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hits(upload_id: int | None, limit: int, as_json: bool) -> None:
    """Show hits against the banks, oldest first."""
    with session_scope() as session:
        found = service.list_hits(session, upload_id=upload_id, limit=limit)
    if as_json:
        emit_json(found)
    else:
        emit_table(
            [vars(h) for h in found],
            ["upload_id", "bank", "bank_entry_id", "signal", "distance", "frame_index", "uri"],
            empty="no hits",
        )


@click.command()
@click.option(
    "--status", type=click.Choice([s.value for s in UploadStatus]), help="Only this status."
)
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def uploads(status: str | None, limit: int, as_json: bool) -> None:
    """Show recent uploads with their status and any error."""
    with session_scope() as session:
        found = service.list_uploads(
            session, status=UploadStatus(status) if status else None, limit=limit
        )
    rows = [{**upload_json(u), "attempts": u.attempts} for u in found]
    _emit_uploads(rows, ["upload_id", "status", "attempts", "uri", "error"], as_json, "no uploads")


@click.command()
@click.option("--concurrency", type=int, help="Task threads (default: twice the batch size).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(concurrency: int | None, loglevel: str) -> None:
    """Run a screening worker: one process, one model, many task threads."""
    from moderation.celery_app import app
    from moderation.screening.worker import get_screener

    settings = get_settings()
    # Load the model and bank index before taking any message, so failures show at start.
    screener = get_screener()
    click.echo(
        f"worker: model {screener.embedder.name} on {screener.embedder.device}, "
        f"{settings.resolved_streams()} stream(s) of batch {settings.resolved_batch_size()}, "
        f"queue {settings.queue}"
    )
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={concurrency or settings.resolved_concurrency()}",
            f"--queues={settings.queue}",
            f"--loglevel={loglevel}",
            "--hostname=screening@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sweep(as_json: bool) -> None:
    """Re-send uploads whose message or worker was lost (workers also do this periodically)."""
    from moderation.screening.recovery import sweep_once

    stuck = sweep_once()
    if as_json:
        emit_json({"requeued": stuck})
    else:
        click.echo(f"re-enqueued {len(stuck)} upload(s)")
