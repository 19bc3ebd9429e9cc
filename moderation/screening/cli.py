"""`moderation submit | hits | uploads | worker | sweep`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from moderation.audit.service import cli_actor
from moderation.config import get_settings
from moderation.console import emit_json, emit_table
from moderation.db import session_scope
from moderation.images.errors import IntakeError
from moderation.images.fetch import fetch, to_uri
from moderation.images.hashing import sha256
from moderation.images.uri_policy import UriPolicy
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
        # An animation hashed on a sample of its frames says so.
        "frames_hashed": upload.frames_hashed,
        "frame_count": upload.frame_count,
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


def accept_uris(uris: list[str], policy: UriPolicy | None = None) -> list[str]:
    """The URIs in canonical form, if the fetch policy allows every one of them; else
    `UriRefused` for the first it refuses, and nothing is accepted. Workers check again
    when they fetch (a host's addresses can change in between)."""
    policy = policy or UriPolicy.from_settings(get_settings())
    return [policy.check(uri) for uri in uris]


def declared_bytes(uri: str, policy: UriPolicy | None = None) -> bytes:
    """SHA-256 of a local file's bytes now, so that the upload names these bytes: the worker
    refuses others, and the external id cannot be reused for another image."""
    settings = get_settings()
    data = fetch(
        uri,
        policy=policy or UriPolicy.from_settings(settings),
        max_bytes=settings.max_bytes,
        timeout_s=settings.fetch_timeout_s,
    )
    return sha256(data)


def submit_uris(
    uris: list[str], external_id: str | None = None, declared_sha256: bytes | None = None
) -> list[int]:
    """Record uploads, commit, then publish: a message is never sent for an uncommitted row.

    Raises `UriRefused` if the fetch policy refuses any URI (nothing is recorded then), and
    `service.ExternalIdConflict` if the external id names another event.
    """
    from moderation.screening.tasks import publish_screening

    uris = accept_uris(uris)
    if external_id is not None or declared_sha256 is not None:
        if len(uris) != 1:
            raise ValueError("an external id or declared bytes name exactly one upload")
        with session_scope() as session:
            upload, created = service.submit(session, uris[0], external_id, declared_sha256)
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


def _parse_sha256(value: str | None) -> bytes | None:
    if value is None:
        return None
    try:
        digest = bytes.fromhex(value)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise click.BadParameter("expected 64 hexadecimal digits", param_hint="--sha256")
    return digest


def _show_uploads(upload_ids: list[int], wait: bool, timeout: float, as_json: bool) -> None:
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
@click.argument("paths_or_uris", nargs=-1, required=True)
@click.option("--external-id", help="The caller's id for the upload (one upload only).")
@click.option(
    "--sha256",
    "sha256_hex",
    help="SHA-256 of the image's bytes; the worker refuses other bytes. Local files with "
    "--external-id are hashed at submission when this is not given.",
)
@click.option("--wait", is_flag=True, help="Wait until every upload is screened or failed.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one object per upload.")
def submit(
    paths_or_uris: tuple[str, ...],
    external_id: str | None,
    sha256_hex: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Queue images for screening: paths, directories, file:// or http(s):// URIs.

    Only URIs that MODERATION_ALLOWED_URI_PREFIXES allows are accepted.
    """
    declared = _parse_sha256(sha256_hex)
    uris = expand(paths_or_uris)
    if not uris:
        raise click.UsageError("no images found in the given paths")
    if (external_id or declared) and len(uris) > 1:
        raise click.UsageError("--external-id and --sha256 name one upload; give one image")
    try:
        if external_id and declared is None and urlsplit(uris[0]).scheme == "file":
            declared = declared_bytes(uris[0])
        upload_ids = submit_uris(uris, external_id, declared)
    except (IntakeError, service.ExternalIdConflict) as error:
        # A refusal says which rule refused, never whether a refused file exists.
        raise click.ClickException(str(error)) from None
    _show_uploads(upload_ids, wait, timeout, as_json)


@click.command()
@click.argument("upload_ids", nargs=-1, required=True, type=int)
@click.option("--wait", is_flag=True, help="Wait until every upload is screened or failed.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one object per upload.")
def resubmit(upload_ids: tuple[int, ...], wait: bool, timeout: float, as_json: bool) -> None:
    """Screen failed uploads again from scratch. Recorded in the audit log."""
    from moderation.screening.tasks import publish_screening

    actor = cli_actor()
    try:
        with session_scope() as session:
            for upload_id in upload_ids:
                service.resubmit(session, upload_id, actor=actor)
    except (service.UploadNotFound, service.NotResubmittable) as error:
        raise click.ClickException(f"{error}; nothing was resubmitted") from None
    publish_screening(list(upload_ids))
    _show_uploads(list(upload_ids), wait, timeout, as_json)


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
@click.option(
    "--concurrency",
    type=int,
    help="Uploads screened at once (default: twice the batch size times the streams).",
)
@click.option("--loglevel", default="INFO", show_default=True)
def worker(concurrency: int | None, loglevel: str) -> None:
    """Run a screening worker: one process, one model, many task threads."""
    from moderation.celery_app import app
    from moderation.images.memory import configure_allocator
    from moderation.screening.worker import get_screener

    # Before any thread exists: arenas made by then would stay (see images/memory.py).
    configure_allocator()
    settings = get_settings()
    concurrency = concurrency or settings.resolved_concurrency()
    # Load the model and bank index and start the intake processes before taking any
    # message, so failures show at start.
    screener = get_screener(slots=concurrency)
    click.echo(
        f"worker: model {screener.embedder.name} on {screener.embedder.device}, "
        f"{settings.resolved_streams()} stream(s) of batch {settings.resolved_batch_size()}, "
        f"{settings.resolved_intake_processes()} intake process(es), "
        f"{concurrency} uploads at once, queue {settings.queue}"
    )
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            # Messages in flight. Most carry 16 uploads (see `UPLOADS_PER_MESSAGE`), claimed
            # together and screened as the screener's threads come free; half as many
            # messages as those threads keeps them busy without claiming far more than
            # they can screen soon, and still fills a batch per stream with messages of
            # one upload each.
            f"--concurrency={max(1, concurrency // 2)}",
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
