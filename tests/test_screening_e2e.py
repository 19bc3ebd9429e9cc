"""The whole pipeline: CLI and service → Redis → a real worker process → PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, cast

import numpy as np
import pdqhash
import pytest
import redis
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import func, select, update

from moderation.main.cli import main
from moderation.review.models import Hit
from moderation.runtime import Runtime
from moderation.screening import service
from moderation.screening.cli import submit_uris, wait_until_final
from moderation.screening.models import Upload, UploadStatus
from moderation.worker.recovery import sweep_once
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS
from tests.images import animated_gif, decompression_bomb, encode, textured, write
from tests.servers import http_server
from tests.vectors import at_cosine_distance

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_db", "worker")]


def cli(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args), obj=TEST_RUNTIME, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if "--json" in args else result.output


def screen(*paths: Path | str) -> list[Upload]:
    ids = submit_uris(
        TEST_RUNTIME, [p if isinstance(p, str) else p.resolve().as_uri() for p in paths]
    )
    uploads = wait_until_final(TEST_RUNTIME, ids, timeout_s=60)
    assert all(u.status in service.FINAL_STATUSES for u in uploads), [u.status for u in uploads]
    return uploads


def hits_by_signal(upload_id: int) -> dict[str, dict[str, Any]]:
    return {h["signal"]: h for h in cli("hits", "--upload", str(upload_id), "--json")}


def test_copies_of_a_banked_image_are_hit(tmp_path: Path) -> None:
    original = textured(100)
    banked = write(tmp_path / "bad.jpg", encode(original, quality=95))
    reencoded = write(tmp_path / "reencoded.jpg", encode(Image.open(banked), quality=50))
    half = write(tmp_path / "half.png", encode(original.resize((320, 240)), "PNG"))
    unrelated = write(tmp_path / "unrelated.jpg", encode(textured(200)))
    cli("bank", "create", "known-bad")
    (entry,) = cli("bank", "add", "known-bad", str(banked), "--json")

    same, again, smaller, other = screen(banked, reencoded, half, unrelated)

    exact = hits_by_signal(same.id)
    assert set(exact) == {"sha256", "pdq", "clip"}
    assert all(
        h["bank_entry_id"] == entry["id"] and h["bank"] == "known-bad" for h in exact.values()
    )
    assert exact["sha256"]["distance"] == 0
    assert exact["pdq"]["distance"] == 0
    assert exact["clip"]["distance"] == pytest.approx(0, abs=1e-5)
    for copy in (again, smaller):
        copy_hits = hits_by_signal(copy.id)
        assert "sha256" not in copy_hits  # different bytes
        assert copy_hits["pdq"]["distance"] <= 31
        assert copy_hits["pdq"]["upload_uri"] == copy.uri
    assert not {"sha256", "pdq"} & set(hits_by_signal(other.id))
    assert (same.width, same.height, same.media_format, same.frame_count) == (640, 480, "JPEG", 1)


def test_clip_radius_boundary_through_the_worker(tmp_path: Path) -> None:
    image = write(tmp_path / "upload.png", encode(textured(300), "PNG"))
    cli("embed", str(image), "--out", str(tmp_path / "upload.npy"))
    anchor = np.load(tmp_path / "upload.npy")
    np.save(tmp_path / "near.npy", at_cosine_distance(anchor, 0.04, seed=1))
    np.save(tmp_path / "far.npy", at_cosine_distance(anchor, 0.06, seed=2))
    cli("bank", "create", "embeddings")
    (near,) = cli("bank", "add", "embeddings", "--embedding", str(tmp_path / "near.npy"), "--json")
    cli("bank", "add", "embeddings", "--embedding", str(tmp_path / "far.npy"), "--json")

    (upload,) = screen(image)

    (hit,) = cli("hits", "--upload", str(upload.id), "--json")
    assert (hit["bank_entry_id"], hit["signal"]) == (near["id"], "clip")
    assert hit["distance"] == pytest.approx(0.04, abs=1e-4)


def test_bad_input_fails_with_its_own_code_and_the_worker_carries_on(tmp_path: Path) -> None:
    bad = {
        "empty_file": write(tmp_path / "zero.jpg", b""),
        "truncated_image": write(tmp_path / "truncated.jpg", encode(textured(1))[:4000]),
        "unsupported_format": write(tmp_path / "text.jpg", b"this is text, not a JPEG\n" * 20),
        "decompression_bomb": write(tmp_path / "bomb.png", decompression_bomb()),
        "bad_dimensions": write(
            tmp_path / "thin.png", encode(Image.new("RGB", (1, 100_000)), "PNG")
        ),
        "not_found": tmp_path / "missing.jpg",
    }
    good = write(tmp_path / "good.jpg", encode(textured(2)))

    uploads = screen(*bad.values(), good)

    for (code, _), upload in zip(bad.items(), uploads, strict=False):
        assert (upload.status, upload.error_code) == (UploadStatus.FAILED, code), upload.uri
        assert upload.error_message
        assert upload.attempts == 1  # bad input is never retried
    assert uploads[-1].status is UploadStatus.SCREENED
    shown = {u["upload_id"]: u for u in cli("uploads", "--status", "failed", "--json")}
    assert shown[uploads[0].id]["error"]["code"] == "empty_file"


def _unacked_on(client: redis.Redis, queue: str) -> int:
    """Messages of `queue` taken and not yet acknowledged. Kombu keeps every queue's in one
    `unacked` hash per Redis db, as [message, exchange, routing key]: a message another
    test's killed worker left there (restored only after the visibility timeout) is not
    this queue's business."""
    entries = cast(dict[bytes, bytes], client.hgetall("unacked"))
    return sum(1 for value in entries.values() if json.loads(value)[2] == queue)


