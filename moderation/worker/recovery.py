"""Finding work that was lost and sending it again: worker heartbeats and the sweeper.

PostgreSQL is the source of truth and Redis only transport, so an upload can be left
unfinished by a message or a worker that disappears. The rules, checked by one sweeper at
a time (an advisory lock) every `sweep_interval_s` in every worker:

- `processing`, held by a dead worker (no heartbeat for `worker_dead_after_s`, stopped, or
  unknown): sent again at once. A SIGKILLed worker's uploads are screened elsewhere within
  about `worker_dead_after_s + sweep_interval_s`, not after Redis's visibility timeout,
  which must stay longer than the longest legitimate task and so cannot be short.
- `processing` with no sign of life for `hung_after_s`, whoever holds it: the fallback
  (a claim by no registered worker, a holder that is alive but lost the upload). Longer
  than any upload legitimately takes, queued inside its worker included: a worker claims
  a message's uploads together, then screens them as its threads come free, and every
  wait in screening has its own limit.
- `queued`, whose message a worker took `worker_dead_after_s` ago (it is in Redis's
  `unacked` set) and never claimed: a live worker claims within moments of taking a
  message, so that worker died between the two (a SIGKILL lands there easily: at any
  moment a busy worker has a few messages taken and their claims waiting for a group
  commit). Retries waiting for their countdown are not counted.
- `queued`, sent `stuck_after_s` before the message next in line on the broker queue (or,
  with the queue empty, `stuck_after_s` ago): its message was lost (Redis restarted
  empty, a producer died between commit and publish). The queue is consumed in order, so
  judged against its head rather than the clock a long backlog is never mistaken for lost
  messages (measured before this rule: 600 uploads behind one busy worker drew 3,375
  duplicate messages, one upload claimed 5 times).

A re-sent upload goes back to `queued` with `enqueued_at` set to the sweep, so the next
sweep leaves it alone, and its message is published only after that commit. Re-sending
is harmless if the worker was not dead after all: claims count attempts and results are
written once (see `service`).

Redis redelivers the messages a dead worker took once their visibility timeout passes;
by then the sweeper has had them screened and those duplicates find nothing to do.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, create_engine, delete, exists, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from moderation.chores import Chore
from moderation.config import Settings
from moderation.runtime import Runtime
from moderation.screening.models import Upload, UploadStatus, Worker

logger = logging.getLogger(__name__)

# Any constant: the key of the advisory lock that lets one sweeper run at a time.
_SWEEP_LOCK_KEY = 7_301_562
# Rows of workers gone this long are deleted; uploads they still name count as held by a
# dead worker all the same (an unknown holder is a dead one).
_FORGET_WORKERS_AFTER = timedelta(days=7)
# A shutdown waits this long at most for a beat or a sweep caught in a dead connection.
_JOIN_TIMEOUT_S = 30.0


# Worker liveness.


def new_worker_name() -> str:
    """A name unique to this process start: host, pid and a random suffix (pids recur)."""
    return f"{socket.gethostname()[:96]}:{os.getpid()}:{secrets.token_hex(4)}"


def beat(session: Session, name: str) -> None:
    """Record that the worker is alive, registering it if it is not yet known."""
    session.execute(
        insert(Worker)
        .values(name=name, hostname=socket.gethostname()[:255], pid=os.getpid())
        .on_conflict_do_update(index_elements=[Worker.name], set_={"heartbeat_at": func.now()})
    )


def mark_stopped(session: Session, name: str) -> None:
    session.execute(update(Worker).where(Worker.name == name).values(stopped_at=func.now()))


class Heartbeat:
    """Registers this worker process and keeps its heartbeat fresh from a thread.

    It has a connection of its own: queued behind task threads for the shared pool, a
    busy worker's heartbeat could fall silent and the worker be taken for dead. A beat
    that fails (the database is down) is logged and tried again at the next interval;
    it never stops the worker.
    """

    def __init__(self, settings: Settings, name: str | None = None) -> None:
        self.name = name or new_worker_name()
        self._interval_s = settings.worker_heartbeat_s
        # Pre-ping: after a database restart the first beat reconnects instead of failing.
        self._engine = create_engine(
            settings.database_url, pool_size=1, max_overflow=0, pool_pre_ping=True
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        """Register, then beat in the background. Raises if the database is unreachable:
        a worker that cannot register cannot claim anything either."""
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and record a clean stop: anything this worker still holds is sent
        again at the next sweep instead of after `worker_dead_after_s`."""
        self._stop.set()
        self._thread.join(timeout=_JOIN_TIMEOUT_S)
        try:
            with Session(self._engine) as session, session.begin():
                mark_stopped(session, self.name)
        except Exception as exc:
            logger.warning("could not record that worker %s stopped: %s", self.name, exc)
        self._engine.dispose()

    def _beat(self) -> None:
        with Session(self._engine) as session, session.begin():
            beat(session, self.name)

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self._interval_s):
            try:
                self._beat()
            except Exception as exc:
                logger.warning(
                    "heartbeat failed, trying again in %g s: %s",
                    self._interval_s,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                failing = True
                continue
            if failing:
                logger.info("heartbeat recorded again")
                failing = False


# Finding lost work.


def _seconds(delta: timedelta) -> ColumnElement[timedelta]:
    return func.make_interval(0, 0, 0, 0, 0, 0, delta.total_seconds())


def find_stuck(
    session: Session,
    *,
    stuck_after: timedelta,
    dead_after: timedelta,
    hung_after: timedelta,
    oldest_waiting: int | None = None,
    taken: Mapping[int, datetime] | None = None,
    limit: int = 1000,
) -> list[int]:
    """Uploads whose message or worker was lost (the rules are in the module docstring).

    `oldest_waiting` is the upload of the message next in line on the broker queue, None
    when the queue is empty; `taken`, uploads whose message a worker took at least
    `dead_after` ago and has not acknowledged, with when it took it.

    Marks the uploads queued and re-enqueued now and returns their ids; the caller
    publishes after commit. Returns nothing if another sweeper holds the lock.
    """
    if not session.scalar(select(func.pg_try_advisory_xact_lock(_SWEEP_LOCK_KEY))):
        return []
    now = func.now()
    dead_cutoff = now - _seconds(dead_after)
    holder_alive = exists().where(
        Worker.name == Upload.held_by,
        Worker.stopped_at.is_(None),
        Worker.heartbeat_at >= dead_cutoff,
    )
    # A heartbeat can only be missed while the database is up: right after a restart every
    # worker looks silent, and the live ones need a moment to beat again.
    up_long_enough = func.pg_postmaster_start_time() < dead_cutoff
    waiting_since = (
        session.scalar(select(Upload.enqueued_at).where(Upload.id == oldest_waiting))
        if oldest_waiting is not None
        else None
    )
    queued_cutoff = (
        func.least(now, waiting_since) if waiting_since is not None else now
    ) - _seconds(stuck_after)
    # The latest sign of life: a re-sent upload is judged from its re-sending.
    last_activity = func.greatest(Upload.enqueued_at, Upload.started_at)
    processing = Upload.status == UploadStatus.PROCESSING
    queued = Upload.status == UploadStatus.QUEUED
    # Taken and never claimed, unless sent again since it was taken.
    abandoned = [
        upload_id
        for upload_id, enqueued_at in session.execute(
            select(Upload.id, Upload.enqueued_at).where(Upload.id.in_(taken or {}), queued)
        )
        if taken and (enqueued_at is None or enqueued_at < taken[upload_id])
    ]
    stuck = session.scalars(
        select(Upload.id)
        .where(
            or_(
                and_(processing, Upload.held_by.is_not(None), ~holder_alive, up_long_enough),
                and_(processing, last_activity < now - _seconds(hung_after)),
                and_(queued, Upload.id.in_(abandoned)),
                and_(queued, last_activity < queued_cutoff),
            )
        )
        .order_by(Upload.id)
        .limit(limit)
        .with_for_update(of=Upload, skip_locked=True)
    ).all()
    if stuck:
        session.execute(
            update(Upload)
            .where(Upload.id.in_(stuck))
            .values(status=UploadStatus.QUEUED, enqueued_at=now)
        )
    return list(stuck)


def forget_old_workers(session: Session) -> int:
    """Delete the rows of workers silent for days, so the table does not grow forever."""
    result = session.execute(
        delete(Worker).where(Worker.heartbeat_at < func.now() - _seconds(_FORGET_WORKERS_AFTER))
    )
    return int(getattr(result, "rowcount", 0) or 0)


def taken_and_unacknowledged(
    runtime: Runtime, queue: str, older_than: timedelta
) -> dict[int, datetime]:
    """Uploads whose screening message on `queue` a worker took more than `older_than` ago
    and has not acknowledged, with when it was taken; retries waiting for their countdown
    are left out. Kombu's Redis transport keeps each taken message in the `unacked` hash
    until it is acknowledged, and when it was taken in the `unacked_index` sorted set."""
    cutoff = time.time() - older_than.total_seconds()
    with runtime.producer.app.connection_for_read() as connection:
        client = connection.default_channel.client
        tags = client.zrangebyscore("unacked_index", "-inf", cutoff, withscores=True)
        payloads = client.hmget("unacked", [tag for tag, _ in tags]) if tags else []
    taken: dict[int, datetime] = {}
    for (_tag, taken_at), payload in zip(tags, payloads, strict=True):
        if payload is None:
            continue
        try:
            message, _exchange, routing_key = json.loads(payload)
            if routing_key != queue or message.get("headers", {}).get("eta"):
                continue
            upload_ids = uploads_of_message(message)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            continue  # not a screening message
        for upload_id in upload_ids:
            taken[upload_id] = datetime.fromtimestamp(taken_at, UTC)
    return taken


def uploads_of_message(message: dict[str, Any]) -> list[int]:
    """The uploads a screening message names: one (`screen_upload`) or many."""
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, _kwargs, _embed = json.loads(body)
    named = args[0]
    return [int(upload_id) for upload_id in named] if isinstance(named, list) else [int(named)]


def oldest_waiting_upload(runtime: Runtime, queue: str) -> int | None:
    """The upload of the message next in line on the queue; None if the queue is empty
    or that message is not a screening message. Celery on Redis keeps a queue as a list
    that producers push on the left and workers pop from the right."""
    with runtime.producer.app.connection_for_read() as connection:
        raw = connection.default_channel.client.lindex(queue, -1)
    if raw is None:
        return None
    try:
        # The uploads of one message were sent together: the first stands for them all.
        return uploads_of_message(json.loads(raw))[0]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        logger.warning("the message next in line on %s is not a screening message", queue)
        return None


# Sending it again.


def sweep_once(runtime: Runtime, queue: str | None = None) -> list[int]:
    """Re-send uploads whose message or worker was lost (see `find_stuck`) on the
    runtime's queue unless told otherwise; returns their ids."""
    settings = runtime.settings
    queue = queue or settings.queue
    dead_after = timedelta(seconds=settings.worker_dead_after_s)
    oldest_waiting = oldest_waiting_upload(runtime, queue)
    taken = taken_and_unacknowledged(runtime, queue, dead_after)
    with runtime.session() as session:
        stuck = find_stuck(
            session,
            stuck_after=timedelta(seconds=settings.stuck_after_s),
            hung_after=timedelta(seconds=settings.hung_after_s),
            dead_after=dead_after,
            oldest_waiting=oldest_waiting,
            taken=taken,
        )
        forget_old_workers(session)
    if stuck:
        logger.warning("re-sending %d lost upload(s): %s", len(stuck), stuck[:20])
        try:
            runtime.producer.send_screening(stuck, queue)
        except Exception:
            # Already marked as re-sent: they are found again once `stuck_after_s` passes.
            logger.error("could not publish %d re-sent upload(s)", len(stuck))
            raise
    return stuck


def _requeue_lost(runtime: Runtime, *, complete: bool) -> Mapping[str, object]:
    return {"requeued": sweep_once(runtime)}


REQUEUE_LOST = Chore("the sweep for lost uploads", _requeue_lost)
