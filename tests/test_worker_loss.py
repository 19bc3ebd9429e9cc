"""A worker killed mid-flight, or cut off from its database, loses nothing and duplicates
nothing."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from moderation.banks import service as banks
from moderation.embedding.models import Embedding
from moderation.images.hashing import sha256
from moderation.review.models import Hit
from moderation.runtime import Runtime
from moderation.screening import service
from moderation.screening.cli import wait_until_final
from moderation.screening.models import Signal, Upload, UploadStatus, Worker
from moderation.worker.child import WorkerProcess, children_by_parent
from tests.conftest import TEST_ENV, TEST_RUNTIME
from tests.images import encode, textured
from tests.servers import http_server, image_handler

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_db")]

IMAGE = encode(textured(900))
# Each test its own queue: a killed worker's unacknowledged messages stay in Redis, and
# another test's worker must not be handed them.
QUEUE = f"screening-loss-{os.getpid()}"
# Set when the intake processes fetched, so that four fetched at once (the default on two
# cores is one: 24 uploads took 36 s of 1.5 s). The worker's screening threads fetch now
# (`worker/intake/fetches.py`); four processes still spread the decodes.
INTAKE_PROCESSES = "4"


@pytest.fixture
def slow_server() -> Iterator[str]:
    """Serves the image after 1.5 s, so that uploads are in flight when a process dies."""
    with http_server(image_handler(IMAGE, 1.5)) as url:
        yield url


def _count(status: UploadStatus, ids: list[int], held_by: str | None = None) -> int:
    query = select(func.count()).where(Upload.id.in_(ids), Upload.status == status)
    if held_by is not None:
        query = query.where(Upload.held_by == held_by)
    with TEST_RUNTIME.session() as session:
        return session.scalar(query) or 0


def _submit(bank_name: str, base_url: str, count: int) -> list[int]:
    """Uploads of the banked image, each to be hit once (SHA-256)."""
    with TEST_RUNTIME.session() as session:
        bank = banks.create_bank(session, bank_name)
        banks.add_entries(session, bank, [banks.NewEntry(sha256=sha256(IMAGE))], added_by="t")
        return [service.submit(session, f"{base_url}/{i}.jpg")[0].id for i in range(count)]


def _hits_per_upload(ids: list[int]) -> dict[int, int]:
    with TEST_RUNTIME.session() as session:
        rows = session.execute(
            select(Hit.upload_id, func.count())
            .where(Hit.upload_id.in_(ids))
            .group_by(Hit.upload_id)
        ).all()
    return {upload_id: count for upload_id, count in rows}


def _worker_name(process: WorkerProcess) -> str:
    with TEST_RUNTIME.session() as session:
        return session.scalars(
            select(Worker.name).where(
                Worker.pid == process.process.pid, Worker.stopped_at.is_(None)
            )
        ).one()


def _kill_when_holding(worker: WorkerProcess, ids: list[int], name: str | None = None) -> None:
    """SIGKILL the worker once it holds at least 4 uploads."""
    deadline = time.monotonic() + 30
    while _count(UploadStatus.PROCESSING, ids, name) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _count(UploadStatus.PROCESSING, ids, name) >= 4
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait()


def test_a_killed_workers_messages_are_delivered_again_by_acks_late(
    slow_server: str, tmp_path: Path, runtime: Runtime
) -> None:
    """Redis hands a dead worker's unacknowledged messages to another worker once their
    visibility timeout passes. The sweeper is kept out of it (thresholds of an hour), so
    this fails if messages were acknowledged before their upload was recorded."""
    ids = _submit("acks-late", slow_server, 24)
    queue = f"{QUEUE}-acks-late"
    env = {
        **TEST_ENV,
        "MODERATION_QUEUE": queue,
        "MODERATION_WORKER_CONCURRENCY": "8",
        "MODERATION_INTAKE_PROCESSES": INTAKE_PROCESSES,
        "MODERATION_STUCK_AFTER_S": "3600",
        "MODERATION_WORKER_DEAD_AFTER_S": "3600",
        "MODERATION_SWEEP_INTERVAL_S": "0.5",
    }
    runtime.producer.send_screening(ids, queue=queue)

    with WorkerProcess(tmp_path / "doomed.log", env) as doomed:
        doomed.wait_ready()
        _kill_when_holding(doomed, ids)
    assert _count(UploadStatus.SCREENED, ids) < len(ids)  # it died with work in hand

    # A worker restores unacknowledged messages older than its visibility timeout when it
    # starts consuming: let that much pass since the last of them was taken.
    visibility_timeout_s = 2
    time.sleep(visibility_timeout_s + 0.5)
    survivor_env = {**env, "MODERATION_VISIBILITY_TIMEOUT_S": str(visibility_timeout_s)}
    with WorkerProcess(tmp_path / "survivor.log", survivor_env) as survivor:
        survivor.wait_ready()
        final = wait_until_final(TEST_RUNTIME, ids, timeout_s=60)
        log = survivor.log()

    assert [u.status for u in final] == [UploadStatus.SCREENED] * len(ids)
    assert _hits_per_upload(ids) == dict.fromkeys(ids, 1)
    assert "re-sending" not in log  # redelivered by the broker, not by the sweeper


def test_a_killed_workers_uploads_are_screened_by_another_within_a_minute(
    slow_server: str, tmp_path: Path, runtime: Runtime
) -> None:
    """Two workers share a queue and one is SIGKILLed mid-batch: its heartbeat stops, the
    sweeper sends what it held again at once, and the other screens everything, with
    Redis's visibility timeout left at its default (15 minutes)."""
    ids = _submit("dead-worker", slow_server, 32)
    queue = f"{QUEUE}-dead-worker"
    env = {
        **TEST_ENV,
        "MODERATION_QUEUE": queue,
        "MODERATION_WORKER_CONCURRENCY": "8",
        "MODERATION_INTAKE_PROCESSES": INTAKE_PROCESSES,
        # Only the dead-holder rule can rescue the uploads within the test.
        "MODERATION_STUCK_AFTER_S": "3600",
        "MODERATION_WORKER_HEARTBEAT_S": "0.5",
        "MODERATION_WORKER_DEAD_AFTER_S": "2",
        "MODERATION_SWEEP_INTERVAL_S": "0.5",
    }
    with (
        WorkerProcess(tmp_path / "victim.log", env) as victim,
        WorkerProcess(tmp_path / "survivor.log", env) as survivor,
    ):
        victim.wait_ready()
        survivor.wait_ready()
        victim_name, survivor_name = _worker_name(victim), _worker_name(survivor)
        runtime.producer.send_screening(ids, queue=queue)
        _kill_when_holding(victim, ids, victim_name)
        killed_at = time.monotonic()
        held = _held_by(victim_name, ids)
        final = wait_until_final(TEST_RUNTIME, ids, timeout_s=60)
        recovery_s = time.monotonic() - killed_at
        log = survivor.log()

    print(f"killed with {len(held)} uploads in hand; all {len(ids)} final {recovery_s:.1f} s later")
    assert [u.status for u in final] == [UploadStatus.SCREENED] * len(ids)
    assert recovery_s < 60
    assert _hits_per_upload(ids) == dict.fromkeys(ids, 1)
    assert "re-sending" in log
    with TEST_RUNTIME.session() as session:
        rescued = session.execute(
            select(Upload.attempts, Upload.held_by).where(Upload.id.in_(held))
        ).all()
    assert set(rescued) == {(2, survivor_name)}  # claimed once more, by the survivor


