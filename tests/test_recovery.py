"""The sweeper's rules for lost work, and worker heartbeats, against the real PostgreSQL and
Redis. `now()` is fixed within the rolled-back test transaction, so ages set relative to it
are exact."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import timedelta

import redis
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from moderation.runtime import Runtime
from moderation.screening import service
from moderation.screening.models import Upload, UploadStatus, Worker
from moderation.worker import recovery
from moderation.worker.recovery import find_stuck, oldest_waiting_upload
from tests.conftest import TEST_RUNTIME, settings_for_tests

STUCK_AFTER = timedelta(minutes=10)
DEAD_AFTER = timedelta(seconds=30)
HUNG_AFTER = timedelta(minutes=30)


def _stuck(session: Session, oldest_waiting: int | None = None) -> list[int]:
    return find_stuck(
        session,
        stuck_after=STUCK_AFTER,
        dead_after=DEAD_AFTER,
        hung_after=HUNG_AFTER,
        oldest_waiting=oldest_waiting,
    )


def _worker(session: Session, name: str, *, silent_for: timedelta, stopped: bool = False) -> str:
    recovery.beat(session, name)
    session.execute(
        update(Worker)
        .where(Worker.name == name)
        .values(
            heartbeat_at=func.now() - silent_for,
            stopped_at=func.now() if stopped else None,
        )
    )
    return name


def _claimed(session: Session, name: str, worker: str | None, *, ago: timedelta) -> Upload:
    upload, _ = service.submit(session, f"file:///{name}.jpg")
    service.claim(session, upload.id, max_attempts=3, worker=worker)
    session.execute(
        update(Upload)
        .where(Upload.id == upload.id)
        .values(enqueued_at=func.now() - ago - timedelta(seconds=1), started_at=func.now() - ago)
    )
    return upload


def _reload(session: Session, upload: Upload) -> Upload:
    session.flush()
    session.refresh(upload)
    return upload


def test_a_claim_records_its_worker(session: Session) -> None:
    upload, _ = service.submit(session, "file:///a.jpg")
    service.claim(session, upload.id, max_attempts=3, worker="host:1:ab")
    assert _reload(session, upload).held_by == "host:1:ab"
    service.claim(session, upload.id, max_attempts=3)  # a claimer that keeps no heartbeat
    assert _reload(session, upload).held_by is None


def test_uploads_held_by_a_dead_worker_are_sent_again_at_once(session: Session) -> None:
    dead = _worker(session, "dead", silent_for=DEAD_AFTER + timedelta(seconds=1))
    alive = _worker(session, "alive", silent_for=DEAD_AFTER - timedelta(seconds=1))
    of_the_dead = _claimed(session, "of-the-dead", dead, ago=timedelta(seconds=1))
    of_the_living = _claimed(session, "of-the-living", alive, ago=timedelta(seconds=1))
    of_no_known_worker = _claimed(session, "unknown", "never-registered", ago=timedelta(0))

    assert _stuck(session) == [of_the_dead.id, of_no_known_worker.id]
    for upload in (of_the_dead, of_no_known_worker):
        _reload(session, upload)
        assert upload.status is UploadStatus.QUEUED  # waiting for a worker again
        assert upload.held_by is not None  # who held it last, for the record
    assert _reload(session, of_the_living).status is UploadStatus.PROCESSING
    # Sent again once: the next sweep leaves them to the queue.
    assert _stuck(session) == []


def test_a_stopped_worker_counts_as_dead(session: Session) -> None:
    """A clean shutdown finishes its tasks first; anything it still holds was abandoned,
    and is not left waiting for its heartbeat to go stale."""
    stopped = _worker(session, "stopped", silent_for=timedelta(0), stopped=True)
    upload = _claimed(session, "abandoned", stopped, ago=timedelta(0))
    assert _stuck(session) == [upload.id]


def test_a_live_workers_uploads_are_not_sent_again_until_silent_past_the_timeout(
    session: Session,
) -> None:
    alive = _worker(session, "busy", silent_for=timedelta(0))
    slow = _claimed(session, "slow", alive, ago=HUNG_AFTER - timedelta(seconds=1))
    lost = _claimed(session, "lost", alive, ago=HUNG_AFTER + timedelta(seconds=1))
    # The fallback: a live holder that has shown no progress on an upload for the whole
    # timeout has lost it (a hung thread, a message cancelled by a broker restart).
    assert _stuck(session) == [lost.id]
    assert _reload(session, slow).status is UploadStatus.PROCESSING


def test_uploads_taken_by_a_worker_and_never_claimed_are_sent_again(session: Session) -> None:
    """A worker killed between taking a message and claiming its upload leaves the upload
    queued, its message unacknowledged in Redis."""
    abandoned, sent_again_since, claimed = (
        service.submit(session, f"file:///{name}.jpg")[0]
        for name in ("abandoned", "sent-again", "claimed")
    )
    service.claim(session, claimed.id, max_attempts=3, worker=None)
    session.execute(
        update(Upload)
        .where(Upload.id.in_([abandoned.id, claimed.id]))
        .values(enqueued_at=func.now() - timedelta(minutes=2))
    )
    taken_at = session.scalar(select(func.now() - timedelta(minutes=1)))
    assert taken_at is not None
    taken = dict.fromkeys([abandoned.id, sent_again_since.id, claimed.id], taken_at)
    stuck = find_stuck(
        session, stuck_after=STUCK_AFTER, dead_after=DEAD_AFTER, hung_after=HUNG_AFTER, taken=taken
    )
    assert stuck == [abandoned.id]


def test_messages_taken_and_unacknowledged_name_their_uploads(
    redis_client: redis.Redis, runtime: Runtime
) -> None:
    """Read from kombu's own `unacked` records: only this queue's, only those taken long
    enough ago, and not retries waiting for their countdown; every upload of a message."""
    queue = f"taken-{uuid.uuid4().hex}"
    for upload_ids in ([51, 55], [52], [53], [54]):
        runtime.producer.send_screening(upload_ids, queue=queue)
    messages = [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)][::-1]
    redis_client.delete(queue)
    messages[2]["headers"]["eta"] = "2026-01-01T00:00:00+00:00"
    now = time.time()
    entries = {  # tag: (message, routing key, taken at)
        f"{queue}-old": (messages[0], queue, now - 60),
        f"{queue}-fresh": (messages[1], queue, now - 1),
        f"{queue}-retry": (messages[2], queue, now - 60),
        f"{queue}-other-queue": (messages[3], "elsewhere", now - 60),
    }
    try:
        for tag, (message, routing_key, taken_at) in entries.items():
            redis_client.hset("unacked", tag, json.dumps([message, routing_key, routing_key]))
            redis_client.zadd("unacked_index", {tag: taken_at})
        taken = recovery.taken_and_unacknowledged(runtime, queue, timedelta(seconds=30))
    finally:
        redis_client.hdel("unacked", *entries)
        redis_client.zrem("unacked_index", *entries)
    assert list(taken) == [51, 55]
    assert abs(taken[51].timestamp() - (now - 60)) < 1
    assert taken[55] == taken[51]


def test_uploads_silent_past_the_timeout_are_sent_again(session: Session) -> None:
    stuck_queued, _ = service.submit(session, "file:///lost-message.jpg")
    stuck_processing, _ = service.submit(session, "file:///no-heartbeat.jpg")
    fresh, _ = service.submit(session, "file:///fresh.jpg")
    done, _ = service.submit(session, "file:///done.jpg")
    service.claim(session, stuck_processing.id, max_attempts=3)  # held by no known worker
    service.record_failed(session, done.id, "x", "y")
    an_hour_ago = func.now() - timedelta(hours=1)
    session.execute(
        update(Upload)
        .where(Upload.id.in_([stuck_queued.id, stuck_processing.id, done.id]))
        .values(enqueued_at=an_hour_ago, started_at=an_hour_ago)
    )
    assert _stuck(session) == [stuck_queued.id, stuck_processing.id]
    # Just sent again: not stuck again until the timeout passes once more.
    assert _stuck(session) == []
    assert fresh.id not in _stuck(session)


def test_the_sweeper_does_not_mistake_a_backlog_for_lost_messages(session: Session) -> None:
    """An hour of backlog: what waits behind the message next in line is not stuck; what
    was sent well before it is, since the queue is consumed in order."""
    lost, just_before, head, behind = (
        service.submit(session, f"file:///{name}.jpg")[0]
        for name in ("lost", "just-before", "head", "behind")
    )
    for upload, minutes_ago in ((lost, 90), (just_before, 65), (head, 60), (behind, 30)):
        session.execute(
            update(Upload)
            .where(Upload.id == upload.id)
            .values(enqueued_at=func.now() - timedelta(minutes=minutes_ago))
        )
    assert _stuck(session, oldest_waiting=head.id) == [lost.id]
    # With the queue empty, age alone decides.
    assert _stuck(session) == sorted([just_before.id, head.id, behind.id])


def test_one_sweeper_at_a_time(session: Session) -> None:
    upload, _ = service.submit(session, "file:///lost.jpg")
    session.execute(
        update(Upload)
        .where(Upload.id == upload.id)
        .values(enqueued_at=func.now() - timedelta(hours=1))
    )
    assert _stuck(session) == [upload.id]  # holds the lock until its transaction ends
    with TEST_RUNTIME.session() as other:  # another sweeper, in a transaction of its own
        assert _stuck(other) == []


def test_the_message_next_in_line_names_its_upload(
    redis_client: redis.Redis, runtime: Runtime
) -> None:
    queue = f"peek-{uuid.uuid4().hex}"
    assert oldest_waiting_upload(runtime, queue) is None
    runtime.producer.send_screening([41], queue=queue)
    runtime.producer.send_screening([42, 43], queue=queue)
    assert oldest_waiting_upload(runtime, queue) == 41
    redis_client.rpop(queue)
    assert oldest_waiting_upload(runtime, queue) == 42  # the first of its message
    redis_client.rpush(queue, b"not a celery message")
    assert oldest_waiting_upload(runtime, queue) is None
    redis_client.delete(queue)


def test_a_heartbeat_registers_beats_and_records_a_clean_stop(database: str) -> None:
    heartbeat = recovery.Heartbeat(settings_for_tests(worker_heartbeat_s=0.05)).start()

    def row() -> Worker:
        with TEST_RUNTIME.session() as session:
            return session.get_one(Worker, heartbeat.name, populate_existing=True)

    try:
        first = row()
        assert first.stopped_at is None
        deadline = time.monotonic() + 10
        while row().heartbeat_at <= first.heartbeat_at and time.monotonic() < deadline:
            time.sleep(0.05)
        assert row().heartbeat_at > first.heartbeat_at
        heartbeat.stop()
        assert row().stopped_at is not None
    finally:
        with TEST_RUNTIME.session() as session:
            session.execute(delete(Worker).where(Worker.name == heartbeat.name))


def test_workers_silent_for_days_are_forgotten(session: Session) -> None:
    _worker(session, "long-gone", silent_for=timedelta(days=8))
    _worker(session, "recent", silent_for=timedelta(days=1))
    assert recovery.forget_old_workers(session) >= 1
    names = set(session.scalars(select(Worker.name)))
    assert "long-gone" not in names
    assert "recent" in names


def test_worker_names_are_unique_per_process_start() -> None:
    name = recovery.new_worker_name()
    host, pid, suffix = name.rsplit(":", 2)
    assert (host, int(pid), len(suffix)) == (socket.gethostname(), os.getpid(), 8)
    assert recovery.new_worker_name() != name


def test_uploads_sent_together_travel_sixteen_to_a_message(
    redis_client: redis.Redis, runtime: Runtime
) -> None:
    queue = f"chunks-{uuid.uuid4().hex}"
    runtime.producer.send_screening(list(range(1, 41)), queue=queue)
    messages = [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)][::-1]
    redis_client.delete(queue)
    assert [recovery.uploads_of_message(m) for m in messages] == [
        list(range(1, 17)),
        list(range(17, 33)),
        list(range(33, 41)),
    ]
