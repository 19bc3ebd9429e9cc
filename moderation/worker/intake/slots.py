"""Crop slots: how preprocessed crops reach the worker from an intake process without
travelling through a pipe (see `pool.py` for why).

The worker owns a block of shared memory cut into slots, for each set of crop shapes it
asks for (one crop per model computed; a second block appears when a model is added). A
task thread holds a slot while its upload is in intake and embedding; the intake process
writes the first sampled frame's crops there (`slot_views`), and the worker puts them back
in its frame (`with_slot_pixels`).
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from moderation.images.signals import ImageSignals
from moderation.worker.intake.jobs import IntakeResult, IntakeStalled, SlotRef

Shapes = tuple[tuple[int, int, int], ...]


class CropSlots:
    """Shared memory cut into slots of one set of crops each, handed out to task threads."""

    def __init__(self, count: int, shapes: Shapes) -> None:
        self.count = count
        self.shapes = shapes
        self.slot_bytes = sum(int(np.prod(shape)) for shape in shapes)
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

    def ref(self, slot: int) -> SlotRef:
        return SlotRef(self.memory.name, slot, self.shapes)

    def views(self, slot: int) -> tuple[np.ndarray, ...]:
        return slot_views(self.memory, self.ref(slot))

    def close(self) -> None:
        self.memory.close()
        self.memory.unlink()


def slot_views(memory: SharedMemory, slot: SlotRef) -> tuple[np.ndarray, ...]:
    """The slot's crops, one array per shape, laid end to end."""
    sizes = [int(np.prod(shape)) for shape in slot.shapes]
    offset = slot.index * sum(sizes)
    views = []
    for shape, size in zip(slot.shapes, sizes, strict=True):
        views.append(np.ndarray(shape, dtype=np.uint8, buffer=memory.buf, offset=offset))
        offset += size
    return tuple(views)


def with_slot_pixels(result: IntakeResult, crops: tuple[np.ndarray, ...]) -> ImageSignals:
    """The signals as intake made them, the slot's crops back in their frame."""
    if result.slot_frame is None:
        return result.signals
    frames = list(result.signals.frames)
    frames[result.slot_frame] = dataclasses.replace(
        frames[result.slot_frame], pixels=crops[0], more_pixels=crops[1:]
    )
    return dataclasses.replace(result.signals, frames=frames)
