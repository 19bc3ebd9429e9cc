"""Intake: an upload's bytes to its signals and its preprocessed crops, in other processes.

Fetch, SHA-256, decode, PDQ and the CLIP resize-and-crop are pure Python and C under the
GIL. In the worker process, beside Celery, the database writers and the model, they kept
one interpreter busy: one worker reached 50 uploads/s on an H100 (its model alone: 860).
An `IntakePool` runs them in processes of their own, one image at a time each, one BLAS
and OpenMP thread each (with more, 16 processes managed 66 images/s in all instead of
1,187).

Crops do not travel through pipes: pickling a 338 KB crop back through a pool's result
pipe held a 14-process probe to 211 images/s, against 835 with the crops kept out of it.
The worker process owns one block of shared memory cut into slots of one crop each. A task
thread takes a free slot and an idle intake process, sends a small job (uri, declared
SHA-256, slot number) down that process's pipe, and gets back the signals without pixels;
the first sampled frame's crop is in the slot, and only the rare further frames of an
animation come back pickled. The slot stays the task's until its upload is recorded.

One decode budget (`decode_memory_mb`) bounds all the processes together: a process
decodes a small image within an allowance of its own, and asks the worker, over its pipe,
to reserve anything larger from the rest; the worker drops a reservation when the
process answers or dies, so a killed process never keeps memory reserved.

Each intake process serves one job at a time over its own pipe, so a failure is always
attributed to one upload: if the process dies (SIGKILL, the OOM killer, a crash in a
decoder) the pipe reports end-of-file, the pool starts a replacement, and that upload
alone is retried (`IntakeProcessLost`); if it does not answer within `intake_timeout_s`,
it is killed and replaced the same way (`IntakeStalled`). Both are transient faults: the
upload's attempt counter still fails an image that kills its intake every time.

Processes are started by a forkserver that has imported this module, so a replacement
starts in milliseconds, without the worker's threads, and with the environment that caps
its BLAS and OpenMP threads.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Protocol

import numpy as np

from moderation.config import Settings
from moderation.embedding.clip import Preprocessing
from moderation.images.budget import RELEASE_AFTER_BYTES, Budget, MemoryBudget
from moderation.images.decode import DecodeLimits
from moderation.images.errors import ContentMismatch, IntakeError, TransientFault
from moderation.images.fetch import fetch
from moderation.images.hashing import sha256
from moderation.images.memory import configure_allocator, release_free_memory
from moderation.images.signals import ImageSignals, extract_signals
from moderation.images.uri_policy import UriPolicy

logger = logging.getLogger(__name__)

# Set in the forkserver's environment, so every intake process has one thread of each.
_ONE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


class IntakeProcessLost(TransientFault):
    """The intake process screening this upload died; a replacement has been started."""

    code = "intake_process_lost"


class IntakeStalled(TransientFault):
    """Intake did not answer in time: a stage waited past its timeout. Retried."""

    code = "intake_stalled"


@dataclass(frozen=True)
class IntakeJob:
    uri: str
    declared_sha256: bytes | None
    slot: int | None  # where to put the first sampled frame's crop; None: return it


@dataclass(frozen=True)
class IntakeTimes:
    """Seconds one upload's intake spent in each step (for the benchmark's stage times)."""

    fetch: float = 0.0
    decode_hash_preprocess: float = 0.0


@dataclass(frozen=True)
class IntakeResult:
    """An upload's signals; with a slot, the frame at `slot_frame` has its pixels there."""

    signals: ImageSignals
    slot_frame: int | None
    times: IntakeTimes


# Decodes whose estimated peak is below this (about 5 megapixels) need not ask the worker
# for memory: a round trip per image would cost the worker's interpreter more than the
# decode costs an intake process.
SMALL_DECODE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class _Reserve:
    nbytes: int


class _Message(enum.Enum):
    GRANTED = "granted"
    RELEASE = "release"


_GRANTED, _RELEASE = _Message.GRANTED, _Message.RELEASE