def _queue_drained(client: redis.Redis, timeout_s: float = 30) -> None:
    """Wait until every message is taken and acknowledged (acks_late: after the commit)."""
    queue = TEST_SETTINGS.queue
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.llen(queue) == 0 and _unacked_on(client, queue) == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(
        f"{client.llen(queue)} messages still queued, {_unacked_on(client, queue)} unacknowledged"
    )


def test_a_uri_outside_the_workers_prefixes_is_refused_naming_the_workers_list() -> None:
    """A producer with a wider allow-list than the worker's accepted the URI: the worker's
    refusal says what the worker allows, so the mismatch shows where it is stored."""
    with TEST_RUNTIME.session() as session:
        upload, _ = service.submit(session, "file:///srv/uploads/elsewhere.jpg")
    TEST_RUNTIME.producer.send_screening([upload.id])
    (done,) = wait_until_final(TEST_RUNTIME, [upload.id], timeout_s=60)
    assert (done.status, done.error_code) == (UploadStatus.FAILED, "uri_refused")
    worker_prefixes = ", ".join(TEST_SETTINGS.allowed_uri_prefixes)
    assert done.error_message is not None
    assert done.error_message.endswith(f"(this worker's: {worker_prefixes})")


def test_redelivered_event_creates_no_duplicate_hits(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    image = write(tmp_path / "bad.jpg", encode(textured(400)))
    cli("bank", "create", "redelivery")
    cli("bank", "add", "redelivery", str(image), "--json")
    with TEST_RUNTIME.session() as session:
        upload, _ = service.submit(session, image.resolve().as_uri())
    # The same event three times at once, then twice more after it has been screened.
    TEST_RUNTIME.producer.send_screening([upload.id] * 3)
    wait_until_final(TEST_RUNTIME, [upload.id], timeout_s=60)
    TEST_RUNTIME.producer.send_screening([upload.id] * 2)
    _queue_drained(redis_client)

    with TEST_RUNTIME.session() as session:
        hits = session.scalars(select(Hit).where(Hit.upload_id == upload.id)).all()
    assert sorted(h.signal.value for h in hits) == ["clip", "pdq", "sha256"]


class _FlakyImageServer(BaseHTTPRequestHandler):
    """Answers 503 to the first request for each path, then the image."""

    image = encode(textured(500))
    seen: set[str] = set()

    def do_GET(self) -> None:
        if self.path not in self.seen or self.path.startswith("/always-down"):
            self.seen.add(self.path)
            self.send_response(503)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[str]:
    with http_server(_FlakyImageServer) as url:
        yield url


def test_transient_faults_are_retried_with_backoff_then_fail_visibly(flaky_server: str) -> None:
    recovers, never = screen(f"{flaky_server}/recovers.jpg", f"{flaky_server}/always-down.jpg")
    assert (recovers.status, recovers.attempts, recovers.error_code) == (
        UploadStatus.SCREENED,
        2,
        None,
    )
    assert (never.status, never.error_code) == (UploadStatus.FAILED, "fetch_unavailable")
    assert never.attempts == TEST_SETTINGS.max_attempts
    assert "gave up after" in (never.error_message or "")


def test_an_upload_whose_message_was_lost_is_recovered_by_the_sweeper(
    tmp_path: Path, runtime: Runtime
) -> None:
    image = write(tmp_path / "orphan.jpg", encode(textured(600)))
    with TEST_RUNTIME.session() as session:
        # Committed, but the message was never sent (say the producer died right here).
        upload, _ = service.submit(session, image.resolve().as_uri())
        session.flush()
        session.execute(
            update(Upload)
            .where(Upload.id == upload.id)
            .values(enqueued_at=func.now() - timedelta(seconds=TEST_SETTINGS.stuck_after_s + 1))
        )
    # The test worker's own sweeper (every `sweep_interval_s`) may hold the sweep lock at
    # this moment, and this sweep then finds nothing; or it may send the upload first.
    deadline = time.monotonic() + 30
    while not (resent := sweep_once(runtime)) and not _sent_again(upload.id):
        assert time.monotonic() < deadline, "no sweeper sent the lost upload again"
        time.sleep(0.2)
    assert resent in ([upload.id], [])  # [] when the worker's sweeper sent it first
    (done,) = wait_until_final(TEST_RUNTIME, [upload.id], timeout_s=60)
    assert done.status is UploadStatus.SCREENED


def _sent_again(upload_id: int) -> bool:
    """Whether a sweeper has marked the upload as sent again: `enqueued_at` set to its now,
    where the test had put it `stuck_after_s` and more in the past."""
    stuck_after = timedelta(seconds=TEST_SETTINGS.stuck_after_s)
    with TEST_RUNTIME.session() as session:
        recent = select(Upload.enqueued_at > func.now() - stuck_after).where(Upload.id == upload_id)
        return bool(session.scalar(recent))


def test_animated_images_match_on_a_later_frame(tmp_path: Path) -> None:
    # Frame 5 of 10 is not among the four sampled for CLIP; PDQ covers every frame.
    frames = [textured(700 + i, (240, 180)) for i in range(10)]
    banked = write(tmp_path / "frame5.png", encode(frames[5], "PNG"))
    gif = write(tmp_path / "animation.gif", animated_gif([f.convert("P") for f in frames]))
    cli("bank", "create", "frames")
    cli("bank", "add", "frames", str(banked), "--json")

    (upload,) = screen(gif)

    assert upload.frame_count == 10
    pdq_hit = hits_by_signal(upload.id)["pdq"]
    assert pdq_hit["frame_index"] == 5


def test_a_photo_stored_sideways_matches_a_hash_list_made_without_orientation(
    tmp_path: Path,
) -> None:
    """Partners' PDQ lists (ThreatExchange's hasher, HMA) hash the pixels as stored; a
    phone photo is often stored sideways with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = write(tmp_path / "portrait.jpg", encode(textured(800, (400, 300)), exif=exif))
    vector, _ = pdqhash.compute(np.asarray(Image.open(photo).convert("RGB")))  # as stored
    partner_hash = np.packbits(vector.astype(np.uint8)).tobytes().hex()
    cli("bank", "create", "shared-list")
    cli("bank", "add", "shared-list", "--pdq", partner_hash, "--json")

    (upload,) = screen(photo)

    assert (upload.width, upload.height) == (400, 300)  # as stored; screened upright
    pdq_hit = hits_by_signal(upload.id)["pdq"]
    assert pdq_hit["distance"] == 0
    assert pdq_hit["frame_index"] == 0
