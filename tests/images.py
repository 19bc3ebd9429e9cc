"""Test images, made on the fly: textured enough for PDQ to be confident about them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def textured(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A smooth random texture: distinct per seed, with plenty of structure for PDQ."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def decompression_bomb() -> bytes:
    """A PNG a few hundred KiB on disk that would need 400 megapixels in memory."""
    return encode(Image.new("L", (20_000, 20_000)), "PNG", optimize=True)


def animated_gif(frames: list[Image.Image]) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()
