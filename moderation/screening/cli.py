"""`moderation submit | hits | uploads | worker | sweep`."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from moderation.audit.service import cli_actor
from moderation.config import Settings
from moderation.console import emit_json, emit_table, limit_options, say_if_cut
from moderation.images.errors import NotFound
from moderation.images.fetch import fetch, to_uri
from moderation.images.hashing import sha256
from moderation.images.sniff import HEAD_BYTES, why_not_an_image
from moderation.images.uri_policy import UriPolicy
from moderation.runtime import Runtime, pass_runtime
from moderation.screening import service
from moderation.screening.models import Upload, UploadStatus
from moderation.screening.service import NewUpload
from moderation.screening.submission import check_uris, record_and_announce
from moderation.screening.waiting import Tally, wait_for, why_stalled

# Skipped files listed one by one, before a count of the rest.
SKIPPED_SHOWN = 20
# Without a terminal, a progress line at most this often.
PROGRESS_LINE_EVERY_S = 5.0


@dataclass
class Expansion:
    """What a submission names: the URIs to submit, and the files of directories left out."""

    uris: list[str] = field(default_factory=list)
    # (path, why) for each file of a directory that was not submitted.
    skipped: list[tuple[str, str]] = field(default_factory=list)


def expand(paths_or_uris: tuple[str, ...]) -> Expansion:
    """URIs and files as given; directories expand to the images inside them, recursively,
    chosen by their first bytes (the worker still decodes and checks everything)."""
    expansion = Expansion()
    for item in paths_or_uris:
        path = Path(item)
        if "://" not in item and path.is_dir():
            _expand_directory(path, expansion)
        else:
            expansion.uris.append(to_uri(item))
    return expansion


def _expand_directory(directory: Path, expansion: Expansion) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_dir():
            continue
        if any(part.startswith(".") for part in path.relative_to(directory).parts):
            expansion.skipped.append((str(path), "hidden"))
            continue
        if not path.is_file():  # never opened: reading a FIFO blocks
            expansion.skipped.append((str(path), "not a regular file"))
            continue
        try:
            with path.open("rb") as handle:
                head = handle.read(HEAD_BYTES)
        except OSError as error:
            expansion.skipped.append((str(path), f"unreadable: {error.strerror}"))
            continue
        reason = why_not_an_image(head)
        if reason is None:
            expansion.uris.append(to_uri(str(path)))
        else:
            expansion.skipped.append((str(path), reason))


def report_skipped(skipped: list[tuple[str, str]]) -> None:
    if not skipped:
        return
    click.echo(f"skipped {len(skipped)} file(s) in the directories given:", err=True)
    for path, reason in skipped[:SKIPPED_SHOWN]:
        click.echo(f"  {path}: {reason}", err=True)
    if len(skipped) > SKIPPED_SHOWN:
        click.echo(f"  and {len(skipped) - SKIPPED_SHOWN} more", err=True)


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


def refuse_missing_files(settings: Settings, uris: list[str]) -> None:
    """`NotFound` for the first allowed local file that does not exist, said at once rather
    than by a failed upload later; `UriRefused` for a file the policy refuses, in the same
    words whether it exists or not."""
    policy = UriPolicy.from_settings(settings)
    for uri in uris:
        if uri.startswith("file:"):
            path, _ = policy.allowed_file(uri)
            if not os.path.isfile(path):
                problem = "is not a regular file" if os.path.exists(path) else "does not exist"
                raise NotFound(f"{path} {problem}; nothing was submitted")


def declared_bytes(settings: Settings, uri: str) -> bytes:
    """SHA-256 of a local file's bytes now, so that the upload names these bytes: the worker
    refuses others, and the external id cannot be reused for another image."""
    data = fetch(
        uri,
        policy=UriPolicy.from_settings(settings),
        max_bytes=settings.max_bytes,
        timeout_s=settings.fetch_timeout_s,
    )
    return sha256(data)


def submit_uris(
    runtime: Runtime,
    uris: list[str],
    external_id: str | None = None,
    declared_sha256: bytes | None = None,
) -> list[int]:
    """Check every URI, then record uploads, commit and publish, `SUBMIT_CHUNK` to a
    transaction (the steps of `submission.accept`, which `POST /v1/uploads` takes).

    Raises `UrisRefused` if the fetch policy refuses any URI (nothing is recorded then), and
    `service.ExternalIdConflict` if the external id names another event.
    """
    if (external_id is not None or declared_sha256 is not None) and len(uris) != 1:
        raise ValueError("an external id or declared bytes name exactly one upload")
    submitter = cli_actor()
    uploads = [NewUpload(uri, external_id, declared_sha256, submitted_by=submitter) for uri in uris]
    # All checked before any chunk is recorded: a refusal leaves nothing half-submitted.
    uploads = check_uris(uploads, UriPolicy.from_settings(runtime.settings))
    upload_ids: list[int] = []
    for start in range(0, len(uploads), SUBMIT_CHUNK):
        accepted = record_and_announce(runtime, uploads[start : start + SUBMIT_CHUNK])
        upload_ids += [a.upload_id for a in accepted]
    return upload_ids


def wait_until_final(runtime: Runtime, upload_ids: list[int], timeout_s: float) -> list[Upload]:
    wait_for(runtime, upload_ids, timeout_s=timeout_s)
    with runtime.session() as session:
        return service.get_uploads(session, upload_ids)


class Progress:
    """`--wait`'s progress on stderr: a bar on a terminal, a line every few seconds
    otherwise, none with --json; and, with or without, why nothing moves when it does not."""

    def __init__(self, total: int, *, quiet: bool) -> None:
        self._quiet = quiet
        self._line_at: float | None = None
        self._bar: Any = None
        if not quiet and sys.stderr.isatty():
            self._bar = click.progressbar(
                length=total, label="screening", file=sys.stderr, show_pos=True
            ).__enter__()

    def update(self, tally: Tally) -> None:
        if self._quiet:
            return
        if self._bar is not None:
            self._bar.label = f"{tally.screened} screened, {tally.failed} failed"
            self._bar.update(tally.finished - self._bar.pos)
            return
        now = time.monotonic()
        done = tally.finished == tally.total
        if self._line_at is None or now - self._line_at >= PROGRESS_LINE_EVERY_S or done:
            click.echo(tally.summary(), err=True)
            self._line_at = now

    def stalled(self, cause: str) -> None:
        click.echo(("\n" if self._bar is not None else "") + f"waiting: {cause}", err=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


class SomeFailed(click.ClickException):
    exit_code = 1


class TimedOut(click.ClickException):
    exit_code = 3


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


def _show_uploads(
    runtime: Runtime,
    upload_ids: list[int],
    wait: bool,
    timeout: float,
    as_json: bool,
    stall_after: float,
) -> None:
    final: Tally | None = None
    if wait:
        progress = Progress(len(set(upload_ids)), quiet=as_json)
        try:
            final = wait_for(
                runtime,
                upload_ids,
                timeout_s=timeout,
                on_progress=progress.update,
                on_stall=progress.stalled,
                stall_after_s=stall_after,
            )
        finally:
            progress.close()
    with runtime.session() as session:
        uploads = service.get_uploads(session, upload_ids)
    rows = [upload_json(u) for u in uploads]
    _emit_uploads(rows, ["upload_id", "status", "uri", "error"], as_json, "nothing submitted")
    if final is None:
        return
    if final.finished < final.total:
        raise TimedOut(
            f"{final.total - final.finished} of {final.total} upload(s) not finished after "
            f"{timeout:g} s; {why_stalled(runtime, final)}"
        )
    if final.failed:
        raise SomeFailed(
            f"{final.failed} of {final.total} upload(s) failed (the error column says why)"
        )


_wait_options = [
    click.option("--wait", is_flag=True, help="Wait until every upload is screened or failed."),
    click.option("--timeout", default=300.0, show_default=True, help="Seconds --wait waits."),
    click.option(
        "--stall-after",
        default=30.0,
        show_default=True,
        help="Say why, when --wait sees nothing move for this many seconds.",
    ),
]


def wait_options(command: Any) -> Any:
    for option in reversed(_wait_options):
        command = option(command)
    return command


@click.command()
@click.argument("paths_or_uris", nargs=-1, required=True)
@click.option("--external-id", help="The caller's id for the upload (one upload only).")
@click.option(
    "--sha256",
    "sha256_hex",
    help="SHA-256 of the image's bytes; the worker refuses other bytes. Local files with "
    "--external-id are hashed at submission when this is not given.",
)
@wait_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one object per upload.")
@pass_runtime
def submit(
    runtime: Runtime,
    paths_or_uris: tuple[str, ...],
    external_id: str | None,
    sha256_hex: str | None,
    wait: bool,
    timeout: float,
    stall_after: float,
    as_json: bool,
) -> None:
    """Queue images for screening: paths, directories, file:// or http(s):// URIs.

    Only URIs that MODERATION_ALLOWED_URI_PREFIXES allows are accepted, and local files
    must exist. Directories are searched recursively for images by their content (not
    their names); what is left out is listed on stderr.

    \b
    Exit status with --wait: 0 all screened; 1 some failed; 2 usage error;
    3 timed out (not all finished); 4 PostgreSQL or Redis unreachable.
    """
    declared = _parse_sha256(sha256_hex)
    expansion = expand(paths_or_uris)
    report_skipped(expansion.skipped)
    uris = expansion.uris
    if not uris:
        raise click.UsageError("no images found in the given paths")
    if (external_id or declared) and len(uris) > 1:
        raise click.UsageError("--external-id and --sha256 name one upload; give one image")
    # Before anything is recorded; the worker checks again when it fetches. A refusal says
    # which rule refused, never whether a refused file exists.
    refuse_missing_files(runtime.settings, uris)
    if external_id and declared is None and urlsplit(uris[0]).scheme == "file":
        declared = declared_bytes(runtime.settings, uris[0])
    upload_ids = submit_uris(runtime, uris, external_id, declared)
    _show_uploads(runtime, upload_ids, wait, timeout, as_json, stall_after)


@click.command()
@click.argument("upload_ids", nargs=-1, required=True, type=int)
@wait_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one object per upload.")
@pass_runtime
def resubmit(
    runtime: Runtime,
    upload_ids: tuple[int, ...],
    wait: bool,
    timeout: float,
    stall_after: float,
    as_json: bool,
) -> None:
    """Screen failed uploads again from scratch. Recorded in the audit log.

    \b
    Exit status with --wait: 0 all screened; 1 some failed; 2 usage error;
    3 timed out (not all finished); 4 PostgreSQL or Redis unreachable.
    """
    actor = cli_actor()
    try:
        with runtime.session() as session:
            for upload_id in upload_ids:
                service.resubmit(session, upload_id, actor=actor)
    except (service.UploadNotFound, service.NotResubmittable) as error:
        raise click.ClickException(f"{error}; nothing was resubmitted") from None
    runtime.producer.send_screening(list(upload_ids))
    _show_uploads(runtime, list(upload_ids), wait, timeout, as_json, stall_after)


@click.command()
@click.option(
    "--status", type=click.Choice([s.value for s in UploadStatus]), help="Only this status."
)
@limit_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def uploads(
    runtime: Runtime, status: str | None, limit: int, show_all: bool, as_json: bool
) -> None:
    """Show recent uploads, newest first, with their status and any error."""
    wanted = UploadStatus(status) if status else None
    with runtime.session() as session:
        found = service.list_uploads(session, status=wanted, limit=None if show_all else limit)
        cut = not show_all and len(found) == limit
        total = service.count_uploads(session, status=wanted) if cut else len(found)
    rows = [{**upload_json(u), "attempts": u.attempts} for u in found]
    _emit_uploads(rows, ["upload_id", "status", "attempts", "uri", "error"], as_json, "no uploads")
    say_if_cut(len(found), total, "uploads", as_json)
