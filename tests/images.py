"""Test images, made on the fly."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from moderation.demo.synthetic import textured

__all__ = ["animated_gif", "decompression_bomb", "encode", "textured", "write"]


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
