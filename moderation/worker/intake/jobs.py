"""What crosses an intake process's pipe, and the faults a lost or silent process raises.

Down the pipe go `IntakeJob`s (and `None`, to stop); back come `IntakeResult`s or the
exception intake raised. While a job runs, the process may ask for decode memory
(`Reserve`, answered `GRANTED`) and hand it back (`RELEASE`): see `process.py` and
`pool.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from moderation.embedding.preprocessing import Preprocessing
from moderation.images.errors import TransientFault
from moderation.images.signals import ImageSignals


class IntakeProcessLost(TransientFault):
    """The intake process screening this upload died; a replacement has been started."""

    code = "intake_process_lost"


class IntakeStalled(TransientFault):
    """Intake did not answer in time: a stage waited past its timeout. Retried."""

    code = "intake_stalled"


@dataclass(frozen=True)
class SlotRef:
    """A slot of crop memory shared with the worker: the block's name, the slot, and the
    crops' shapes (one per preprocessing, laid end to end)."""

    memory: str
    index: int
    shapes: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class FetchedRef:
    """Where an intake process finds bytes the worker fetched (`fetches.py`): a block of
    shared memory and how many of its bytes are the body."""

    memory: str
    size: int


@dataclass(frozen=True)
class IntakeJob:
    uri: str
    declared_sha256: bytes | None
    # One crop per preprocessing (one per model the worker computes), from one decode.
    preprocessings: tuple[Preprocessing, ...]
    slot: SlotRef | None  # where to put the first sampled frame's crops; None: return them
    # The bytes, fetched by the worker (http(s)); None: intake reads the URI (a local file).
    fetched: FetchedRef | None = None


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


@dataclass(frozen=True)
class Reserve:
    """From a process: reserve this much decode memory for the job it is working on."""

    nbytes: int


class Message(enum.Enum):
    GRANTED = "granted"  # to a process: its reservation is held
    RELEASE = "release"  # from a process: its reservation can go


GRANTED, RELEASE = Message.GRANTED, Message.RELEASE
