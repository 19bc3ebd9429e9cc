"""Fuzz target over decoding and signals: only `BadInput`, within time and memory.

    .ci/fuzz    (or: .venv/bin/python -m tests.fuzz_decode [--seconds 60] [--corpus DIR])

Each input goes through `extract_signals` (PDQ included, with a cheap Pillow preprocess
in place of the model's) under small limits, so that an input's allowance is tight:

- it returns or raises a `BadInput` whose message quotes no bytes; anything else is a bug;
- it takes less than `CPU_SECONDS` of the process's CPU time: CPU, not wall-clock time,
  so that the bound holds on a loaded machine (`.ci/test` fuzzes while ruff and mypy take
  the other core: an unmutated seed GIF took 7.1 s of wall-clock time there, 1-2 s alone,
  and the same CPU time both ways); a hang is caught by libFuzzer's wall-clock timeout;
- its peak RSS (VmHWM, reset per input) grows by less than what the limits allow: the
  decode budget's estimate for the largest frame allowed, plus `RSS_SLACK`.

The engine is atheris (libFuzzer, coverage-guided over Pillow's Python parsers and ours),
seeded with hostile files: the test images, the demo samples, truncations and header
fields set to edge values (dimensions, frame counts, chunk lengths, palette sizes), with
PNG CRCs made right so mutations get past the checksum. Chosen over a Hypothesis
loop for its coverage feedback; it installs from a wheel and runs here. Measured on 2
cores: 357 inputs a second (7,513 in 20 s; 47 a second while a benchmark held both
cores), no failure found.
A failure writes the input to
`crash-*` (libFuzzer's naming) and exits non-zero; make each one a test in
tests/test_decode.py.

Not collected by pytest (no `test_` prefix); `tests/test_fuzz_smoke.py` runs the seed
corpus through the same checks in the normal test run.
"""

from __future__ import annotations

import argparse
import io
import re
import struct
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from moderation.images.budget import PEAK_BYTES_PER_PIXEL
from moderation.images.decode import DecodeLimits
from moderation.images.errors import BadInput

FUZZ_LIMITS = DecodeLimits(
    max_bytes=2 * 2**20,
    max_pixels=4_000_000,
    max_side=8_192,
    max_aspect_ratio=50.0,
    max_frames=2,
    max_animation_pixels=16_000_000,
    max_hashed_frames=8,
    max_animation_frames=500,
    # Small, so that the corpus's JPEGs (640x480 and less) also decode at reduced scale,
    # the path large uploads take (MODERATION_DECODE_MIN_SIDE).
    decode_min_side=64,
)
CPU_SECONDS = 5.0
# Above the largest frame's estimate: the interpreter's own growth, zlib and libjpeg
# state, torch's first matrix products on a new shape.
RSS_SLACK = 96 * 2**20
RSS_ALLOWANCE = FUZZ_LIMITS.max_pixels * PEAK_BYTES_PER_PIXEL + RSS_SLACK
SAMPLES = Path(__file__).resolve().parents[1] / "moderation" / "demo" / "samples"
_BYTES_REPR = re.compile(r"""b'|b"|\\x[0-9a-f]{2}""")


class FuzzFailure(AssertionError):
    """An input broke a property: a bug to fix and to keep as a regression test."""


def preprocess(frame: Image.Image) -> np.ndarray:
    return np.asarray(frame.resize((16, 16), Image.Resampling.BILINEAR, reducing_gap=2.0))


def check(data: bytes) -> None:
    """Raise `FuzzFailure` if decoding `data` breaks a property."""
    from moderation.images.signals import extract_signals

    _reset_peak_rss()
    before = _rss_bytes("VmRSS")
    started = time.process_time()
    try:
        extract_signals(data, FUZZ_LIMITS, preprocess)
    except BadInput as error:
        if _BYTES_REPR.search(error.message) or len(error.message) > 400:
            raise FuzzFailure(f"the message may quote the file: {error.message!r}") from None
    except Exception as exc:
        raise FuzzFailure(f"{type(exc).__name__} is not BadInput: {exc!r}") from exc
    elapsed = time.process_time() - started
    if elapsed > CPU_SECONDS:
        raise FuzzFailure(f"took {elapsed:.1f} s of CPU (bound {CPU_SECONDS} s)")
    grown = _rss_bytes("VmHWM") - before
    if grown > RSS_ALLOWANCE:
        raise FuzzFailure(f"peak RSS grew {grown / 2**20:.0f} MiB (bound {RSS_ALLOWANCE >> 20})")


def warm_up() -> None:
    """Decode the valid seeds once, unchecked: torch's first products and Pillow's first
    decoders grow the process by some 150 MiB, once."""
    from moderation.images.signals import extract_signals

    for data in valid_seeds():
        extract_signals(data, FUZZ_LIMITS, preprocess)


def _reset_peak_rss() -> None:
    # "5" resets VmHWM to the current RSS (Linux 4.0 and later).
    Path("/proc/self/clear_refs").write_text("5")


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# The seed corpus.


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def valid_seeds() -> list[bytes]:
    """Small valid files of every allowed format, animations and pages included."""
    from tests.images import many_frame_gif, textured

    photo = textured(1, (96, 64))
    frames = [textured(seed, (48, 32)).convert("P") for seed in range(5)]
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        _save(photo, "JPEG", quality=80),
        _save(photo, "JPEG", progressive=True, exif=exif),
        _save(photo, "PNG"),
        _save(photo.convert("P"), "PNG"),
        _save(Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 200), "PNG"),
        _save(photo.convert("RGBA"), "PNG"),
        _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
        _save(frames[0].convert("RGB"), "PNG", save_all=True, append_images=frames[1:]),
        _save(photo, "WEBP", quality=50),
        _save(frames[0].convert("RGB"), "WEBP", save_all=True, append_images=frames[1:]),
        _save(photo, "BMP"),
        _save(photo, "TIFF", compression="tiff_lzw"),
        _save(photo, "TIFF", save_all=True, append_images=[textured(2, (64, 64))]),
        many_frame_gif(600),
    ]


