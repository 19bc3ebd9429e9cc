"""The intake pool: intake in processes of its own, beside the worker.

Fetch, SHA-256, decode, PDQ and the CLIP resize-and-crop are pure Python and C under the
GIL. In the worker process, beside Celery, the database writers and the model, they kept
one interpreter busy: one worker reached 50 uploads/s on an H100 (its model alone: 860).
An `IntakePool` runs them in processes of their own (`process.py`), one image at a time
each, one BLAS and OpenMP thread each (with more, 16 processes managed 66 images/s in all
instead of 1,187). A screening upload's http(s) bytes are fetched first, by the worker's
screening threads, and arrive in shared memory of their own, so that a slow server holds
no process (`fetches.py`); local files, and re-embedding's fetches, are read here.

Crops do not travel through pipes: pickling a 338 KB crop back through a pool's result
pipe held a 14-process probe to 211 images/s, against 835 with the crops kept out of it.
The worker process owns a block of shared memory cut into slots, one crop per model it
computes in each (`slots.py`; a block per set of models). A task thread takes a free
slot, sends a small job (uri, declared SHA-256, the models' preprocessings, the slot) down
the pipe of the process holding the fewest jobs, and gets back the signals without
pixels; the first sampled frame's crops are in the slot, and only the rare further frames
of an animation come back pickled. The slot stays the task's until its upload is
recorded. The processes know no model: each job says which crops to make.

One decode budget (`decode_memory_mb`) bounds all the processes together: a process
decodes a small image within an allowance of its own, and asks the worker, over its pipe,
to reserve anything larger from the rest; the worker drops a reservation when the
process answers or dies, so a killed process never keeps memory reserved.

Each intake process works on one job at a time and holds the next in its pipe
(`intake_jobs_per_process`, 2): with one job each, the process sat idle 14% of the time on
two loaded cores, waiting for the worker's interpreter, busy with its other threads, to
hand it the next (3% with two). A reader thread per process takes its answers, in the
order the jobs were sent, so a failure is still attributed to one upload: the oldest job
unanswered is the one the process was working on. If the process dies (SIGKILL, the OOM
killer, a crash in a decoder) the pipe reports end-of-file, the pool starts a
replacement, and that upload alone is retried (`IntakeProcessLost`); if it does not answer
within `intake_timeout_s`, it is killed and replaced the same way (`IntakeStalled`). The
jobs it had not taken from its pipe had not started: those queued behind, and one sent
just as an idle process died, which reaches the pipe and is never read. They go to
another process, at no cost. The process counts the jobs it takes in shared memory, and
the pool the answers, so the pool knows which is which without a message per job. Both
faults are transient: the upload's attempt counter still fails an image that kills its
intake every time.

Processes are started by a forkserver that has imported `process.py`, so a replacement
starts in milliseconds, without the worker's threads, and with the environment that caps
its BLAS and OpenMP threads.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack, closing, contextmanager, suppress

from moderation.config import Settings
from moderation.embedding.preprocessing import Preprocessing
from moderation.images.budget import MemoryBudget
from moderation.images.errors import TransientFault
from moderation.images.signals import ImageSignals
from moderation.worker.intake.fetches import FetchedBytes
from moderation.worker.intake.jobs import (
    RELEASE,
    IntakeJob,
    IntakeProcessLost,
    IntakeResult,
    IntakeStalled,
    IntakeTimes,
    Reserve,
)
from moderation.worker.intake.members import NOT_STARTED, Member, Sent
from moderation.worker.intake.process import serve
from moderation.worker.intake.slots import CropSlots, Shapes, with_slot_pixels
from moderation.worker.intake.stage import Intake, InThreadIntake

logger = logging.getLogger(__name__)

# Set in the forkserver's environment, so every intake process has one thread of each.
_ONE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


# Decodes whose estimated peak is below this (about 5 megapixels) need not ask the worker
# for memory: a round trip per image would cost the worker's interpreter more than the
# decode costs an intake process.
SMALL_DECODE_BYTES = 64 * 2**20


class _NoAnswer(Exception):
    pass


def build_intake(settings: Settings, *, slots: int) -> Intake:
    """The configured intake: `resolved_intake_processes()` processes, or the task threads."""
    processes = settings.resolved_intake_processes()
    if processes == 0:
        return InThreadIntake(settings)
    return IntakePool(
        settings, processes=processes, slots=slots, timeout_s=settings.intake_timeout_s
    )


class IntakePool:
    """`processes` intake processes; `run` screens one job in one of them, from any thread.

    Each process holds up to `intake_jobs_per_process` jobs in its pipe: while it works on
    one, the next is already there, so it never waits for the worker's interpreter (busy
    with Celery, the database writers and the model's threads) to hand it one. A reader
    thread per process takes its answers, serves its requests for decode memory, and times
    its silences.
    """

    # Replacements are paced over this window (see `_pace_replacement`).
    replacement_window_s = 10.0

    def __init__(
        self,
        settings: Settings,
        *,
        processes: int,
        slots: int,
        timeout_s: float,
    ) -> None:
        self.settings = settings
        self.processes = processes
        self.jobs_per_process = settings.intake_jobs_per_process
        self.timeout_s = timeout_s
        # A block of crop slots per set of crop shapes asked for (one per model lineup),
        # made on first use.
        self.slot_count = slots
        self._slots: dict[Shapes, CropSlots] = {}
        self.replaced = 0
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([serve.__module__])
        # The decode budget holds over all the processes (see `_DecodeMemoryFromWorker`):
        # each decodes within an allowance of its own without asking, and reserves anything
        # larger from the rest, which the worker holds.
        total = settings.decode_memory_mb * 2**20
        self._allowance_bytes = min(SMALL_DECODE_BYTES, total // (2 * processes))
        self.decode_memory = MemoryBudget(
            total - processes * self._allowance_bytes, release_after_bytes=None
        )
        self._members: list[Member] = []
        self._readers: list[threading.Thread] = []  # one per member, in the same order
        self._lock = threading.Lock()
        # Notified when a process can take another job. Jobs are sent while holding it.
        self._can_send = threading.Condition(self._lock)
        self._closed = False
        self._closing = threading.Event()
        # When recent replacements started (see `_pace_replacement`).
        self._replacement_times: collections.deque[float] = collections.deque()
        with self._lock, _environment(_ONE_THREAD_ENV):  # read by the forkserver at start
            for _ in range(processes):
                self._start()
        logger.info(
            "intake: %d processes of %d jobs in flight, %d crop slots in shared memory",
            processes,
            self.jobs_per_process,
            slots,
        )

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [m.process.pid for m in self._members if m.process.pid is not None]

    @property
    def in_flight(self) -> int:
        """Jobs sent to the processes and not yet answered."""
        with self._lock:
            return sum(len(m.sent) for m in self._members)

    @contextmanager
    def screened(
        self,
        uri: str,
        declared_sha256: bytes | None,
        preprocessings: Sequence[Preprocessing],
        fetched: bytes | None = None,
    ) -> Iterator[tuple[ImageSignals, IntakeTimes]]:
        """Intake in a process, the first crops in a slot of shared memory that stays this
        caller's until the block ends (the forward passes copy them out). `fetched`: the
        bytes, fetched by the worker, handed over in shared memory of their own."""
        slots = self.slots_for(tuple(p.crop_shape for p in preprocessings))
        with ExitStack() as stack, slots.held(self.timeout_s) as slot:
            ref = None
            if fetched is not None:
                ref = stack.enter_context(closing(FetchedBytes(fetched))).ref
            job = IntakeJob(uri, declared_sha256, tuple(preprocessings), slots.ref(slot), ref)
            result = self.run(job)
            stack.close()  # the process has read the bytes: they need not wait for the block
            yield with_slot_pixels(result, slots.views(slot)), result.times

    def slots_for(self, shapes: Shapes) -> CropSlots:
        with self._lock:
            slots = self._slots.get(shapes)
            if slots is None:
                slots = self._slots[shapes] = CropSlots(self.slot_count, shapes)
                logger.info(
                    "intake: %d crop slots of %d KB for crops of %s",
                    self.slot_count,
                    slots.slot_bytes // 1024,
                    list(shapes),
                )
            return slots

    def run(self, job: IntakeJob) -> IntakeResult:
        """Screen one job in a process, waiting at most `timeout_s` for one to take it.
        Raises what intake raised, there; `IntakeProcessLost` or `IntakeStalled` if its
        process died or stalled on it. A job its process had not taken from its pipe when it
        died or stalled never started: it goes to another process, at no cost to its
        upload."""
        for _ in range(_SENDS):
            member, sent = self._send(job)
            outcome = self._answer(member, sent)
            if outcome is not NOT_STARTED:
                break
        else:
            raise IntakeProcessLost(
                f"intake processes were lost {_SENDS} times before this upload started"
            )
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, IntakeResult), outcome
        return outcome

    def close(self) -> None:
        """Stop every process (each finishes the jobs it holds, within `_JOIN_S`) and free
        the shared memory."""
        with self._lock:
            self._closed = True
            members = list(self._members)
            readers = list(self._readers)
        self._closing.set()
        for member in members:
            with member.lock, suppress(OSError):
                member.connection.send(None)
        deadline = time.monotonic() + _JOIN_S
        for member, reader in zip(members, readers, strict=True):
            reader.join(timeout=max(0.0, deadline - time.monotonic()))
            if reader.is_alive():  # still busy: killed, which ends its reader
                member.process.kill()
                reader.join()
        for slots in self._slots.values():
            slots.close()

    # A task thread's side.

    def _send(self, job: IntakeJob) -> tuple[Member, Sent]:
        """Send the job to the process holding the fewest (an idle one if any, so that a
        job never queues behind a slow fetch while another process waits)."""
        deadline = time.monotonic() + self.timeout_s
        with self._can_send:
            while True:
                open_to_more = [
                    m for m in self._members if not m.lost and len(m.sent) < self.jobs_per_process
                ]
                if open_to_more:
                    member = min(open_to_more, key=lambda m: len(m.sent))
                    sent = member.send(job)
                    if sent is not None:
                        return member, sent
                    continue  # it has just died: another
                if not self._can_send.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise IntakeStalled(
                        f"no intake process free within {self.timeout_s:g} s "
                        f"({self.processes} processes)"
                    )

    def _answer(self, member: Member, sent: Sent) -> object:
        """The job's answer, from its process's reader. The reader holds each of the
        process's messages to `timeout_s`; this longer limit only guards against the reader
        itself failing."""
        limit_s = (self.jobs_per_process + 1) * self.timeout_s
        try:
            return sent.answer.result(timeout=limit_s)
        except FutureTimeout:
            logger.error(
                "intake process %s: no answer for %s within %g s; killing it",
                member.process.pid,
                sent.job.uri,
                limit_s,
            )
            member.process.kill()  # before the caller lets the job's crop slot go
            with suppress(FutureTimeout):
                sent.answer.result(timeout=_JOIN_S)
            raise IntakeStalled(f"intake gave no answer within {limit_s:g} s") from None

    # The reader's side: one thread per process.

    def _read(self, member: Member) -> None:
        """Answers in the order the jobs were sent, requests for decode memory served,
        silences timed. When the process dies or stalls, it is killed and replaced, and
        only then are its jobs answered, so it cannot write a slot that a caller let go."""
        fault: TransientFault
        # The running job's reservations: they end with its answer or the process's death.
        with ExitStack() as reservation:
            try:
                while True:
                    message = self._next_message(member)
                    if isinstance(message, Reserve):
                        reservation.enter_context(self.decode_memory.reserve(message.nbytes))
                        member.grant()
                    elif message is RELEASE:
                        reservation.close()
                        member.heard()
                    else:
                        reservation.close()
                        answered = member.answered()
                        with self._can_send:
                            self._can_send.notify()
                        answered.answer.set_result(message)
            except _NoAnswer:
                fault = IntakeStalled(f"intake gave no answer within {self.timeout_s:g} s")
            except (EOFError, OSError):
                fault = IntakeProcessLost("the intake process died while screening this upload")
            except BaseException:
                logger.exception("intake process %s: its reader failed", member.process.pid)
                fault = IntakeProcessLost("the intake process's reader failed")
            finally:
                member.process.kill()
                member.process.join(timeout=_JOIN_S)
        self._lose(member, fault)

    def _next_message(self, member: Member) -> object:
        """Raises `_NoAnswer` once the process has been silent on a job for `timeout_s`."""
        while True:
            silent_s = member.silent_for()
            if silent_s is not None and silent_s >= self.timeout_s:
                raise _NoAnswer
            wait_s = self.timeout_s if silent_s is None else self.timeout_s - silent_s
            if member.connection.poll(wait_s):
                return member.connection.recv()

    def _lose(self, member: Member, fault: TransientFault) -> None:
        """The process is dead: replace it (unless the pool is closing) and answer its
        jobs: the one it was working on gets the fault, those it had not taken go to another
        process."""
        running, not_started = member.give_up()
        member.connection.close()
        try:
            with self._lock:
                index = self._members.index(member)
                del self._members[index], self._readers[index]
                replace = not self._closed
            if replace:
                self._pace_replacement()
                with self._lock:
                    if not self._closed:
                        self.replaced += 1
                        self._start()
        finally:
            self._log_loss(member, running, len(not_started), fault)
            if running is not None:
                running.answer.set_result(fault)
            for sent in not_started:
                sent.answer.set_result(NOT_STARTED)

    def _pace_replacement(self) -> None:
        """Wait, if processes have been replaced more than twice each (at least 4 times)
        within `replacement_window_s`: processes that die as soon as they start (a crash at
        import, the OOM killer) are then replaced a few times a window, not in a loop that
        takes a core. Jobs wait for a process meanwhile, each within its own timeout."""
        limit = max(4, 2 * self.processes)
        with self._lock:
            now = time.monotonic()
            recent = self._replacement_times
            while recent and now - recent[0] > self.replacement_window_s:
                recent.popleft()
            wait_s = recent[-limit] + self.replacement_window_s - now if len(recent) >= limit else 0
            recent.append(now + max(0.0, wait_s))
        if wait_s > 0:
            logger.warning(
                "intake: %d processes replaced within %g s; starting the next in %.1f s",
                limit,
                self.replacement_window_s,
                wait_s,
            )
            self._closing.wait(wait_s)

    def _log_loss(
        self, member: Member, running: Sent | None, not_started: int, fault: TransientFault
    ) -> None:
        pid, stalled = member.process.pid, isinstance(fault, IntakeStalled)
        if running is not None and stalled:
            logger.error(
                "intake process %s gave no answer for %s within %g s; killed it, started another",
                pid,
                running.job.uri,
                self.timeout_s,
            )
        elif running is not None:
            logger.error(
                "intake process %s died screening %s (exit code %s); started another",
                pid,
                running.job.uri,
                member.process.exitcode,
            )
        elif not_started and stalled:
            logger.error(
                "intake process %s took no job from its pipe within %g s; killed it, "
                "started another",
                pid,
                self.timeout_s,
            )
        elif not_started:
            logger.error(
                "intake process %s died before taking the job in its pipe (exit code %s); "
                "started another",
                pid,
                member.process.exitcode,
            )
        if not_started:
            behind = "queued behind it" if running is not None else "it had not taken"
            logger.info("intake: %d upload(s) %s sent again", not_started, behind)

    def _start(self) -> None:
        """Start a process and its reader; the caller holds `_lock`."""
        ours, theirs = self._context.Pipe()
        taken = self._context.RawValue(ctypes.c_uint64)
        process = self._context.Process(
            target=serve,
            args=(theirs, self.settings, taken),
            kwargs={"allowance_bytes": self._allowance_bytes},
            name="intake",
            daemon=True,
        )
        process.start()
        theirs.close()
        member = Member(process, ours, taken)
        reader = threading.Thread(
            target=self._read, args=(member,), name=f"intake-{process.pid}", daemon=True
        )
        self._members.append(member)
        self._readers.append(reader)
        reader.start()
        self._can_send.notify(self.jobs_per_process)


# A job is sent again when the process it was queued in was lost before taking it; at most
# this many sends in all.
_SENDS = 3
# How long a killed process is given to be reaped, and a closing one to finish its jobs.
_JOIN_S = 10.0


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
