"""A worker killed mid-flight, or cut off from its database, loses nothing and duplicates
nothing."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from moderation.banks import service as banks
from moderation.db import session_scope
from moderation.embedding.models import Embedding
from moderation.images.hashing import sha256
from moderation.screening import service
from moderation.screening.cli import wait_until_final
from moderation.screening.models import Hit, Signal, Upload, UploadStatus
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


def _terminate_backends(application_name: str) -> int:
    with session_scope() as session:
        return len(
            session.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name"
                ),
                {"name": application_name},
            ).all()
        )


def test_dropped_database_connections_lose_nothing_and_duplicate_nothing(
    slow_server: str, tmp_path: Path
) -> None:
    """PostgreSQL drops every connection of a busy worker, again and again: claims and
    results in flight fail with their group commit, the tasks retry, and each upload ends
    screened once."""
    with session_scope() as session:
        bank = banks.create_bank(session, "dropped")
        banks.add_entries(session, bank, [banks.NewEntry(sha256=sha256(IMAGE))], added_by="t")
        uploads = [service.submit(session, f"{slow_server}/{i}.jpg")[0] for i in range(24)]
    ids = [u.id for u in uploads]
    name = f"faulty-worker-{os.getpid()}"
    env = {
        **TEST_ENV,
        "MODERATION_DATABASE_URL": f"{TEST_ENV['MODERATION_DATABASE_URL']}?application_name={name}",
        "MODERATION_QUEUE": QUEUE,
        "MODERATION_WORKER_CONCURRENCY": "8",
    }
    publish_screening(ids, queue=QUEUE)

    with WorkerProcess(tmp_path / "faulty.log", env) as worker:
        worker.wait_ready()
        terminated = 0
        deadline = time.monotonic() + 8
        while _count(UploadStatus.SCREENED, ids) < len(ids) // 2 and time.monotonic() < deadline:
            terminated += _terminate_backends(name)
            time.sleep(0.3)
        final = wait_until_final(ids, timeout_s=120)
        log = worker.log()

    assert terminated > 0
    assert "OperationalError" in log  # the faults reached the worker's tasks
    assert [u.status for u in final] == [UploadStatus.SCREENED] * len(ids)
    with session_scope() as session:
        # One hit (the banked SHA-256), two signals (SHA-256, PDQ), one embedding each.
        for table, per_upload in ((Hit, 1), (Signal, 2), (Embedding, 1)):
            rows = session.execute(
                select(table.upload_id, func.count())
                .where(table.upload_id.in_(ids))
                .group_by(table.upload_id)
            ).all()
            assert dict(rows) == dict.fromkeys(ids, per_upload), table.__tablename__