class _NoAnswer(Exception):
    pass


class _DecodeMemoryFromWorker:
    """An intake process's decode budget: its own allowance, and beyond it a reservation
    held by the worker for it, so that one budget bounds all processes together. (A
    budget of its own per process could not: one process decodes one image at a time,
    and every process could hold a 50-megapixel frame at once.)"""

    def __init__(self, connection: Connection, allowance_bytes: int) -> None:
        self._connection = connection
        self._allowance_bytes = allowance_bytes

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        if nbytes <= self._allowance_bytes:
            yield
            return
        self._connection.send(_Reserve(nbytes))
        if self._connection.recv() is not _GRANTED:  # the worker is stopping
            raise SystemExit(0)
        try:
            yield
        finally:
            self._connection.send(_RELEASE)
            if nbytes >= RELEASE_AFTER_BYTES:  # freed pixels go back to the system
                release_free_memory()


class IntakeContext:
    """What intake needs, built once per process (or once per worker when intake runs in
    the task threads)."""

    def __init__(self, settings: Settings, preprocess: Preprocessing, budget: Budget):
        self.settings = settings
        self.preprocess = preprocess
        self.limits = DecodeLimits.from_settings(settings)
        self.uri_policy = UriPolicy.from_settings(settings)
        self.decode_memory = budget


def fetch_and_extract(context: IntakeContext, job: IntakeJob) -> tuple[ImageSignals, IntakeTimes]:
    """The intake stage: fetch, check the declared bytes, decode, hash, preprocess.
    Raises `BadInput` or `TransientFault`."""
    settings = context.settings
    started = time.perf_counter()
    data = fetch(
        job.uri,
        policy=context.uri_policy,
        max_bytes=settings.max_bytes,
        timeout_s=settings.fetch_timeout_s,
    )
    fetched = time.perf_counter()
    check_declared_bytes(data, job.declared_sha256)
    signals = extract_signals(data, context.limits, context.preprocess, context.decode_memory)
    return signals, IntakeTimes(fetched - started, time.perf_counter() - fetched)


def check_declared_bytes(data: bytes, declared_sha256: bytes | None) -> None:
    """Refuse bytes other than those submitted (the file was replaced after submission)
    before paying for their decode."""
    if declared_sha256 is not None and sha256(data) != declared_sha256:
        raise ContentMismatch(
            f"the bytes at the URI are not the ones submitted: SHA-256 {sha256(data).hex()}, "
            f"declared {declared_sha256.hex()}"
        )


class Intake(Protocol):
    """Where intake runs: in processes of its own (`IntakePool`) or in the calling thread
    (`InThreadIntake`, for `MODERATION_INTAKE_PROCESSES=0`)."""

    def screened(
        self, uri: str, declared_sha256: bytes | None
    ) -> AbstractContextManager[tuple[ImageSignals, IntakeTimes]]:
        """An upload's signals, its crops usable until the block ends. Raises `BadInput`
        or `TransientFault`."""
        ...

    def close(self) -> None: ...


class InThreadIntake:
    def __init__(self, settings: Settings, preprocess: Preprocessing) -> None:
        budget = MemoryBudget(settings.decode_memory_mb * 2**20)
        self._context = IntakeContext(settings, preprocess, budget)

    @contextmanager
    def screened(
        self, uri: str, declared_sha256: bytes | None
    ) -> Iterator[tuple[ImageSignals, IntakeTimes]]:
        yield fetch_and_extract(self._context, IntakeJob(uri, declared_sha256, slot=None))

    def close(self) -> None:
        pass


def build_intake(settings: Settings, preprocess: Preprocessing, *, slots: int) -> Intake:
    """The configured intake: `resolved_intake_processes()` processes, or the task threads."""
    processes = settings.resolved_intake_processes()
    if processes == 0:
        return InThreadIntake(settings, preprocess)
    return IntakePool(
        settings,
        processes=processes,
        slots=slots,
        crop_shape=(preprocess.crop_height, preprocess.crop_width, 3),
        timeout_s=settings.intake_timeout_s,
    )