def _held_by(name: str, ids: list[int]) -> list[int]:
    with TEST_RUNTIME.session() as session:
        return list(
            session.scalars(
                select(Upload.id).where(
                    Upload.id.in_(ids),
                    Upload.held_by == name,
                    Upload.status == UploadStatus.PROCESSING,
                )
            )
        )


def _terminate_backends(application_name: str) -> int:
    with TEST_RUNTIME.session() as session:
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
    slow_server: str, tmp_path: Path, runtime: Runtime
) -> None:
    """PostgreSQL drops every connection of a busy worker, again and again: claims and
    results in flight fail with their group commit, the tasks retry, and each upload ends
    screened once."""
    with TEST_RUNTIME.session() as session:
        bank = banks.create_bank(session, "dropped")
        banks.add_entries(session, bank, [banks.NewEntry(sha256=sha256(IMAGE))], added_by="t")
        uploads = [service.submit(session, f"{slow_server}/{i}.jpg")[0] for i in range(24)]
    ids = [u.id for u in uploads]
    name = f"faulty-worker-{os.getpid()}"
    env = {
        **TEST_ENV,
        "MODERATION_DATABASE_URL": f"{TEST_ENV['MODERATION_DATABASE_URL']}?application_name={name}",
        "MODERATION_QUEUE": f"{QUEUE}-dropped",
        "MODERATION_WORKER_CONCURRENCY": "8",
        "MODERATION_INTAKE_PROCESSES": INTAKE_PROCESSES,
    }
    runtime.producer.send_screening(ids, queue=env["MODERATION_QUEUE"])

    with WorkerProcess(tmp_path / "faulty.log", env) as worker:
        worker.wait_ready()
        terminated = 0
        deadline = time.monotonic() + 8
        while _count(UploadStatus.SCREENED, ids) < len(ids) // 2 and time.monotonic() < deadline:
            terminated += _terminate_backends(name)
            time.sleep(0.3)
        final = wait_until_final(TEST_RUNTIME, ids, timeout_s=120)
        log = worker.log()

    assert terminated > 0
    assert "OperationalError" in log  # the faults reached the worker's tasks
    assert [u.status for u in final] == [UploadStatus.SCREENED] * len(ids)
    with TEST_RUNTIME.session() as session:
        # One hit (the banked SHA-256), two signals (SHA-256, PDQ), one embedding each.
        for table, per_upload in ((Hit, 1), (Signal, 2), (Embedding, 1)):
            rows = session.execute(
                select(table.upload_id, func.count())
                .where(table.upload_id.in_(ids))
                .group_by(table.upload_id)
            ).all()
            assert dict(rows) == dict.fromkeys(ids, per_upload), table.__tablename__


