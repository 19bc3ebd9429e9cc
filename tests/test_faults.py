"""Faults of the services themselves, on throwaway instances started here (never the
machine's shared PostgreSQL or Redis, which other test runs use): PostgreSQL stopped for
a while during screening, and Redis restarted empty with uploads queued."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from moderation import schema
from moderation.banks import service as banks
from moderation.images.hashing import sha256
from moderation.messages import SCREEN_UPLOAD, create_celery
from moderation.review.models import Hit
from moderation.screening import service
from moderation.screening.models import Upload, UploadStatus, Worker
from moderation.worker.child import WorkerProcess
from tests.conftest import TEST_ENV, settings_for_tests
from tests.images import encode, textured
from tests.redis_server import RedisServer
from tests.servers import http_server, image_handler

pytestmark = pytest.mark.e2e

IMAGE = encode(textured(901, (160, 120)))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _submit(engine: Engine, bank_name: str, base_url: str, count: int) -> list[int]:
    """Uploads of the banked image, each to be hit once (SHA-256)."""
    with Session(engine) as session, session.begin():
        bank = banks.create_bank(session, bank_name)
        banks.add_entries(session, bank, [banks.NewEntry(sha256=sha256(IMAGE))], added_by="t")
        return service.submit_many(session, [f"{base_url}/{i}.jpg" for i in range(count)])


def _count(engine: Engine, ids: list[int], *statuses: UploadStatus) -> int:
    with Session(engine) as session:
        query = select(func.count()).where(Upload.id.in_(ids), Upload.status.in_(statuses))
        return session.scalar(query) or 0


def _wait_until_final(engine: Engine, ids: list[int], timeout_s: float) -> list[Upload]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _count(engine, ids, *service.FINAL_STATUSES) == len(ids):
            break
        time.sleep(0.2)
    with Session(engine) as session:
        return list(session.scalars(select(Upload).where(Upload.id.in_(ids)).order_by(Upload.id)))


def _hits_per_upload(engine: Engine, ids: list[int]) -> dict[int, int]:
    with Session(engine) as session:
        rows = session.execute(
            select(Hit.upload_id, func.count())
            .where(Hit.upload_id.in_(ids))
            .group_by(Hit.upload_id)
        ).all()
    return {upload_id: count for upload_id, count in rows}


# PostgreSQL stopped and started again.


@dataclass
class Cluster:
    """A PostgreSQL cluster of its own, in a temporary directory."""

    bin_dir: Path
    data_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/moderation_faults"

    def pg_ctl(self, *args: str) -> None:
        _as_postgres(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir / "db"), *args)

    def start(self) -> None:
        # No fsync: the data is thrown away, and a stop or start must not wait on the disk.
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -F"
        self.pg_ctl("-l", str(self.data_dir / "server.log"), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "-w", "stop")


def _as_postgres(*command: str) -> None:
    """initdb and pg_ctl refuse to run as root: as root, run them as `postgres`."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)


