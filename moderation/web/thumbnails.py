"""Thumbnails of uploads for the review pages, made on every view and never stored.

An upload is fetched from its URI under the same URI policy, size cap and deadline as the
worker's, and decoded by the same safe decoder; only its first frame is shown. Reviewers
see a blurred thumbnail until they choose to reveal one: the blurred image is made here,
on the server, so the clear pixels reach the browser only when asked for.
"""

from __future__ import annotations

import io
from dataclasses import replace

from PIL import Image, ImageFilter

from moderation.config import Settings
from moderation.images.decode import DecodeLimits, decode
from moderation.images.fetch import fetch
from moderation.images.uri_policy import UriPolicy

# The blurred thumbnail is the image shrunk to this many pixels on its longer side, blown
# back up and blurred: colours and layout survive, any detail does not (a face at 320
# pixels spans about one of these cells).
BLUR_CELLS = 12
JPEG_QUALITY = 80


def thumbnail(uri: str, settings: Settings, *, reveal: bool) -> bytes:
    """A JPEG of the upload at `uri`, at most `settings.thumbnail_side` on its longer side,
    blurred unless `reveal`. Raises `IntakeError` as the worker would for the same URI."""
    side = settings.thumbnail_side
    data = fetch(
        uri,
        policy=UriPolicy.from_settings(settings),
        max_bytes=settings.max_bytes,
        timeout_s=settings.fetch_timeout_s,
    )
    # The first frame only; large JPEGs decode at a reduced scale no smaller than the thumbnail.
    limits = replace(
        DecodeLimits.from_settings(settings),
        max_frames=1,
        max_hashed_frames=1,
        decode_min_side=side,
    )
    decoded = decode(data, limits, lambda frame, _sampled: _shrink(frame, side))
    small = decoded.frames[0][1]
    if not reveal:
        small = blur(small)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _shrink(frame: Image.Image, side: int) -> Image.Image:
    """The frame fitted into side x side (a new image: the frame dies with the decoder)."""
    scale = min(1.0, side / max(frame.size))
    size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
    return frame.resize(size, Image.Resampling.LANCZOS)


def blur(image: Image.Image) -> Image.Image:
    """The image with every detail gone: pixelated to `BLUR_CELLS` cells, then blurred."""
    width, height = image.size
    scale = BLUR_CELLS / max(width, height)
    cells = image.resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX
    )
    coarse = cells.resize((width, height), Image.Resampling.NEAREST)
    return coarse.filter(ImageFilter.GaussianBlur(radius=max(width, height) / BLUR_CELLS / 2))
