"""Screening messages for committed uploads, sent from a thread of their own.

`POST /v1/uploads` answers as soon as its rows commit and hands their ids to the API
process's `Announcer`. Woken by the first id, its thread gathers for `GATHER_S` more, then
takes every id waiting and sends them, `UPLOADS_PER_MESSAGE` to a message, in one round
trip to Redis; so requests that arrive together share messages, even requests of one
upload each.

Why gather: a send costs the API process about 0.26 ms of CPU in Celery, kombu and
redis-py however few ids it carries (2,000 sends of one id, alone), and the thread's
wake-ups and its contention for the interpreter around it more. With one client sending
single events to `bench/api.py`'s server, each request's id went in a send of its own,
a fifth of the process's samples (py-spy); the server's CPU per request fell from 2.85 to
1.79 ms with sending switched off (an experiment). A worker batches its own intake over
25 ms (`MODERATION_BATCH_WAIT_MS`), so 10 ms more before a message is sent changes no
verdict's time that matters.

The announcer is a fast path, never what keeps an upload safe: the committed row is. If
the process dies with ids still waiting, or Redis stays unreachable for longer than the
announcer keeps them, those uploads stay queued and a worker's sweeper sends them after
`MODERATION_STUCK_AFTER_S` (`moderation.worker.recovery`). While Redis is down the announcer keeps
up to `max_pending` ids and tries again, backing off to `retry_max_s`; a message sent
twice is harmless (screening is idempotent).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

Send = Callable[[Sequence[int], str], None]

# How long the thread waits, once an id arrives, for more to send with it.
GATHER_S = 0.01


class Announcer:
    def __init__(
        self,
        send: Send,
        *,
        max_pending: int = 100_000,
        gather_s: float = GATHER_S,
        retry_first_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        """`send(ids, queue)`: publish screening messages for committed uploads."""
        self._send = send
        self._max_pending = max_pending
        self._gather_s = gather_s
        self._retry_first_s = retry_first_s
        self._retry_max_s = retry_max_s
        self._changed = threading.Condition()
        # Ids waiting to be sent, by queue, oldest first.
        self._pending: dict[str, list[int]] = {}
        # Ids taken by the thread and being sent; 0 when it is not sending.
        self._sending = 0
        # True while the thread waits for a first id: only then does `announce` wake it,
        # not once per request while it gathers or sends.
        self._idle = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="announcer", daemon=True)
        self._thread.start()

    def announce(self, upload_ids: Sequence[int], queue: str) -> None:
        """Send screening messages for these committed uploads soon; never blocks."""
        with self._changed:
            room = self._max_pending - self._count()
            waiting = self._pending.setdefault(queue, [])
            waiting.extend(upload_ids[: max(room, 0)])
            if len(upload_ids) > room:
                logger.error(
                    "%d uploads are not announced: %d are already waiting for Redis; they stay "
                    "queued and workers' sweepers send them",
                    len(upload_ids) - max(room, 0),
                    self._max_pending,
                )
            if self._idle:
                self._changed.notify_all()

    @property
    def pending(self) -> int:
        """Ids not yet sent, those being sent included."""
        with self._changed:
            return self._count()

    def _count(self) -> int:
        return self._sending + sum(len(ids) for ids in self._pending.values())

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every id announced so far has been sent: True once nothing waits,
        False if something still does after `timeout_s` (Redis unreachable)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._pending and not self._sending, timeout_s
            )

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is waiting, giving up after `timeout_s` (the sweeper sends the rest)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join(timeout_s)
        left = self.pending
        if left:
            logger.warning("%d uploads left unannounced at shutdown; sweepers send them", left)

    def _run(self) -> None:
        delay = self._retry_first_s
        while True:
            with self._changed:
                while not self._pending and not self._closing:
                    self._idle = True
                    self._changed.wait()
                self._idle = False
                # Ids of the requests that follow within `gather_s` go with these; `close`
                # cuts the wait short, `announce` does not (the thread is not idle).
                self._changed.wait_for(lambda: self._closing, self._gather_s)
                if not self._pending:
                    return
                taken, self._pending = self._pending, {}
                self._sending = sum(len(ids) for ids in taken.values())
            unsent = self._send_all(taken)
            with self._changed:
                self._sending = 0
                self._changed.notify_all()
                if not unsent:
                    delay = self._retry_first_s
                    continue
                # Back in front of whatever arrived meanwhile, oldest first.
                for queue, ids in unsent.items():
                    self._pending[queue] = ids + self._pending.get(queue, [])
                if self._closing:
                    return
                # New ids do not cut the wait short: the broker is what is awaited.
                self._changed.wait_for(lambda: self._closing, delay)
            delay = min(delay * 2, self._retry_max_s)

    def _send_all(self, taken: dict[str, list[int]]) -> dict[str, list[int]]:
        """Sends each queue's ids; those that could not be sent, by queue."""
        unsent: dict[str, list[int]] = {}
        for queue, ids in taken.items():
            try:
                self._send(ids, queue)
            except Exception:  # the broker unreachable, mostly; the sweeper is the backstop
                logger.warning(
                    "could not send screening messages for %d uploads; trying again",
                    len(ids),
                    exc_info=True,
                )
                unsent[queue] = ids
        return unsent
