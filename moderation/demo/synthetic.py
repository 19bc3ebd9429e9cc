"""Synthetic images: smooth random textures, distinct per seed and detailed enough for PDQ
to be confident about them. Used by the demo's sample set, the benchmark and the tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def textured(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
