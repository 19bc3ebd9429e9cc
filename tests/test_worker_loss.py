"""A worker killed mid-flight loses nothing and duplicates nothing."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from sqlalchemy import func, select

from moderation.banks import service as banks
from moderation.db import session_scope
from moderation.images.hashing import sha256
from moderation.screening import service
from moderation.screening.cli import wait_until_final
from moderation.screening.models import Hit, Upload, UploadStatus
from moderation.screening.tasks import publish_screening
from moderation.screening.worker_process import WorkerProcess
from tests.conftest import TEST_ENV
from tests.images import encode, textured
from tests.servers import http_server

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_db")]

IMAGE = encode(textured(900))
QUEUE = f"screening-loss-{os.getpid()}"


class _SlowImage(BaseHTTPRequestHandler):
    """Serves the image after a pause, so that uploads are in flight when the worker dies."""

    def do_GET(self) -> None:
        time.sleep(1.5)
        self.send_response(200)
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[str]:
    with http_server(_SlowImage) as url:
        yield url


def _count(status: UploadStatus, ids: list[int]) -> int:
    with session_scope() as session:
        return (
            session.scalar(select(func.count()).where(Upload.id.in_(ids), Upload.status == status))
            or 0
        )


def test_killed_worker_loses_nothing_and_duplicates_nothing(
    slow_server: str, tmp_path: Path
) -> None:
    with session_scope() as session:
        bank = banks.create_bank(session, "loss")
        banks.add_entries(session, bank, [banks.NewEntry(sha256=sha256(IMAGE))], added_by="t")
        uploads = [service.submit(session, f"{slow_server}/{i}.jpg")[0] for i in range(24)]
    ids = [u.id for u in uploads]
    env = {**TEST_ENV, "MODERATION_QUEUE": QUEUE, "MODERATION_WORKER_CONCURRENCY": "8"}
    publish_screening(ids, queue=QUEUE)

    with WorkerProcess(tmp_path / "doomed.log", env) as doomed:
        doomed.wait_ready()
        deadline = time.monotonic() + 30
        while _count(UploadStatus.PROCESSING, ids) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _count(UploadStatus.PROCESSING, ids) >= 4
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait()
    assert _count(UploadStatus.SCREENED, ids) < len(ids)  # it died with work in hand

    # A fresh worker: its sweeper finds what the dead one held and what it never reached.
    recovery = {**env, "MODERATION_STUCK_AFTER_S": "2", "MODERATION_SWEEP_INTERVAL_S": "1"}
    with WorkerProcess(tmp_path / "recovery.log", recovery) as survivor:
        survivor.wait_ready()
        final = wait_until_final(ids, timeout_s=120)

    assert [u.status for u in final] == [UploadStatus.SCREENED] * len(ids)
    with session_scope() as session:
        hits = session.execute(
            select(Hit.upload_id, func.count())
            .where(Hit.upload_id.in_(ids))
            .group_by(Hit.upload_id)
        ).all()
    assert dict(hits) == {upload_id: 1 for upload_id in ids}
