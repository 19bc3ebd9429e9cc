"""Which CLIP candidate method (`clip_methods`) a bank search uses: a table by bank size
and batch, measured per machine by `clip_calibration`.

A search takes, for its batch and its bank's size, the method measured fastest at the
nearest calibrated batch (in ratio) of the size class. Every method returns the same hits
(the exact check decides), so a stale or noisy table costs time, never a hit. Methods
that read a half-precision copy cost memory: the bank holds one such copy per half type
that its plan uses (2 bytes a value, 1.5 GB for a million 768-d rows, beside the float32
rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moderation.banks import clip_methods
from moderation.banks.clip_methods import Method

CALIBRATED_BATCHES = (1, 8, 64)
# A bank of more rows than this takes the choices measured on a bank that outgrows the
# caches (`clip_calibration.LARGE_ROWS`), a smaller one those measured on one that fits.
LARGE_FROM = 16384


@dataclass(frozen=True)
class ClipPlan:
    """For each size class ("small", "large") and calibrated batch, the method to use."""

    choices: Mapping[str, Mapping[int, str]]
    # Measured ms per query, per class, batch and method: what the choice was made from.
    timings: Mapping[str, Mapping[int, Mapping[str, float]]]

    @classmethod
    def only(cls, method: Method) -> ClipPlan:
        """One method for every search."""
        table = {batch: method.name for batch in CALIBRATED_BATCHES}
        return cls({"small": table, "large": table}, {})

    def method_for(self, rows: int, batch: int) -> Method:
        table = self.choices["large" if rows > LARGE_FROM else "small"]
        nearest = min(table, key=lambda calibrated: abs(math.log(batch / calibrated)))
        return clip_methods.METHODS[table[nearest]]

    @property
    def methods(self) -> set[Method]:
        return {
            clip_methods.METHODS[name] for table in self.choices.values() for name in table.values()
        }

    @property
    def copies(self) -> set[tuple[str, torch.dtype]]:
        """The copies of the bank its methods read, beside the float32 host rows."""
        return {method.copy for method in self.methods if not method.reads_host_rows}

    def as_json(self) -> dict[str, object]:
        return {
            "choices": {
                size: {str(b): m for b, m in t.items()} for size, t in self.choices.items()
            },
            "timings": {
                size: {str(b): dict(m) for b, m in t.items()} for size, t in self.timings.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ClipPlan:
        choices = data["choices"]
        timings = data.get("timings", {})
        if not isinstance(choices, dict) or not isinstance(timings, dict):
            raise ValueError("a CLIP plan is a mapping of choices and timings")
        return cls(
            {size: {int(b): str(m) for b, m in t.items()} for size, t in choices.items()},
            {size: {int(b): dict(m) for b, m in t.items()} for size, t in timings.items()},
        )


def default_plan(device: str) -> ClipPlan:
    """Without a measurement: the float32 product on CPU, the float16 copy on CUDA (what
    the matcher ran before it measured)."""
    cuda = torch.device(device).type == "cuda"
    return ClipPlan.only(clip_methods.CUDA_FLOAT16 if cuda else clip_methods.TORCH_FLOAT32)
