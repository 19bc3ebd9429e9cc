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

Each fetch holds one of `worker_fetches` slots, one of `worker_fetches_per_host` for its
host and one of `worker_fetches_per_submitter` for whoever submitted the upload (the API
key, or the operator at the command line): a slow or hostile host, or a submitter whose
URIs all lead to slow servers, holds at most that many, and the uploads behind them wait
here (up to `intake_timeout_s`, then retried as `IntakeStalled`), not in an intake process.

The bodies are held under a byte budget (`worker_fetch_memory_mb`, `images.body_budget`)
from their first byte until their upload is screened: slots alone would let
(fetches + uploads waiting for intake) x `max_bytes` pile up in the worker.

`file://` URIs and plain paths are read by the intake process as before: a local read
does not wait on anyone.

The bytes reach the intake process in a block of shared memory of their own
(`FetchedBytes`), not down its pipe: a job is sent while the process works on the one
before, and a large body blocking in the pipe would hold the pool's lock meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from multiprocessing.shared_memory import SharedMemory
from urllib.parse import urlsplit

from moderation.config import Settings
from moderation.images.body_budget import BodyBudget
from moderation.images.fetch import fetch
from moderation.images.fetch_slots import FetchSlots, Full, host_of
from moderation.images.uri_policy import UriPolicy
from moderation.worker.intake.jobs import FetchedRef, IntakeStalled

LOCAL_SCHEMES = frozenset({"", "file"})


def fetched_here(uri: str) -> bool:
    """Whether the worker fetches `uri` itself (http(s)); local files are read in intake."""
    scheme = urlsplit(uri).scheme.lower()
    return not (scheme in LOCAL_SCHEMES or len(scheme) == 1)  # "c:" is a Windows path


class FetchGate:
    """The worker's fetch slots, in all, per host and per submitter (`images.fetch_slots`).
    Unlike the API, which refuses a fetch past them at once, a fetch here waits for its
    slots: the upload has nowhere better to wait, and its message stays unacknowledged
    until it is screened."""

    def __init__(self, total: int, per_host: int, per_submitter: int | None = None) -> None:
        self.slots = FetchSlots(total, per_host, per_submitter)

    @property
    def in_flight(self) -> int:
        return self.slots.in_flight

    def in_flight_to(self, host: str) -> int:
        return self.slots.in_flight_to(host)

    def in_flight_for(self, submitter: str) -> int:
        return self.slots.in_flight_for(submitter)

    def held(
        self, host: str, timeout_s: float, submitter: str = ""
    ) -> AbstractContextManager[None]:
        """A slot in all, one for `host` and one for `submitter` while the block runs;
        `IntakeStalled` if they do not free within `timeout_s`."""

        def stalled(full: Full) -> IntakeStalled:
            if full == "host":
                return IntakeStalled(
                    f"no fetch slot for {host} freed within {timeout_s:g} s "
                    f"({self.slots.per_host} fetches from it in flight: "
                    "MODERATION_WORKER_FETCHES_PER_HOST)"
                )
            if full == "party":
                return IntakeStalled(
                    f"no fetch slot for submitter {submitter or '(none recorded)'} freed "
                    f"within {timeout_s:g} s ({self.slots.per_party} of its fetches in "
                    "flight: MODERATION_WORKER_FETCHES_PER_SUBMITTER)"
                )
            return IntakeStalled(
                f"no fetch slot freed within {timeout_s:g} s ({self.slots.total} fetches in "
                "flight: MODERATION_WORKER_FETCHES)"
            )

        return self.slots.held(host, timeout_s, stalled, submitter)


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
    """The worker's http(s) fetches, under its `FetchGate` and its `BodyBudget`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = UriPolicy.from_settings(settings)
        # None (`worker_fetches` 0): the intake processes fetch everything, as before.
        self.gate = (
            FetchGate(
                settings.worker_fetches,
                settings.worker_fetches_per_host,
                settings.worker_fetches_per_submitter,
            )
            if settings.worker_fetches
            else None
        )
        self.bodies = BodyBudget(settings.worker_fetch_memory_mb * 2**20)

    @contextmanager
    def fetched(self, uri: str, submitter: str | None = None) -> Iterator[bytes | None]:
        """The bytes at an http(s) `uri`, fetched within `fetch_timeout_s` once its slots
        are held, and counted against the body budget until the block ends; None for a
        local file, or when the worker does not fetch (read by intake). Raises `BadInput`
        or `TransientFault` as intake does."""
        if self.gate is None or not fetched_here(uri):
            yield None
            return
        # The policy checks the URI before it holds a slot: a refused URI waits for none.
        canonical = self.policy.check_location(uri)
        host, waits_s = host_of(canonical), self.settings.intake_timeout_s
        with self.bodies.reservation(_no_room) as body:
            with self.gate.held(host, waits_s, submitter or ""):
                data = fetch(
                    canonical,
                    policy=self.policy,
                    max_bytes=self.settings.max_bytes,
                    timeout_s=self.settings.fetch_timeout_s,
                    reserve=body.grow_to,
                )
            yield data


def _no_room(nbytes: int, waited_s: float) -> IntakeStalled:
    return IntakeStalled(
        f"no room for a body of {nbytes / 2**20:.1f} MiB among the fetched bodies waiting "
        f"to be screened within {waited_s:.1f} s (MODERATION_WORKER_FETCH_MEMORY_MB)"
    )
