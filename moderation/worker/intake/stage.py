"""The intake stage: an upload's bytes to its signals and its preprocessed crops.

It runs in the intake processes (`process.py`), or in the task threads when there are
none (`InThreadIntake`, for `MODERATION_INTAKE_PROCESSES=0`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from moderation.config import Settings
from moderation.embedding.preprocessing import Preprocessing
from moderation.images.budget import Budget, MemoryBudget
from moderation.images.decode import DecodeLimits
from moderation.images.errors import ContentMismatch
from moderation.images.fetch import fetch
from moderation.images.hashing import sha256
from moderation.images.signals import ImageSignals, extract_signals
from moderation.images.uri_policy import UriPolicy
from moderation.worker.intake.fetches import read_fetched
from moderation.worker.intake.jobs import IntakeJob, IntakeTimes


class IntakeContext:
    """What intake needs, built once per process (or once per worker when intake runs in
    the task threads)."""

    def __init__(self, settings: Settings, budget: Budget):
        self.settings = settings
        self.limits = DecodeLimits.from_settings(settings)
        self.uri_policy = UriPolicy.from_settings(settings)
        self.decode_memory = budget
        # Each hashed frame is rendered small, to be kept as evidence should the upload
        # hit; only where evidence is kept at all (a key is configured).
        self.thumbnail_side = settings.evidence_side if settings.evidence_key else None


def fetch_and_extract(
    context: IntakeContext, job: IntakeJob, fetched: bytes | None = None
) -> tuple[ImageSignals, IntakeTimes]:
    """The intake stage: fetch (unless the worker has: `fetched`, or the job's
    `fetched` block), check the declared bytes, decode, hash, preprocess.
    Raises `BadInput` or `TransientFault`."""
    settings = context.settings
    started = time.perf_counter()
    if fetched is not None:
        data = fetched
    elif job.fetched is not None:
        data = read_fetched(job.fetched)
    else:
        data = fetch(
            job.uri,
            policy=context.uri_policy,
            max_bytes=settings.max_bytes,
            timeout_s=settings.fetch_timeout_s,
        )
    fetched_at = time.perf_counter()
    check_declared_bytes(data, job.declared_sha256)
    signals = extract_signals(
        data,
        context.limits,
        job.preprocessings,
        context.decode_memory,
        thumbnail_side=context.thumbnail_side,
    )
    return signals, IntakeTimes(fetched_at - started, time.perf_counter() - fetched_at)


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
        self,
        uri: str,
        declared_sha256: bytes | None,
        preprocessings: Sequence[Preprocessing],
        fetched: bytes | None = None,
    ) -> AbstractContextManager[tuple[ImageSignals, IntakeTimes]]:
        """An upload's signals, with one crop per preprocessing of each sampled frame,
        usable until the block ends. `fetched`: the bytes at `uri`, fetched by the worker
        (`fetches.py`); None: intake reads it. Raises `BadInput` or `TransientFault`."""
        ...

    def close(self) -> None: ...


class InThreadIntake:
    def __init__(self, settings: Settings) -> None:
        budget = MemoryBudget(settings.decode_memory_mb * 2**20)
        self._context = IntakeContext(settings, budget)

    @contextmanager
    def screened(
        self,
        uri: str,
        declared_sha256: bytes | None,
        preprocessings: Sequence[Preprocessing],
        fetched: bytes | None = None,
    ) -> Iterator[tuple[ImageSignals, IntakeTimes]]:
        job = IntakeJob(uri, declared_sha256, tuple(preprocessings), slot=None)
        yield fetch_and_extract(self._context, job, fetched)

    def close(self) -> None:
        pass
