"""Small renderings of decoded frames: the review copy screening keeps of what it saw
(`moderation.evidence`), and the blur the review pages show until a reviewer reveals one.

A frame is fitted into a square of `side` pixels and saved as a JPEG. Measured on two
loaded cores (bench note in docs/evidence.md): 256 pixels cost about 1 ms a frame from a
decoded 1024x768 photo, and 8-20 KB; an animation pays it for each hashed frame.
"""

from __future__ import annotations

import io

from PIL import Image, ImageFilter

# The blurred rendering is the image shrunk to this many pixels on its longer side, blown
# back up and blurred: colours and layout survive, any detail does not (a face at 320
# pixels spans about one of these cells).
BLUR_CELLS = 12
JPEG_QUALITY = 80


def shrink(frame: Image.Image, side: int) -> Image.Image:
    """The frame fitted into side x side (a new image: the frame dies with the decoder)."""
    scale = min(1.0, side / max(frame.size))
    size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
    if frame.mode != "RGB":
        frame = frame.convert("RGB")
    # A reduce by whole factors first: a box filter as cheap as it is good at this ratio.
    factor = int(1 / scale) // 2 if scale < 0.5 else 1
    if factor > 1:
        frame = frame.reduce(factor)
    return frame.resize(size, Image.Resampling.LANCZOS)


def to_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def frame_thumbnail(frame: Image.Image, side: int) -> bytes:
    """A JPEG of the frame at most `side` pixels on its longer side."""
    return to_jpeg(shrink(frame, side))


def open_jpeg(data: bytes) -> Image.Image:
    """One of our own thumbnails back as an image (only ever bytes this service made)."""
    image = Image.open(io.BytesIO(data), formats=["JPEG"])
    image.load()
    return image


def blur(image: Image.Image) -> Image.Image:
    """The image with every detail gone: pixelated to `BLUR_CELLS` cells, then blurred."""
    width, height = image.size
    scale = BLUR_CELLS / max(width, height)
    cells = image.resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX
    )
    coarse = cells.resize((width, height), Image.Resampling.NEAREST)
    return coarse.filter(ImageFilter.GaussianBlur(radius=max(width, height) / BLUR_CELLS / 2))


def strip(frames: list[Image.Image], height: int, marked: int | None = None) -> Image.Image:
    """Frames side by side at one height, for an animation's context; the frame at
    position `marked` framed in red (the one that matched)."""
    scaled = [
        frame.resize((max(1, round(frame.width * height / frame.height)), height))
        for frame in frames
    ]
    gap = 4
    width = sum(frame.width for frame in scaled) + gap * (len(scaled) + 1)
    canvas = Image.new("RGB", (width, height + 2 * gap), (40, 40, 40))
    x = gap
    for position, frame in enumerate(scaled):
        if position == marked:
            canvas.paste(
                (200, 30, 30), (x - gap // 2, 0, x + frame.width + gap // 2, height + 2 * gap)
            )
        canvas.paste(frame, (x, gap))
        x += frame.width + gap
    return canvas
