"""The demo's sample set, generated (run `python -m moderation.demo.samples` to rebuild it).

`samples/bank/` holds two stand-ins for known-bad images (the demo bank is built from
them). `samples/uploads/` holds what users "upload": copies of the bank images altered the
way reposts are (re-encoded, resized, inside an animation), unrelated images, and broken
files that must be refused with a clear error.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from moderation.demo.synthetic import textured

SAMPLES = Path(__file__).parent / "samples"


def _poster(seed: int, label: str, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A textured picture with shapes and a label, so each sample is recognisable."""
    image = textured(seed, size)
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.ellipse((width * 0.1, height * 0.15, width * 0.45, height * 0.6), outline="white", width=6)
    draw.rectangle((width * 0.55, height * 0.4, width * 0.9, height * 0.85), fill=(20, 20, 20))
    draw.text((width * 0.58, height * 0.55), label, fill="white", font_size=max(12, height // 14))
    return image


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def build(root: Path = SAMPLES) -> list[Path]:
    bank, uploads = root / "bank", root / "uploads"
    bank.mkdir(parents=True, exist_ok=True)
    uploads.mkdir(parents=True, exist_ok=True)
    known_bad_a, known_bad_b = _poster(11, "SAMPLE A"), _poster(22, "SAMPLE B")
    original_a = _jpeg(known_bad_a, 92)
    files: dict[Path, bytes] = {
        bank / "known-bad-a.jpg": original_a,
        bank / "known-bad-b.jpg": _jpeg(known_bad_b, 92),
        # The same file, byte for byte.
        uploads / "01-exact-copy-of-a.jpg": original_a,
        # Recompressed, as by a platform that re-encodes uploads.
        uploads / "02-a-reencoded.jpg": _jpeg(known_bad_a, 45),
        # Half size, saved as PNG.
        uploads / "03-b-half-size.png": _png(known_bad_b.resize((320, 240))),
        # An animation whose fourth frame is B.
        uploads / "04-b-inside-animation.gif": _gif(
            [_poster(30 + i, f"FRAME {i}", (320, 240)) for i in range(3)]
            + [known_bad_b.resize((320, 240))]
            + [_poster(40 + i, f"FRAME {i}", (320, 240)) for i in range(4, 8)]
        ),
        uploads / "05-unrelated.jpg": _jpeg(_poster(55, "HOLIDAY"), 90),
        uploads / "06-unrelated.png": _png(_poster(66, "CAT", (500, 500))),
        uploads / "07-unrelated.jpg": _jpeg(_poster(77, "RECEIPT", (480, 640)), 85),
        # Broken input: refused with a stored error, never retried.
        uploads / "08-truncated.jpg": _jpeg(_poster(88, "CUT OFF"), 90)[:9000],
        uploads / "09-not-an-image.jpg": b"This is a text file with a .jpg name.\n" * 10,
    }
    for path, data in files.items():
        path.write_bytes(data)
    return sorted(files)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _gif(frames: list[Image.Image]) -> bytes:
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
    return buffer.getvalue()


if __name__ == "__main__":
    for written in build():
        print(written)
