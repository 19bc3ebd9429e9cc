"""Safe decoding: refuse hostile or broken files with a typed error before they cost much.

Checks happen in order of cost: byte count, then the structure and header (format, JPEG
completeness, dimensions), and only then the pixel data. Frames are handed, upright (EXIF
orientation applied) and in RGB, to a visitor, one frame at a time, so that only one
full-resolution frame is in memory at once.

An animation costs in proportion to the frames read, so reading stops at a limit
(`max_animation_frames`, and `max_animation_pixels` decoded in all); frames past it are
never read, and the frame count is then a lower bound. Of the frames read, at most
`max_hashed_frames`, spread evenly, first and last included, are visited (hashed by PDQ),
and up to `max_frames` of those, spread evenly, are marked sampled (for the costly
signals, such as the embedding). A 200,000-frame GIF of one-pixel frames once cost
200,000 PDQ rows and 26 s; it now reads 10,000 frames and visits 64.

A large JPEG is decoded at reduced scale (see `_reduce_jpeg`): a 12-megapixel phone photo
at 1/4 costs a fraction of the decoding, hashing and preprocessing, and PDQ, which blurs
a side of 4032 pixels with boxes 32 wide before it samples 64 points, moves by a few bits.
`decode_min_side` of None decodes everything at full resolution, for PDQ hashes equal to
the reference's. Limits always judge the size the file declares, and `width` and
`height` report it.

No error message carries the file's content: decoder exception texts go through
`describe_exception` first.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar, overload

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from moderation.config import Settings
from moderation.images.budget import PEAK_BYTES_PER_PIXEL, Budget
from moderation.images.errors import (
    BadDimensions,
    BadInput,
    CorruptImage,
    DecompressionBomb,
    EmptyFile,
    FileTooLarge,
    TruncatedImage,
    UnsupportedFormat,
)
from moderation.images.gif_frames import grown_canvases

# Formats we decode. Pillow can open more (EPS, PSD, ICO, ...), some through external
# programs; an allowlist keeps the attack surface to well-trodden decoders.
# (Multi-picture JPEGs, MPO, open through the JPEG opener.)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Container signatures of formats we recognise but cannot decode, for a helpful refusal.
KNOWN_UNSUPPORTED = {
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
    max_hashed_frames: int
    max_animation_frames: int
    # A JPEG is decoded at the smallest of 1/8, 1/4, 1/2 and full scale that keeps its
    # shorter side at least this long; None: always at full resolution.
    decode_min_side: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeLimits:
        return cls(
            max_bytes=settings.max_bytes,
            max_pixels=settings.max_pixels,
            max_side=settings.max_side,
            max_aspect_ratio=settings.max_aspect_ratio,
            max_frames=settings.max_frames,
            max_animation_pixels=settings.max_animation_pixels,
            max_hashed_frames=settings.max_hashed_frames,
            max_animation_frames=settings.max_animation_frames,
            decode_min_side=None if settings.full_resolution_decode else settings.decode_min_side,
        )

    def decoding_at_least(self, side: int) -> DecodeLimits:
        """These limits, with any reduced decoding keeping at least `side` pixels on the
        shorter side (an embedding model's input must not be upscaled)."""
        if self.decode_min_side is None or self.decode_min_side >= side:
            return self
        return replace(self, decode_min_side=side)


T = TypeVar("T")


@dataclass(frozen=True)
class DecodedImage(Generic[T]):
    format: str
    width: int  # as stored, before EXIF orientation
    height: int
    # Frames read. Reading stops at `max_animation_frames` or `max_animation_pixels`, so
    # when `frame_count_exact` is False the file may hold more: `frame_count` is then a
    # lower bound. True means the end of the file was reached.
    frame_count: int
    frame_count_exact: bool
    # (frame index in the file, what the visitor made of that frame) per visited frame:
    # at most `max_hashed_frames` of the frames read, spread evenly, first and last included.
    frames: list[tuple[int, T]]
    sampled: list[int]  # the indices of the sampled frames, always including 0
    # What `visit_as_stored` made of frame 0 as the file stores it, when EXIF orientation
    # turned it upright; None otherwise.
    as_stored: Any = None
    # The frames were decoded at 1/scale of `width` x `height` (a large JPEG: 2, 4 or 8).
    scale: int = 1


def _copy_frame(frame: Image.Image, sampled: bool) -> Image.Image:
    return frame.copy()


@overload
def decode(
    data: bytes,
    limits: DecodeLimits,
    *,
    budget: Budget | None = None,
    visit_as_stored: Callable[[Image.Image], Any] | None = None,
) -> DecodedImage[Image.Image]: ...
@overload
def decode(
    data: bytes,
    limits: DecodeLimits,
    visit: Callable[[Image.Image, bool], T],
    *,
    budget: Budget | None = None,
    visit_as_stored: Callable[[Image.Image], Any] | None = None,
) -> DecodedImage[T]: ...


def decode(
    data: bytes,
    limits: DecodeLimits,
    visit: Callable[[Image.Image, bool], Any] = _copy_frame,
    *,
    budget: Budget | None = None,
    visit_as_stored: Callable[[Image.Image], Any] | None = None,
) -> DecodedImage[Any]:
    """Decode safely and call `visit(frame, sampled)` on each visited frame. Raises `BadInput`.

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
    jpeg_scans = _check_jpeg_complete(data) if data.startswith(b"\xff\xd8\xff") else None
    image = _open(data)
    try:
        width, height = image.size
        _check_dimensions(width, height, limits)
        if image.format == "GIF":
            _check_gif_frames(data, image.size, limits)
        scale = _reduce_jpeg(image, limits.decode_min_side)
        # Frames are decoded one at a time, so the peak is one frame's; no frame may be
        # larger than the first (see `_check_frame`).
        peak = image.width * image.height * PEAK_BYTES_PER_PIXEL
        if scale > 1 and jpeg_scans != 1:
            # libjpeg holds every DCT coefficient of a progressive (multi-scan) JPEG at the
            # declared size, whatever the output scale. Full-scale estimates cover it.
            peak += width * height * _JPEG_COEFFICIENT_BYTES_PER_PIXEL
        with budget.reserve(peak) if budget else nullcontext():
            try:
                visited = _visit_frames(image, limits, visit, visit_as_stored)
            finally:
                # Within the reservation: the decoded frame is freed before it ends (and
                # the budget hands the freed memory back to the system then).
                image.close()
        return DecodedImage(
            format=image.format or "unknown",
            width=width,
            height=height,
            frame_count=visited.frame_count,
            frame_count_exact=visited.frame_count_exact,
            frames=visited.frames,
            sampled=visited.sampled,
            as_stored=visited.as_stored,
            scale=scale,
        )
    finally:
        image.close()


@dataclass(frozen=True)
class _Visited:
    frame_count: int
    frame_count_exact: bool
    frames: list[tuple[int, Any]]
    sampled: list[int]
    as_stored: Any


def _visit_frames(
    image: Image.Image,
    limits: DecodeLimits,
    visit: Callable[[Image.Image, bool], Any],
    visit_as_stored: Callable[[Image.Image], Any] | None,
) -> _Visited:
    """Count the frames, then visit the chosen ones in order. The frames are local here,
    so none outlives the call."""
    frame_count, exact = _count_frames(image, limits)
    visited = _spread(frame_count, limits.max_hashed_frames)
    sampled = {visited[i] for i in _spread(len(visited), limits.max_frames)}
    frames = []
    as_stored = None
    for index in visited:
        frame, stored = _load_frame(image, index)
        if stored is not None and visit_as_stored is not None:
            as_stored = visit_as_stored(stored)
        frames.append((index, visit(frame, index in sampled)))
    return _Visited(frame_count, exact, frames, sorted(sampled), as_stored)


def describe_exception(exc: BaseException, limit: int = 160) -> str:
    """An exception's text, safe to store and show: no file content, bounded length.

    Decoders quote what they could not parse (`broken PNG file (chunk b'...')`), and a
    reviewer sees every stored error, so bytes reprs are replaced, anything but printable
    ASCII is dropped, and the text is cut to `limit` characters.
    """
    text = _BYTES_REPR.sub("<bytes>", str(exc))
    text = "".join(c for c in text if " " <= c <= "~")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or type(exc).__name__


# A bytes or bytearray repr, quoted either way, escapes included.
_BYTES_LITERAL = r"""b(?:'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*")"""
_BYTES_REPR = re.compile(rf"bytearray\({_BYTES_LITERAL}\)|{_BYTES_LITERAL}")


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        for signature, reason in KNOWN_UNSUPPORTED.items():
            if signature in data[:32]:
                raise UnsupportedFormat(reason) from None
        raise UnsupportedFormat(
            f"not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise DecompressionBomb(describe_exception(exc)) from None
    except Exception as exc:  # a malformed header can raise almost anything
        raise CorruptImage(f"the image header is unreadable: {describe_exception(exc)}") from None


def _reduce_jpeg(image: Image.Image, min_side: int | None) -> int:
    """Have libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale straight from its DCT
    coefficients (Pillow's `draft`), the smallest that keeps the shorter side at least
    `min_side`. Returns the scale's denominator: 1 for anything else.

    Only plain JPEGs: `draft` does nothing for other formats, and a multi-picture JPEG
    (MPO) re-reads each picture's header when it seeks, so its pictures would decode at
    different scales. (Ultra HDR phone photos, whose second picture is a gain map, open
    as plain JPEGs.) Measured at 4032x3024 (bench/decode_scale.py, phone-like JPEGs of
    about 3.2 MB): decoding, PDQ and CLIP preprocessing take about 125 ms on one core at
    full scale and 50 at 1/4, where PDQ moves by 6 bits at most on photos; entropy
    decoding, which no scale shortens, is most of what remains.
    """
    if min_side is None or image.format != "JPEG":
        return 1
    width = image.width
    drafted = image.draft(None, (min_side, min_side))
    if drafted is None:  # not a single-tile JPEG: decoded as it is
        return 1
    _, box = drafted  # the declared size divided by the scale
    return round(width / box[2])


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


def _check_frame(
    size: tuple[int, int], index: int, first: tuple[int, int], limits: DecodeLimits
) -> None:
    """A later frame (a TIFF page, a GIF frame drawn past the canvas, which Pillow grows
    the canvas for) is held to the limits, and to the first frame's area: the decode
    budget is reserved for that."""
    width, height = size
    _check_dimensions(width, height, limits)
    if width * height > first[0] * first[1]:
        raise BadDimensions(
            f"frame {index} is {width}x{height}, larger than the first frame "
            f"({first[0]}x{first[1]})"
        )


def _count_frames(image: Image.Image, limits: DecodeLimits) -> tuple[int, bool]:
    """How many frames to read, and whether that is all of them.

    Counted by seeking frame by frame, never with Pillow's `n_frames`, which for a GIF
    scans the whole file (200,000 frames: 0.3 to 3.3 s) and for an APNG believes the
    header. Reading stops at `max_animation_frames` and at `max_animation_pixels` decoded
    in all (reaching frame N means decoding every frame before it).
    """
    first = image.size
    limit = _frames_to_read(first, limits)
    count = 1
    while count < limit:
        try:
            with _decoder_errors():
                image.seek(count)
        except EOFError:
            return count, True
        _check_frame(image.size, count, first, limits)
        count += 1
    if limit > 1 or getattr(image, "is_animated", False):
        return count, False
    return count, True


def _frames_to_read(first: tuple[int, int], limits: DecodeLimits) -> int:
    return min(
        limits.max_animation_frames,
        max(1, limits.max_animation_pixels // (first[0] * first[1])),
    )


def _check_gif_frames(data: bytes, first: tuple[int, int], limits: DecodeLimits) -> None:
    """The frames `_count_frames` will seek to, checked before Pillow seeks: it allocates a
    GIF's grown canvas during the seek itself (see `gif_frames`)."""
    for index, canvas in grown_canvases(data, _frames_to_read(first, limits)):
        if index:
            _check_frame(canvas, index, first, limits)


def _spread(count: int, wanted: int) -> list[int]:
    """Up to `wanted` of `count` indices, evenly spread, first and last included, in order."""
    wanted = min(wanted, count)
    if wanted == 1:
        return [0]
    return [round(i * (count - 1) / (wanted - 1)) for i in range(wanted)]


def _load_frame(image: Image.Image, index: int) -> tuple[Image.Image, Image.Image | None]:
    """The frame upright in RGB, and as stored in RGB if EXIF orientation turned it.

    Frames are read in order after `_count_frames` has seeked through (and checked) them
    all, so no frame here is new. Seeking a GIF or APNG forward decodes every frame
    between: each is drawn over the one before."""
    with _decoder_errors():
        if index != image.tell():
            image.seek(index)
        image.load()
        # exif_transpose copies even when there is nothing to turn; most images have nothing.
        if index == 0 and image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            return _to_rgb(ImageOps.exif_transpose(image)), _to_rgb(image)
        return _to_rgb(image), None


@contextmanager
def _decoder_errors() -> Iterator[None]:
    """Decoder failures as typed errors; EOFError passes (it ends an animation)."""
    try:
        yield
    except (BadInput, EOFError):
        raise
    except Image.DecompressionBombError as exc:
        raise DecompressionBomb(describe_exception(exc)) from None
    except OSError as exc:
        if "truncated" in str(exc):
            raise TruncatedImage(f"the image data ends early: {describe_exception(exc)}") from None
        raise CorruptImage(f"the image data is corrupt: {describe_exception(exc)}") from None
    except Exception as exc:  # malformed data can raise almost anything from a decoder
        raise CorruptImage(
            f"the image data is corrupt: {type(exc).__name__}: {describe_exception(exc)}"
        ) from None


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


# JPEG structure. libjpeg pads missing entropy-coded data with grey and only warns, and
# Pillow does not raise when the data ends at a marker, so a 631-byte file declaring
# 16000x3000 decodes to 48 megapixels of grey. The markers are walked instead (segment
# lengths skip APP segments, EXIF thumbnails and their own EOI included): an EOI must
# follow the last scan, and a Huffman-coded image needs at least one bit per block of its
# largest component (a DC difference code is at least one bit), so far fewer bytes of
# scan data than that means the data was cut short, whatever the header declares.
_JPEG_EOI = 0xD9
_JPEG_SOS = 0xDA
# Start-of-frame markers, and those of them that are arithmetic-coded (which can spend
# less than a bit on a block, so have no such lower bound).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SOF_ARITHMETIC = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Inside scan data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker; any
# other byte after it ends the scan (0xFF itself is fill before a marker).
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# What libjpeg holds for a multi-scan (progressive) JPEG whatever the output scale: every
# DCT coefficient, 2 bytes each, 64 per 8x8 block of each component. Measured on
# 12-megapixel progressive JPEGs decoded at 1/4: 36 MB over the output with 4:2:0 chroma (3
# bytes a pixel), 70 MB without subsampling (6). Four components unsubsampled (CMYK): 8.
_JPEG_COEFFICIENT_BYTES_PER_PIXEL = 8


def _check_jpeg_complete(data: bytes) -> int | None:
    """Raise `TruncatedImage` when a JPEG's data ends early, else return how many scans it
    has. A structure that does not parse is left for the decoder to refuse as corrupt (and
    its scans are unknown: None)."""
    size = len(data)
    position = 2  # after SOI
    scan_bytes = 0
    scans = 0
    frame: tuple[int, int, bool] | None = None  # width, height, arithmetic-coded
    while True:
        if position >= size:
            raise TruncatedImage("the JPEG data ends before its end-of-image marker")
        if data[position] != 0xFF:
            return None  # not a marker where one must be: corrupt, not truncated
        while position < size and data[position] == 0xFF:
            position += 1
        if position >= size:
            raise TruncatedImage("the JPEG data ends before its end-of-image marker")
        marker = data[position]
        position += 1
        if marker == _JPEG_EOI:
            break
        if 0xD0 <= marker <= 0xD8 or marker in (0x00, 0x01):
            continue  # markers without a length (a misplaced one is the decoder's to judge)
        if position + 2 > size:
            raise TruncatedImage("the JPEG data ends inside a marker segment")
        length = int.from_bytes(data[position : position + 2], "big")
        if length < 2:
            return None
        if position + length > size:
            raise TruncatedImage("the JPEG data ends inside a marker segment")
        if marker in _JPEG_SOF and length >= 7:
            height = int.from_bytes(data[position + 3 : position + 5], "big")
            width = int.from_bytes(data[position + 5 : position + 7], "big")
            frame = (width, height, marker in _JPEG_SOF_ARITHMETIC)
        position += length
        if marker == _JPEG_SOS:
            scans += 1
            end = _JPEG_SCAN_END.search(data, position)
            if end is None:
                raise TruncatedImage("the JPEG data ends inside its image data")
            scan_bytes += end.start() - position
            position = end.start()
    if frame is None or frame[2]:
        return scans
    width, height, _ = frame
    blocks = -(-width // 8) * -(-height // 8)
    if scan_bytes * 8 < blocks:
        raise TruncatedImage(
            f"the JPEG declares {width}x{height} but holds {scan_bytes} bytes of image "
            f"data, fewer than the {-(-blocks // 8)} that size needs: the data ends early"
        )
    return scans
