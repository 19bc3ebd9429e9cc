"""Inside an intake process: `serve` takes jobs from the pipe one at a time, in the order
sent, runs the intake stage on each, writes the first sampled frame's crops (one per
model) into the job's slot of shared memory and answers with the signals, without them.

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
    SlotRef,
)
from moderation.worker.intake.slots import slot_views
from moderation.worker.intake.stage import IntakeContext, fetch_and_extract

logger = logging.getLogger(__name__)


def serve(
    connection: Connection,
    settings: Settings,
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
    memories = _SharedBlocks()
    inbox = _Inbox(connection)
    context = IntakeContext(settings, _DecodeMemoryFromWorker(inbox, allowance_bytes))
    while True:
        try:
            job = inbox.next_job()
        except (EOFError, OSError):  # the worker is gone
            break
        if job is None:
            break
        assert isinstance(job, IntakeJob), job
        taken.value += 1
        connection.send(_screen_job(context, job, memories))
    memories.close()


class _SharedBlocks:
    """The worker's blocks of crop memory this process has attached, by name (a block per
    set of crop shapes: a new one when the worker starts computing another model)."""

    def __init__(self) -> None:
        self._attached: dict[str, SharedMemory] = {}

    def get(self, name: str) -> SharedMemory:
        memory = self._attached.get(name)
        if memory is None:
            # The worker owns the block and unlinks it. Attaching registers it again with
            # the resource tracker, which the forkserver's children share with the worker: a
            # set, so that is harmless, while unregistering here would make the worker's
            # unlink fail there.
            memory = self._attached[name] = SharedMemory(name=name)
        return memory

    def close(self) -> None:
        for memory in self._attached.values():
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
    context: IntakeContext, job: IntakeJob, memories: _SharedBlocks
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
    return _move_first_crops_to_slot(signals, times, memories.get(job.slot.memory), job.slot)


def _move_first_crops_to_slot(
    signals: ImageSignals, times: IntakeTimes, memory: SharedMemory, slot: SlotRef
) -> IntakeResult:
    """Put the first sampled frame's crops in the slot and send the rest without them."""
    frames = list(signals.frames)
    position = next(i for i, frame in enumerate(frames) if frame.pixels is not None)
    crops = frames[position].crops
    views = slot_views(memory, slot)
    assert [c.shape for c in crops] == [v.shape for v in views], (slot.shapes, len(crops))
    for crop, view in zip(crops, views, strict=True):
        view[...] = crop
    frames[position] = dataclasses.replace(frames[position], pixels=None, more_pixels=())
    return IntakeResult(dataclasses.replace(signals, frames=frames), position, times)
