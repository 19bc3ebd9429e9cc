"""One intake process as the pool sees it: the process, the worker's end of its pipe, and
the jobs sent down it and not yet answered."""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import enum
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from moderation.worker.intake.jobs import GRANTED, IntakeJob


class _Outcome(enum.Enum):
    # The answer to a job whose process died or stalled before taking it from its pipe.
    NOT_STARTED = "not started"


NOT_STARTED = _Outcome.NOT_STARTED


@dataclass(eq=False)
class Sent:
    """A job sent down a process's pipe, and where its answer goes: what the process
    answered, a fault if it died or stalled on this job, or `NOT_STARTED`."""

    job: IntakeJob
    answer: Future[object] = dataclasses.field(default_factory=Future)


class Member:
    """One intake process, the worker's end of its pipe, and the jobs sent down it, oldest
    first. The process takes them one at a time, in order: the others wait behind the
    oldest, which it is working on once it has taken it (see `give_up`)."""

    def __init__(
        self, process: BaseProcess, connection: Connection, taken: ctypes.c_uint64
    ) -> None:
        self.process = process
        self.connection = connection
        # Jobs the process has taken from its pipe, counted by the process in shared
        # memory, and jobs it has answered, counted here.
        self.taken = taken
        self.answers = 0
        self.sent: collections.deque[Sent] = collections.deque()
        # When the process last showed progress on its oldest job (was sent it, was granted
        # memory, answered the one before): its next message is due within the timeout.
        self.heard_at = time.monotonic()
        self.lost = False
        # Guards the fields above and writes to the pipe (from task threads and the reader).
        self.lock = threading.Lock()

    def send(self, job: IntakeJob) -> Sent | None:
        """Queue a job in the process's pipe; None if the process is gone."""
        sent = Sent(job)
        with self.lock:
            if self.lost:
                return None
            try:
                self.connection.send(job)
            except OSError:  # it has just died; its reader is about to find out
                self.lost = True
                return None
            if not self.sent:
                self.heard_at = time.monotonic()
            self.sent.append(sent)
        return sent

    def heard(self) -> None:
        with self.lock:
            self.heard_at = time.monotonic()

    def grant(self) -> None:
        with self.lock:
            self.heard_at = time.monotonic()
            self.connection.send(GRANTED)

    def answered(self) -> Sent:
        """The oldest job, now answered; the next one's clock starts."""
        with self.lock:
            if not self.sent:
                raise RuntimeError(f"intake process {self.process.pid} answered a job never sent")
            self.heard_at = time.monotonic()
            self.answers += 1
            return self.sent.popleft()

    def silent_for(self) -> float | None:
        """Seconds since the process last showed progress on a job; None if it holds none."""
        with self.lock:
            return time.monotonic() - self.heard_at if self.sent else None

    def give_up(self) -> tuple[Sent | None, list[Sent]]:
        """Mark the process gone, once it has been killed: the job it was working on, if
        any, and the jobs it had not taken.

        It was working on the oldest job it held if it took more jobs than it answered. A
        job sent just as an idle process died can reach its pipe and never be taken: that
        job did not start, and must cost its upload nothing. If the process could not be
        reaped, its count is not final, and the oldest job is taken to have started."""
        with self.lock:
            self.lost = True
            held = list(self.sent)
            self.sent.clear()
            reaped = self.process.exitcode is not None
            if held and (not reaped or self.taken.value > self.answers):
                return held[0], held[1:]
            return None, held
