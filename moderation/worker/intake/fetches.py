"""Fetching apart from the CPU work: an upload's http(s) bytes are fetched on its
screening thread, under fetch slots of the worker's own, before it takes a crop slot or an
intake process.

A fetch waits on the network, up to `fetch_timeout_s` (a wall-clock deadline for the whole
attempt: connect, redirects, body). Made inside an intake process, it held that process,
one of a core's worth, for as long: on two cores one normal upload took 0.9 s alone and
80 s behind eight URIs whose servers trickle their headers. Here it holds a thread, and the
screening threads and Celery's task threads are sized for `worker_fetches` uploads in
fetch beyond the uploads the CPU stages hold (`Screener`, `moderation worker`), so that up
to that many slow servers delay only their own uploads.

Each fetch holds one of `worker_fetches` slots, and one of `worker_fetches_per_host` for
its host: a slow or hostile host holds at most that many, and the uploads behind them
wait here (up to `intake_timeout_s`, then retried as `IntakeStalled`), not in an intake
process. Uploads do not record who submitted them, so there is no per-submitter limit.

`file://` URIs and plain paths are read by the intake process as before: a local read
does not wait on anyone.

The bytes reach the intake process in a block of shared memory of their own
(`FetchedBytes`), not down its pipe: a job is sent while the process works on the one
before, and a large body blocking in the pipe would hold the pool's lock meanwhile.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from multiprocessing.shared_memory import SharedMemory
from urllib.parse import urlsplit

from moderation.config import Settings
from moderation.images.fetch import fetch
from moderation.images.fetch_slots import FetchSlots, host_of
from moderation.images.uri_policy import UriPolicy
from moderation.worker.intake.jobs import FetchedRef, IntakeStalled

LOCAL_SCHEMES = frozenset({"", "file"})


def fetched_here(uri: str) -> bool:
    """Whether the worker fetches `uri` itself (http(s)); local files are read in intake."""
    scheme = urlsplit(uri).scheme.lower()
    return not (scheme in LOCAL_SCHEMES or len(scheme) == 1)  # "c:" is a Windows path


class FetchGate:
    """The worker's fetch slots, in all and per host (`images.fetch_slots`). Unlike the
    API, which refuses a fetch past them at once, a fetch here waits for its slots: the
    upload has nowhere better to wait, and its message stays unacknowledged until it is
    screened."""

    def __init__(self, total: int, per_host: int) -> None:
        self.slots = FetchSlots(total, per_host)

    @property
    def in_flight(self) -> int:
        return self.slots.in_flight

    def in_flight_to(self, host: str) -> int:
        return self.slots.in_flight_to(host)

    def held(self, host: str, timeout_s: float) -> AbstractContextManager[None]:
        """A slot in all and one for `host` while the block runs; `IntakeStalled` if they
        do not free within `timeout_s`."""

        def stalled(host_full: bool) -> IntakeStalled:
            if host_full:
                return IntakeStalled(
                    f"no fetch slot for {host} freed within {timeout_s:g} s "
                    f"({self.slots.per_host} fetches from it in flight: "
                    "MODERATION_WORKER_FETCHES_PER_HOST)"
                )
            return IntakeStalled(
                f"no fetch slot freed within {timeout_s:g} s ({self.slots.total} fetches in "
                "flight: MODERATION_WORKER_FETCHES)"
            )

        return self.slots.held(host, timeout_s, stalled)


class FetchedBytes:
    """Bytes fetched by the worker, in a block of shared memory of their own until the
    intake job that reads them is answered (`close`). A worker that dies leaves the block to
    the resource tracker, which unlinks it."""

    def __init__(self, data: bytes) -> None:
        # A block cannot be empty: an empty body gets one byte, and its size says 0.
        self._memory = SharedMemory(create=True, size=max(1, len(data)))
        buffer = self._memory.buf
        assert buffer is not None  # None only once closed
        buffer[: len(data)] = data
        self.ref = FetchedRef(self._memory.name, len(data))

    def close(self) -> None:
        self._memory.close()
        self._memory.unlink()


def read_fetched(ref: FetchedRef) -> bytes:
    """In an intake process: the bytes the worker fetched. (Attaching registers the block
    with the resource tracker the forkserver's children share with the worker: harmless,
    see `process._SharedBlocks`.)"""
    memory = SharedMemory(name=ref.memory)
    try:
        buffer = memory.buf
        assert buffer is not None  # None only once closed
        return bytes(buffer[: ref.size])
    finally:
        memory.close()


class WorkerFetches:
    """The worker's http(s) fetches, under its `FetchGate`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = UriPolicy.from_settings(settings)
        # None (`worker_fetches` 0): the intake processes fetch everything, as before.
        self.gate = (
            FetchGate(settings.worker_fetches, settings.worker_fetches_per_host)
            if settings.worker_fetches
            else None
        )

    def fetch(self, uri: str) -> bytes | None:
        """The bytes at an http(s) `uri`, within `fetch_timeout_s` once its slots are held;
        None for a local file, or when the worker does not fetch (read by intake). Raises
        `BadInput` or `TransientFault` as intake does."""
        if self.gate is None or not fetched_here(uri):
            return None
        # The policy checks the URI before it holds a slot: a refused URI waits for none.
        canonical = self.policy.check_location(uri)
        host = host_of(canonical)
        with self.gate.held(host, self.settings.intake_timeout_s):
            return fetch(
                canonical,
                policy=self.policy,
                max_bytes=self.settings.max_bytes,
                timeout_s=self.settings.fetch_timeout_s,
            )
