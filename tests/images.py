"""Test images, made on the fly."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from PIL import Image

from moderation.demo.synthetic import textured

__all__ = [
    "animated_gif",
    "declared_huge_jpeg",
    "decompression_bomb",
    "encode",
    "many_frame_gif",
    "textured",
    "with_segment",
    "write",
]


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


def many_frame_gif(frames: int) -> bytes:
    """A GIF of `frames` one-pixel frames, alternating black and white (consecutive frames
    differ, as Pillow's own writer would merge equal ones), 23 bytes a frame: 200,000
    frames are 4.6 MB, written by hand in milliseconds rather than through Pillow."""
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    loop = b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    control = b"!\xf9\x04\x00\x01\x00\x00\x00"  # 10 ms a frame
    descriptor = b",\x00\x00\x00\x00\x01\x00\x01\x00\x00"
    # LZW with 2-bit codes (3 bits on the wire): clear (4), the pixel's index, end (5).
    black, white = (
        control + descriptor + bytes([2, 2, 0x44 + 8 * pixel, 0x01, 0]) for pixel in (0, 1)
    )
    return header + loop + (black + white) * (frames // 2) + black * (frames % 2) + b";"


def declared_huge_jpeg() -> bytes:
    """631 bytes declaring 16000x3000: a flat JPEG cut 22 bytes into its scan data, with an
    end-of-image marker put back. libjpeg pads the rest with grey and Pillow raises nothing."""
    data = encode(Image.new("RGB", (16_000, 3_000), (90, 90, 90)))
    return data[:629] + b"\xff\xd9"


def with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """The JPEG with a marker segment (an APPn, a comment) inserted right after SOI."""
    return (
        jpeg[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]
    )