class CropSlots:
    """Shared memory cut into slots of one crop each, handed out to task threads."""

    def __init__(self, count: int, crop_shape: tuple[int, int, int]) -> None:
        self.count = count
        self.crop_shape = crop_shape
        self.slot_bytes = int(np.prod(crop_shape))
        self.memory = SharedMemory(create=True, size=count * self.slot_bytes)
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(count):
            self._free.put(slot)

    @contextmanager
    def held(self, timeout_s: float) -> Iterator[int]:
        """A free slot for the duration; raises `IntakeStalled` if none frees in time."""
        try:
            slot = self._free.get(timeout=timeout_s)
        except queue.Empty:
            raise IntakeStalled(
                f"no crop slot freed within {timeout_s:g} s ({self.count} slots)"
            ) from None
        try:
            yield slot
        finally:
            self._free.put(slot)

    def view(self, slot: int) -> np.ndarray:
        return slot_view(self.memory, slot, self.crop_shape)

    def close(self) -> None:
        self.memory.close()
        self.memory.unlink()


def slot_view(memory: SharedMemory, slot: int, shape: tuple[int, int, int]) -> np.ndarray:
    size = int(np.prod(shape))
    return np.ndarray(shape, dtype=np.uint8, buffer=memory.buf, offset=slot * size)


@dataclass
class _Member:
    """One intake process and the worker's end of its pipe."""

    process: BaseProcess
    connection: Connection


