"""Crop slots: how preprocessed crops reach the worker from an intake process without
travelling through a pipe (see `pool.py` for why).

The worker owns one block of shared memory cut into slots of one crop each. A task thread
holds a slot while its upload is in intake and embedding; the intake process writes the
first sampled frame's crop there (`slot_view`), and the worker puts it back in its frame
(`with_slot_pixels`).
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from moderation.images.signals import ImageSignals
from moderation.worker.intake.jobs import IntakeResult, IntakeStalled


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


def with_slot_pixels(result: IntakeResult, pixels: np.ndarray) -> ImageSignals:
    """The signals as intake made them, the slot's crop back in its frame."""
    if result.slot_frame is None:
        return result.signals
    frames = list(result.signals.frames)
    frames[result.slot_frame] = dataclasses.replace(frames[result.slot_frame], pixels=pixels)
    return dataclasses.replace(result.signals, frames=frames)
