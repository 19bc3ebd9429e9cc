"""Safe decoding: refuse hostile or broken files with a typed error before they cost much.

Checks happen in order of cost: byte count, then the header (format, dimensions), and only
then the pixel data. Every frame is handed, upright (EXIF orientation applied) and in RGB,
to a visitor, one frame at a time, so that only one full-resolution frame is in memory at
once. Of an animation, every frame within the decode budget is visited (cheap signals such
as PDQ can afford them all) and up to `max_frames` of them, spread evenly, are marked
sampled (for the costly ones, such as the embedding).

Frames stay at full resolution because PDQ needs them so: measured on real photos, any
downscaling before PDQ (bicubic, box or JPEG DCT scaling) moves the hash by 4 to 20 bits
of the 31 allowed, where a JPEG re-encode moves it by 0 to 2.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from moderation.config import Settings
from moderation.images.budget import PEAK_BYTES_PER_PIXEL, MemoryBudget
from moderation.images.errors import (
    BadDimensions,
    CorruptImage,
    DecompressionBomb,
    EmptyFile,
    FileTooLarge,
    TruncatedImage,
    UnsupportedFormat,
)

# Formats we decode. Pillow can open more (EPS, PSD, ICO, ...), some through external
# programs; an allowlist keeps the attack surface to well-trodden decoders.
# (Multi-picture JPEGs, MPO, open through the JPEG opener.)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Container signatures of formats we recognise but cannot decode, for a helpful refusal.
_KNOWN_UNSUPPORTED = {
    b"ftypheic": "HEIC is not enabled; install pillow-heif",
    b"ftypheix": "HEIC is not enabled; install pillow-heif",
    b"ftypmif1": "HEIF is not enabled; install pillow-heif",
    b"ftypavif": "AVIF is not supported by this build of Pillow",
}


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int
    max_pixels: int
    max_side: int
    max_aspect_ratio: float
    max_frames: int
    max_animation_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeLimits:
        return cls(
            max_bytes=settings.max_bytes,
            max_pixels=settings.max_pixels,
            max_side=settings.max_side,
            max_aspect_ratio=settings.max_aspect_ratio,
            max_frames=settings.max_frames,
            max_animation_pixels=settings.max_animation_pixels,
        )


T = TypeVar("T")


@dataclass(frozen=True)
class DecodedImage(Generic[T]):
    format: str
    width: int  # as stored, before EXIF orientation
    height: int
    frame_count: int  # in the file; frames past the decode budget are not visited
    # (frame index in the file, what the visitor made of that frame) per visited frame.
    frames: list[tuple[int, T]]
    sampled: list[int]  # the indices of the sampled frames, always including 0
    # What `visit_as_stored` made of frame 0 as the file stores it, when EXIF orientation
    # turned it upright; None otherwise.
    as_stored: Any = None


def _copy_frame(frame: Image.Image, sampled: bool) -> Image.Image:
    return frame.copy()


@overload
def decode(
    data: bytes,
    limits: DecodeLimits,
    *,
    budget: MemoryBudget | None = None,
    visit_as_stored: Callable[[Image.Image], Any] | None = None,
) -> DecodedImage[Image.Image]: ...
@overload
def decode(
    data: bytes,
    limits: DecodeLimits,
    visit: Callable[[Image.Image, bool], T],
    *,
    budget: MemoryBudget | None = None,
    visit_as_stored: Callable[[Image.Image], Any] | None = None,
) -> DecodedImage[T]: ...


def decode(
    data: bytes,
    limits: DecodeLimits,
    visit: Callable[[Image.Image, bool], Any] = _copy_frame,
    *,
    budget: MemoryBudget | None = None,
    visit_as_stored: Callable[[Image.Image], Any] | None = None,
) -> DecodedImage[Any]:
    """Decode safely and call `visit(frame, sampled)` on each frame. Raises `BadInput`.

    The frame passed to `visit` is only valid during the call; keep a copy, not the frame.
    Without a visitor, the frames themselves are returned (copied). With a `budget`, the
    pixel work waits for its share of it (see `moderation.images.budget`). When EXIF
    orientation turns frame 0, `visit_as_stored` also sees it as stored, unturned.
    """
    if not data:
        raise EmptyFile("the file is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise FileTooLarge(
            f"the file is {len(data) / 2**20:.1f} MiB; the limit is "
            f"{limits.max_bytes / 2**20:.1f} MiB (MODERATION_MAX_BYTES)"
        )
    image = _open(data)
    try:
        width, height = image.size
        _check_dimensions(width, height, limits)
        frame_count = getattr(image, "n_frames", 1)
        visited = _frames_within_budget(frame_count, image.size, limits)
        sampled = _spread(visited, limits.max_frames)
        # Frames are visited one at a time, so the peak is one frame's (multi-page TIFF
        # pages may be larger than the first, but are held to the same pixel limits).
        peak = width * height * PEAK_BYTES_PER_PIXEL
        frames = []
        as_stored = None
        with budget.reserve(peak) if budget else nullcontext():
            for index in range(visited):
                frame, stored = _load_frame(image, index, limits)
                if stored is not None and visit_as_stored is not None:
                    as_stored = visit_as_stored(stored)
                frames.append((index, visit(frame, index in sampled)))
        return DecodedImage(
            format=image.format or "unknown",
            width=width,
            height=height,
            frame_count=frame_count,
            frames=frames,
            sampled=sorted(sampled),
            as_stored=as_stored,
        )
    finally:
        image.close()


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        for signature, reason in _KNOWN_UNSUPPORTED.items():
            if signature in data[:32]:
                raise UnsupportedFormat(reason) from None
        raise UnsupportedFormat(
            f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)}); "
            f"the file starts with {data[:16]!r}"
        ) from None
    except Image.DecompressionBombError as exc:
        raise DecompressionBomb(str(exc)) from None
    except Exception as exc:  # a malformed header can raise almost anything
        raise CorruptImage(f"the image header is unreadable: {exc}") from None


def _check_dimensions(width: int, height: int, limits: DecodeLimits) -> None:
    if width < 1 or height < 1:
        raise BadDimensions(f"the image is {width}x{height} pixels")
    if width * height > limits.max_pixels:
        raise DecompressionBomb(
            f"{width}x{height} is {width * height / 1e6:.0f} megapixels; the limit is "
            f"{limits.max_pixels / 1e6:.0f} (MODERATION_MAX_PIXELS)"
        )
    if max(width, height) > limits.max_side:
        raise BadDimensions(
            f"{width}x{height}: a side is longer than {limits.max_side} pixels "
            "(MODERATION_MAX_SIDE)"
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise BadDimensions(
            f"{width}x{height}: the aspect ratio exceeds {limits.max_aspect_ratio:g}:1 "
            "(MODERATION_MAX_ASPECT_RATIO)"
        )


def _frames_within_budget(frame_count: int, size: tuple[int, int], limits: DecodeLimits) -> int:
    """How many leading frames fit the decode budget (at least the first).

    Reaching frame N means decoding every frame before it, so a long animation is screened
    within the prefix that fits.
    """
    return max(1, min(frame_count, limits.max_animation_pixels // (size[0] * size[1])))


def _spread(count: int, wanted: int) -> set[int]:
    """Up to `wanted` of `count` frame indices, evenly spread, first and last included."""
    wanted = min(wanted, count)
    return {round(i * (count - 1) / max(1, wanted - 1)) for i in range(wanted)}


def _load_frame(
    image: Image.Image, index: int, limits: DecodeLimits
) -> tuple[Image.Image, Image.Image | None]:
    """The frame upright in RGB, and as stored in RGB if EXIF orientation turned it."""
    try:
        if index:
            image.seek(index)
            # Multi-page TIFFs can hold pages larger than the first.
            _check_dimensions(*image.size, limits)
        image.load()
        # exif_transpose copies even when there is nothing to turn; most images have nothing.
        if index == 0 and image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            return _to_rgb(ImageOps.exif_transpose(image)), _to_rgb(image)
        return _to_rgb(image), None
    except (BadDimensions, DecompressionBomb):
        raise
    except Image.DecompressionBombError as exc:
        raise DecompressionBomb(str(exc)) from None
    except OSError as exc:
        if "truncated" in str(exc):
            raise TruncatedImage(f"the image data ends early: {exc}") from None
        raise CorruptImage(f"the image data is corrupt: {exc}") from None
    except Exception as exc:  # malformed data can raise almost anything from a decoder
        raise CorruptImage(f"the image data is corrupt: {exc!r}") from None


def _to_rgb(frame: Image.Image) -> Image.Image:
    if frame.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High bit depth: stretch to 8 bits, else convert() clips nearly everything to white.
        values = np.array(frame, dtype=np.float32)  # in place from here: frames are large
        low, high = float(values.min()), float(values.max())
        values -= low
        values *= 255.0 / (high - low) if high > low else 0.0
        frame = Image.fromarray(values.astype(np.uint8))
    if frame.mode == "RGB":
        return frame
    # Alpha is dropped, not composited: what is hidden under transparency is still screened.
    return frame.convert("RGB")
