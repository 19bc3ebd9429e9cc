"""Inside an intake process: `serve` takes jobs from the pipe one at a time, in the order
sent, runs the intake stage on each, writes the first crop into the job's slot of shared
memory and answers with the signals, without pixels.

A decode larger than the process's own allowance asks the worker, over the same pipe, to
reserve the memory from the budget all the processes share (`_DecodeMemoryFromWorker`);
the worker sends the next job while this one runs, so the jobs that arrive meanwhile wait
in the `_Inbox`. The pool's side of all this is in `pool.py`.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

from moderation.config import Settings
from moderation.embedding.clip import Preprocessing
from moderation.images.budget import RELEASE_AFTER_BYTES
from moderation.images.errors import IntakeError
from moderation.images.memory import configure_allocator, release_free_memory
from moderation.images.signals import ImageSignals
from moderation.worker.intake.jobs import (
    GRANTED,
    RELEASE,
    IntakeJob,
    IntakeResult,
    IntakeTimes,
    Reserve,
)
from moderation.worker.intake.slots import slot_view
from moderation.worker.intake.stage import IntakeContext, fetch_and_extract

logger = logging.getLogger(__name__)


def serve(
    connection: Connection,
    settings: Settings,
    memory_name: str,
    crop_shape: tuple[int, int, int],
    taken: ctypes.c_uint64,
    *,
    allowance_bytes: int,
) -> None:
    """An intake process's loop: one job at a time, in the order sent, until told to stop
    or the worker is gone. `taken` (in shared memory) counts the jobs taken from the pipe,
    so that if this process dies the worker knows whether it had started the next."""
    import torch

    configure_allocator()
    torch.set_num_threads(1)  # PDQ's products; the pool is the parallelism
    # The worker owns the block and unlinks it. Attaching registers it again with the
    # resource tracker, which the forkserver's children share with the worker: a set, so
    # that is harmless, while unregistering here would make the worker's unlink fail there.
    memory = SharedMemory(name=memory_name)
    inbox = _Inbox(connection)
    context = IntakeContext(
        settings,
        Preprocessing.from_pretrained(settings.resolved_model()),
        _DecodeMemoryFromWorker(inbox, allowance_bytes),
    )
    while True:
        try:
            job = inbox.next_job()
        except (EOFError, OSError):  # the worker is gone
            break
        if job is None:
            break
        assert isinstance(job, IntakeJob), job
        taken.value += 1
        connection.send(_screen_job(context, job, memory, crop_shape))
    memory.close()


class _Inbox:
    """An intake process's end of its pipe. The worker sends the next job while this one
    runs, so a job (or the request to stop) can arrive while the process waits for decode
    memory: it is kept, in order, for when the process asks for its next job."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._early: collections.deque[object] = collections.deque()

    def next_job(self) -> object:
        return self._early.popleft() if self._early else self.connection.recv()

    def wait_for_grant(self) -> None:
        while (message := self.connection.recv()) is not GRANTED:
            self._early.append(message)


class _DecodeMemoryFromWorker:
    """An intake process's decode budget: its own allowance, and beyond it a reservation
    held by the worker for it, so that one budget bounds all processes together. (A
    budget of its own per process could not: one process decodes one image at a time,
    and every process could hold a 50-megapixel frame at once.)"""

    def __init__(self, inbox: _Inbox, allowance_bytes: int) -> None:
        self._inbox = inbox
        self._allowance_bytes = allowance_bytes

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        if nbytes <= self._allowance_bytes:
            yield
            return
        self._inbox.connection.send(Reserve(nbytes))
        self._inbox.wait_for_grant()
        try:
            yield
        finally:
            self._inbox.connection.send(RELEASE)
            if nbytes >= RELEASE_AFTER_BYTES:  # freed pixels go back to the system
                release_free_memory()


def _screen_job(
    context: IntakeContext,
    job: IntakeJob,
    memory: SharedMemory,
    crop_shape: tuple[int, int, int],
) -> IntakeResult | BaseException:
    try:
        signals, times = fetch_and_extract(context, job)
    except IntakeError as error:
        return error  # typed errors cross back as themselves (they pickle by message)
    except Exception as exc:
        logger.exception("intake of %s failed unexpectedly", job.uri)
        return RuntimeError(f"intake failed: {type(exc).__name__}: {exc}")
    if job.slot is None:
        return IntakeResult(signals, None, times)
    return _move_first_crop_to_slot(signals, times, memory, job.slot, crop_shape)


def _move_first_crop_to_slot(
    signals: ImageSignals,
    times: IntakeTimes,
    memory: SharedMemory,
    slot: int,
    crop_shape: tuple[int, int, int],
) -> IntakeResult:
    """Put the first sampled frame's crop in the slot and send the rest without it."""
    frames = list(signals.frames)
    position = next(i for i, frame in enumerate(frames) if frame.pixels is not None)
    pixels = frames[position].pixels
    assert pixels is not None
    assert pixels.shape == crop_shape, (pixels.shape, crop_shape)
    slot_view(memory, slot, crop_shape)[...] = pixels
    frames[position] = dataclasses.replace(frames[position], pixels=None)
    return IntakeResult(dataclasses.replace(signals, frames=frames), position, times)