class IntakePool:
    """`processes` intake processes; `run` screens one job in one of them, from any thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        processes: int,
        slots: int,
        crop_shape: tuple[int, int, int],
        timeout_s: float,
    ) -> None:
        self.settings = settings
        self.processes = processes
        self.timeout_s = timeout_s
        self.slots = CropSlots(slots, crop_shape)
        self.replaced = 0
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([__name__])
        # The decode budget holds over all the processes (see `_DecodeMemoryFromWorker`):
        # each decodes within an allowance of its own without asking, and reserves anything
        # larger from the rest, which the worker holds.
        total = settings.decode_memory_mb * 2**20
        self._allowance_bytes = min(SMALL_DECODE_BYTES, total // (2 * processes))
        self.decode_memory = MemoryBudget(
            total - processes * self._allowance_bytes, release_after_bytes=None
        )
        self._idle: queue.Queue[_Member] = queue.Queue()
        self._members: list[_Member] = []
        self._lock = threading.Lock()
        self._closed = False
        with _environment(_ONE_THREAD_ENV):  # read by the forkserver when it starts
            for _ in range(processes):
                self._idle.put(self._start())
        logger.info(
            "intake: %d processes, %d crop slots of %d KB in shared memory",
            processes,
            slots,
            self.slots.slot_bytes // 1024,
        )

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [m.process.pid for m in self._members if m.process.pid is not None]

    def run(self, job: IntakeJob) -> IntakeResult:
        """Screen one job in an idle process, waiting at most `timeout_s` for one to be
        free and as long again for its answer. Raises what intake raised, there."""
        try:
            member = self._idle.get(timeout=self.timeout_s)
        except queue.Empty:
            raise IntakeStalled(
                f"no intake process free within {self.timeout_s:g} s ({self.processes} processes)"
            ) from None
        try:
            outcome = self._exchange(member, job)
        except _NoAnswer:
            logger.error(
                "intake process %s gave no answer for %s within %g s; killing it",
                member.process.pid,
                job.uri,
                self.timeout_s,
            )
            self._replace(member)
            raise IntakeStalled(f"intake gave no answer within {self.timeout_s:g} s") from None
        except (EOFError, OSError):
            logger.error(
                "intake process %s died screening %s (exit code %s); starting another",
                member.process.pid,
                job.uri,
                _exit_code(member.process),
            )
            self._replace(member)
            raise IntakeProcessLost("the intake process died while screening this upload") from None
        self._idle.put(member)
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, IntakeResult), outcome
        return outcome

    def _exchange(self, member: _Member, job: IntakeJob) -> object:
        """Send a job, serve the process's requests for decode memory, and return its
        answer. Its reservations end with its answer or its death, whichever comes first,
        so a killed process never keeps any. Each message must come within `timeout_s`
        (time spent waiting here for memory that others hold does not count)."""
        with ExitStack() as reservation:
            member.connection.send(job)
            while True:
                if not member.connection.poll(self.timeout_s):
                    raise _NoAnswer
                message = member.connection.recv()
                if isinstance(message, _Reserve):
                    reservation.enter_context(self.decode_memory.reserve(message.nbytes))
                    member.connection.send(_GRANTED)
                elif message is _RELEASE:
                    reservation.close()
                else:
                    return message

    @contextmanager
    def screened(
        self, uri: str, declared_sha256: bytes | None
    ) -> Iterator[tuple[ImageSignals, IntakeTimes]]:
        """Intake in a process, the first crop in a slot of shared memory that stays this
        caller's until the block ends (the forward pass copies it out)."""
        with self.slots.held(self.timeout_s) as slot:
            result = self.run(IntakeJob(uri, declared_sha256, slot))
            yield with_slot_pixels(result, self.slots.view(slot)), result.times

    def close(self) -> None:
        """Stop every process (each finishes its job first) and free the shared memory."""
        with self._lock:
            self._closed = True
            members = list(self._members)
        for member in members:
            with suppress(OSError):
                member.connection.send(None)
        for member in members:
            member.process.join(timeout=10)
            if member.process.is_alive():
                member.process.kill()
                member.process.join()
            member.connection.close()
        self.slots.close()

    def _start(self) -> _Member:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=serve,
            args=(theirs, self.settings, self.slots.memory.name, self.slots.crop_shape),
            kwargs={"allowance_bytes": self._allowance_bytes},
            name="intake",
            daemon=True,
        )
        process.start()
        theirs.close()
        member = _Member(process, ours)
        with self._lock:
            self._members.append(member)
        return member

    def _replace(self, member: _Member) -> None:
        member.process.kill()
        member.process.join(timeout=10)
        member.connection.close()
        with self._lock:
            self._members.remove(member)
            if self._closed:
                return
            self.replaced += 1
        self._idle.put(self._start())


def _exit_code(process: BaseProcess) -> int | None:
    process.join(timeout=1)
    return process.exitcode


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


# The intake process.


def serve(
    connection: Connection,
    settings: Settings,
    memory_name: str,
    crop_shape: tuple[int, int, int],
    *,
    allowance_bytes: int,
) -> None:
    """An intake process's loop: one job at a time from its pipe until told to stop or the
    worker is gone."""
    import torch

    configure_allocator()
    torch.set_num_threads(1)  # PDQ's products; the pool is the parallelism
    # The worker owns the block and unlinks it. Attaching registers it again with the
    # resource tracker, which the forkserver's children share with the worker: a set, so
    # that is harmless, while unregistering here would make the worker's unlink fail there.
    memory = SharedMemory(name=memory_name)
    context = IntakeContext(
        settings,
        Preprocessing.from_pretrained(settings.resolved_model()),
        _DecodeMemoryFromWorker(connection, allowance_bytes),
    )
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):  # the worker is gone
            break
        if job is None:
            break
        connection.send(_screen_job(context, job, memory, crop_shape))
    memory.close()


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


def with_slot_pixels(result: IntakeResult, pixels: np.ndarray) -> ImageSignals:
    """The signals as intake made them, the slot's crop back in its frame."""
    if result.slot_frame is None:
        return result.signals
    frames = list(result.signals.frames)
    frames[result.slot_frame] = dataclasses.replace(frames[result.slot_frame], pixels=pixels)
    return dataclasses.replace(result.signals, frames=frames)