def _intake_processes(worker: WorkerProcess) -> list[int]:
    """The worker's intake processes: the children of its multiprocessing forkserver."""
    children = children_by_parent()
    pids = []
    for child in children.get(worker.process.pid, []):
        if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
            pids += children.get(child, [])
    return pids


def test_a_killed_intake_process_costs_one_attempt_and_loses_nothing(
    slow_server: str, tmp_path: Path, runtime: Runtime
) -> None:
    """An intake process dies mid-fetch (the OOM killer, a decoder crash) holding two jobs:
    the upload it was fetching is retried, the one queued behind it in its pipe goes to
    another process at no cost, a replacement process takes its place, and every upload
    ends screened once."""
    ids = _submit("intake-loss", slow_server, 12)
    queue = f"{QUEUE}-intake-loss"
    env = {
        **TEST_ENV,
        "MODERATION_QUEUE": queue,
        "MODERATION_WORKER_CONCURRENCY": "4",
        "MODERATION_INTAKE_PROCESSES": "2",
        # The processes fetch, so that the slow server keeps them busy (a worker fetches
        # http(s) itself by default: tests/test_fetch_stage.py).
        "MODERATION_WORKER_FETCHES": "0",
    }
    with WorkerProcess(tmp_path / "worker.log", env) as worker:
        worker.wait_ready()
        before = _intake_processes(worker)
        assert len(before) == 2
        runtime.producer.send_screening(ids, queue=queue)
        _wait_for(lambda: _count(UploadStatus.PROCESSING, ids) >= 2)
        # Mid-fetch (the slow server answers after 1.5 s), each process holding two of the
        # four task threads' jobs.
        time.sleep(0.5)
        os.kill(before[0], signal.SIGKILL)
        final = wait_until_final(TEST_RUNTIME, ids, timeout_s=60)
        after = _intake_processes(worker)
        log = worker.log()

    assert [u.status for u in final] == [UploadStatus.SCREENED] * len(ids)
    assert _hits_per_upload(ids) == dict.fromkeys(ids, 1)
    assert f"intake process {before[0]} died" in log
    assert "1 upload(s) queued behind it sent again" in log
    # The upload being fetched, once more; the one queued behind it, not.
    assert sorted(u.attempts for u in final) == [1] * (len(ids) - 1) + [2]
    assert len(after) == 2
    assert before[0] not in after


def _wait_for(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)