def hostile_seeds() -> list[bytes]:
    """Known hostile files, and the valid seeds and demo samples with edge-value headers."""
    from tests.images import declared_huge_jpeg

    base = valid_seeds() + [p.read_bytes() for p in sorted(SAMPLES.glob("*/*")) if p.is_file()]
    seeds = [*base, declared_huge_jpeg()]
    for data in base:
        seeds += mutants(data)
    return seeds


def mutants(data: bytes) -> Iterator[bytes]:
    """Truncations, and header fields set to edge values, format by format."""
    for fraction in (0.05, 0.3, 0.7, 0.99):
        yield data[: max(1, int(len(data) * fraction))]
    edges = (0, 1, 0x7FFF, 0xFFFF)
    if data.startswith(b"\x89PNG"):
        for width, height in ((0, 1), (1, 1), (0xFFFF, 1), (8192, 8192), (0x7FFFFFFF, 1)):
            yield fix_png_crcs(data[:16] + struct.pack(">II", width, height) + data[24:])
        for chunk in (b"IHDR", b"PLTE", b"IDAT", b"acTL", b"fcTL"):
            at = data.find(chunk)
            if at >= 4:
                for length in (0, 1, 0x7FFFFFFF, 0xFFFFFFFF):
                    yield data[: at - 4] + struct.pack(">I", length) + data[at:]
        at = data.find(b"acTL")
        if at >= 0:  # the declared frame count
            for frames in (0, 1, 0xFFFF, 0x7FFFFFFF):
                yield fix_png_crcs(data[: at + 4] + struct.pack(">I", frames) + data[at + 8 :])
    elif data.startswith(b"GIF8"):
        for value in edges:
            yield data[:6] + struct.pack("<HH", value, value) + data[10:]  # logical screen
            at = data.find(b",", 13)
            if at > 0:  # the first frame's extent
                yield data[: at + 5] + struct.pack("<HH", value, value) + data[at + 9 :]
        for flags in (0x80, 0x87, 0x00, 0xF7):  # global palette present, size 2 to 256
            yield data[:10] + bytes([flags]) + data[11:]
    elif data.startswith(b"\xff\xd8"):
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = data.find(marker)
            if at > 0:
                for value in edges:
                    yield data[: at + 5] + struct.pack(">HH", value, value) + data[at + 9 :]
        at = data.find(b"\xff\xda")
        if at > 0:
            yield data[: at + 20] + b"\xff\xd9"
    elif data.startswith(b"BM"):
        for width, height in ((0, 1), (1, -1), (0x7FFF, 0x7FFF), (-(2**31), 1)):
            yield data[:18] + struct.pack("<ii", width, height) + data[26:]
        yield data[:10] + struct.pack("<I", 0xFFFFFFF0) + data[14:]  # pixel data offset
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        for offset in (8, 0xFFFFFFF0, len(data) - 2):
            yield data[:4] + struct.pack("<I" if data[:2] == b"II" else ">I", offset) + data[8:]


def fix_png_crcs(data: bytes) -> bytes:
    """The PNG with each chunk's CRC recomputed, as far as its chunks can be walked."""
    out = bytearray(data)
    position = 8
    while position + 8 <= len(out):
        length = struct.unpack(">I", out[position : position + 4])[0]
        end = position + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(out[position + 4 : end]))
        position = end + 4
    return bytes(out)


# The engine.


def run_atheris(seconds: int, corpus: Path, artifacts: Path) -> int:
    import atheris

    with atheris.instrument_imports(include=["PIL", "moderation.images"]):
        from PIL import (  # noqa: F401  (instrumented for coverage)
            BmpImagePlugin,
            GifImagePlugin,
            JpegImagePlugin,
            PngImagePlugin,
            TiffImagePlugin,
            WebPImagePlugin,
        )

        import moderation.images.decode
        import moderation.images.signals  # noqa: F401

    corpus.mkdir(parents=True, exist_ok=True)
    for number, seed in enumerate(hostile_seeds()):
        (corpus / f"seed-{number:04d}").write_bytes(seed)
    warm_up()
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={seconds}",
            # A hang, which never returns to `check`: wall-clock, generous for a loaded host.
            f"-timeout={int(CPU_SECONDS * 6)}",
            f"-max_len={FUZZ_LIMITS.max_bytes}",
            "-rss_limit_mb=4096",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
            str(corpus),
        ],
        lambda data: check(bytes(data)),
    )
    atheris.Fuzz()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--corpus", type=Path, help="Working corpus (default: a temporary one).")
    parser.add_argument("--artifacts", type=Path, default=Path("."), help="Where failures go.")
    args = parser.parse_args()
    # As in production, where Pillow's warnings about odd files are only logged.
    warnings.simplefilter("ignore")
    if args.corpus:
        return run_atheris(args.seconds, args.corpus, args.artifacts)
    with tempfile.TemporaryDirectory() as tmp:
        return run_atheris(args.seconds, Path(tmp), args.artifacts)


if __name__ == "__main__":
    sys.exit(main())