@pytest.fixture
def own_postgres() -> Iterator[Cluster]:
    bin_dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[4]))
    if not bin_dirs or not os.path.exists(os.path.join(bin_dirs[-1], "initdb")):
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: initdb refuses to run as root")
    data_dir = Path(tempfile.mkdtemp(prefix="moderation-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data_dir, "postgres", "postgres")
    cluster = Cluster(Path(bin_dirs[-1]), data_dir, _free_port())
    try:
        _as_postgres(
            str(cluster.bin_dir / "initdb"),
            "-D",
            str(data_dir / "db"),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        )
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            cluster.stop("immediate")
        shutil.rmtree(data_dir, ignore_errors=True)


def test_postgres_stopped_during_screening_loses_nothing_and_duplicates_nothing(
    own_postgres: Cluster, tmp_path: Path
) -> None:
    """The database goes away for several seconds under a busy worker and comes back:
    claims and results in flight fail, tasks back off and retry, heartbeats fail and
    resume, the worker is never taken for dead, and every upload ends screened once."""
    url = own_postgres.url
    schema.upgrade(url)
    engine = create_engine(url, poolclass=NullPool)
    redis_url = TEST_ENV["MODERATION_REDIS_URL"]
    queue = f"screening-pg-down-{os.getpid()}"
    env = {
        **TEST_ENV,
        "MODERATION_DATABASE_URL": url,
        "MODERATION_QUEUE": queue,
        "MODERATION_WORKER_CONCURRENCY": "8",
        # Four fetches at once from the slow server (the default on two cores is one).
        "MODERATION_INTAKE_PROCESSES": "4",
        "MODERATION_WORKER_HEARTBEAT_S": "0.5",
        "MODERATION_WORKER_DEAD_AFTER_S": "2",
        "MODERATION_SWEEP_INTERVAL_S": "0.5",
        # Only the dead-worker rule could send anything again within the test; the worker
        # lives throughout, so nothing should be.
        "MODERATION_STUCK_AFTER_S": "3600",
    }
    app = create_celery(settings_for_tests(redis_url=redis_url))
    with (
        http_server(image_handler(IMAGE, 0.5)) as base_url,
        WorkerProcess(tmp_path / "w.log", env) as worker,
    ):
        ids = _submit(engine, "pg-down", base_url, 32)
        worker.wait_ready()
        with app.producer_or_acquire() as producer:
            for upload_id in ids:
                app.send_task(SCREEN_UPLOAD, args=(upload_id,), queue=queue, producer=producer)
        deadline = time.monotonic() + 60
        while _count(engine, ids, UploadStatus.SCREENED) < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        own_postgres.stop("fast")
        # Down until the outage has reached the tasks (which then retry with backoff) and
        # the heartbeat: what the assertions below look for, waited for rather than hoped.
        _wait_for_log(worker, ["OperationalError", "heartbeat failed"], timeout_s=60)
        own_postgres.start()
        final = _wait_until_final(engine, ids, timeout_s=90)
        assert worker.process.poll() is None  # it rode out the outage
        log = worker.log()
    app.close()

    assert [u.status for u in final] == [UploadStatus.SCREENED] * len(ids)
    assert _hits_per_upload(engine, ids) == dict.fromkeys(ids, 1)
    assert max(u.attempts for u in final) <= 2  # a claim lost to the outage, then one more
    assert "OperationalError" in log  # the outage reached the tasks, which retried
    assert "heartbeat failed" in log
    assert "heartbeat recorded again" in log
    assert "re-sending" not in log  # right after the restart, silence is not death
    with Session(engine) as session:
        (stopped,) = session.scalars(select(Worker.stopped_at)).all()
    assert stopped is not None  # a clean stop, recorded after the outage
    engine.dispose()


def _wait_for_log(worker: WorkerProcess, needles: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(needle in worker.log() for needle in needles):
        assert time.monotonic() < deadline, f"the worker never logged all of {needles}"
        time.sleep(0.1)


# Redis restarted empty.


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH")
    server = RedisServer(_free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.usefixtures("clean_db")
def test_redis_restarted_empty_loses_nothing_and_resends_each_upload_once(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """A busy worker has a backlog queued behind it when Redis dies and comes back empty:
    every queued message is gone. The sweeper sends each lost upload again once (the
    backlog it rebuilds is not mistaken for more lost messages), and everything ends
    screened, once, with no upload failed by repeated claims."""
    database_url = TEST_ENV["MODERATION_DATABASE_URL"]
    engine = create_engine(database_url, poolclass=NullPool)
    queue = f"screening-redis-restart-{os.getpid()}"
    concurrency = 2
    env = {
        **TEST_ENV,
        "MODERATION_REDIS_URL": own_redis.url,
        "MODERATION_QUEUE": queue,
        "MODERATION_WORKER_CONCURRENCY": str(concurrency),
        # Few fetches in flight too: each takes a task thread of its own, and the backlog
        # must stay queued on the broker, not taken.
        "MODERATION_WORKER_FETCHES": str(concurrency),
        "MODERATION_WORKER_HEARTBEAT_S": "0.5",
        "MODERATION_WORKER_DEAD_AFTER_S": "2",
        "MODERATION_SWEEP_INTERVAL_S": "0.5",
        # Far less than the backlog takes to drain: judged by age alone, each sweep would
        # send the whole waiting backlog again.
        "MODERATION_STUCK_AFTER_S": "3",
    }
    app = create_celery(settings_for_tests(redis_url=own_redis.url))
    with (
        http_server(image_handler(IMAGE, 0.25)) as base_url,
        WorkerProcess(tmp_path / "w.log", env) as worker,
    ):
        ids = _submit(engine, "redis-restart", base_url, 120)
        worker.wait_ready()
        with app.producer_or_acquire() as producer:
            for upload_id in ids:
                app.send_task(SCREEN_UPLOAD, args=(upload_id,), queue=queue, producer=producer)
        deadline = time.monotonic() + 60
        while _count(engine, ids, UploadStatus.SCREENED) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        own_redis.kill()
        lost = _count(engine, ids, UploadStatus.QUEUED)
        time.sleep(1)
        own_redis.start()
        restarted_at = time.monotonic()
        final = _wait_until_final(engine, ids, timeout_s=120)
        recovery_s = time.monotonic() - restarted_at
        assert worker.process.poll() is None  # it rode out the outage
        log = worker.log()
    app.close()

    resent = sum(int(n) for n in re.findall(r"re-sending (\d+) lost upload", log))
    print(f"{lost} queued messages lost; {resent} re-sent; all final {recovery_s:.1f} s later")
    assert lost >= 90  # a real backlog was lost
    assert [u.status for u in final] == [UploadStatus.SCREENED] * len(ids)
    assert _hits_per_upload(engine, ids) == dict.fromkeys(ids, 1)
    assert max(u.attempts for u in final) == 1  # no upload claimed twice
    # Each lost upload once; the few in flight at the restart may be sent again too.
    assert lost <= resent <= lost + concurrency
    engine.dispose()
