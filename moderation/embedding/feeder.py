"""Feeding the model: a batch of uint8 crops from shared memory to vectors.

On CPU this is `Embedder.embed`. On CUDA each feeding thread keeps its own pinned
staging buffer and its own CUDA stream: the crops are stacked straight into pinned memory
(no `pin_memory()` copy and allocation per batch, which costs more than the copy itself
for a 21 MB batch of 64 crops at 336 px), copied with `non_blocking=True`, and the forward
pass is queued behind the copy on the same stream. With two inference streams, one
thread's copy and normalisation overlap the other's forward pass. The GPU figures of this
path are still to be measured (bench/README.md, "On a GPU").
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from moderation.embedding.embedder import Embedder


class Feeder:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._local = threading.local()

    def embed(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One forward pass over the crops (uint8, each (H, W, 3)); one vector per crop."""
        if self.embedder.device.type != "cuda":
            return list(self.embedder.embed(np.stack(crops)))
        return list(self._embed_cuda(crops))

    def _embed_cuda(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        staging = self._staging(len(crops), crops[0].shape)
        np.stack(crops, out=staging.numpy()[: len(crops)])
        stream = self._stream()
        with torch.inference_mode(), torch.cuda.stream(stream):
            batch = staging[: len(crops)].to(self.embedder.device, non_blocking=True)
            pixels = self.embedder.preprocess.normalise(batch)
            return self.embedder.embed_pixel_values(pixels)  # synchronises on the result

    def _staging(self, count: int, shape: tuple[int, ...]) -> torch.Tensor:
        buffer: torch.Tensor | None = getattr(self._local, "staging", None)
        if buffer is None or buffer.shape[0] < count or tuple(buffer.shape[1:]) != shape:
            buffer = torch.empty((count, *shape), dtype=torch.uint8).pin_memory()
            self._local.staging = buffer
        return buffer

    def _stream(self) -> torch.cuda.Stream:
        stream: torch.cuda.Stream | None = getattr(self._local, "stream", None)
        if stream is None:
            stream = torch.cuda.Stream(device=self.embedder.device)  # type: ignore[no-untyped-call]
            self._local.stream = stream
        return stream
