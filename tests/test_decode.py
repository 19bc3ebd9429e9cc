from __future__ import annotations

import io
import itertools
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import GifImagePlugin, Image

from moderation.config import Settings
from moderation.images import errors
from moderation.images.decode import DecodeLimits, decode, describe_exception
from moderation.images.signals import extract_signals
from tests.images import (
    animated_gif,
    declared_huge_jpeg,
    decompression_bomb,
    encode,
    many_frame_gif,
    textured,
    with_segment,
)

LIMITS = DecodeLimits.from_settings(Settings())


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", errors.EmptyFile),
        (encode(textured(1))[:5000], errors.TruncatedImage),
        (b"hello, this is a text file and not a JPEG at all", errors.UnsupportedFormat),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", errors.UnsupportedFormat),
        (decompression_bomb(), errors.DecompressionBomb),
        (encode(Image.new("RGB", (1, 100_000)), "PNG"), errors.BadDimensions),
        (encode(Image.new("RGB", (2000, 20)), "PNG"), errors.BadDimensions),
        # A valid JPEG header followed by garbage.
        (encode(textured(2))[:600] + bytes(range(256)) * 40, errors.CorruptImage),
    ],
    ids=["empty", "truncated", "text", "heic", "bomb", "1x100000", "aspect", "corrupt"],
)
def test_bad_input_is_refused_with_its_own_error(data: bytes, error: type[errors.BadInput]) -> None:
    with pytest.raises(error) as raised:
        decode(data, LIMITS)
    assert raised.value.code == error.code
    assert raised.value.message  # a sentence for the person reading it


def test_each_refusal_has_a_distinct_code() -> None:
    codes = [cls.code for cls in errors.BadInput.__subclasses__()]
    assert len(codes) == len(set(codes))


def test_heic_refusal_says_how_to_enable_it() -> None:
    with pytest.raises(errors.UnsupportedFormat, match="pillow-heif"):
        decode(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", LIMITS)


def test_file_over_the_byte_cap_is_refused() -> None:
    limits = DecodeLimits(**{**vars(LIMITS), "max_bytes": 1000})
    with pytest.raises(errors.FileTooLarge):
        decode(encode(textured(1)), limits)


def test_exif_orientation_is_applied() -> None:
    image = textured(3, (400, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    decoded = decode(encode(image, exif=exif), LIMITS)
    assert (decoded.width, decoded.height) == (400, 200)  # as stored
    assert decoded.frames[0][1].size == (200, 400)  # as seen


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    image = textured(4, (64, 48)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 200)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    frame = decode(encode(image, fmt), LIMITS).frames[0][1]
    assert frame.mode == "RGB"
    # Not washed out: high bit depths are scaled, not clipped.
    assert np.asarray(frame).std() > 10


def test_animated_images_are_screened_on_several_frames() -> None:
    frames = [textured(seed, (120, 90)).convert("P") for seed in range(10)]
    decoded = decode(animated_gif(frames), LIMITS)
    assert (decoded.frame_count, decoded.frame_count_exact) == (10, True)
    # Every frame is visited (for PDQ); four, spread evenly, are sampled (for CLIP).
    assert [index for index, _ in decoded.frames] == list(range(10))
    assert decoded.sampled == [0, 3, 6, 9]
    # Each frame is its own picture, not the first one repeated.
    pixels = [np.asarray(frame) for _, frame in decoded.frames]
    assert all(not np.array_equal(pixels[0], other) for other in pixels[1:])


def test_long_animations_are_sampled_within_the_decode_budget() -> None:
    frames = [textured(seed, (100, 100)).convert("P") for seed in range(20)]
    limits = DecodeLimits(**{**vars(LIMITS), "max_animation_pixels": 100 * 100 * 8})
    decoded = decode(animated_gif(frames), limits)
    assert [index for index, _ in decoded.frames] == list(range(8))
    assert decoded.sampled == [0, 2, 5, 7]
    # Frames past the budget are not read, so not counted either.
    assert (decoded.frame_count, decoded.frame_count_exact) == (8, False)


def test_frames_are_decoded_at_full_resolution_when_asked() -> None:
    """For PDQ hashes equal to the reference's; by default a JPEG this large is decoded at
    reduced scale (tests/test_reduced_decode.py)."""
    limits = DecodeLimits.from_settings(Settings(full_resolution_decode=True))
    decoded = decode(encode(textured(5, (4000, 3000))), limits)
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert decoded.frames[0][1].size == (4000, 3000)


def test_the_visitor_sees_each_frame_once() -> None:
    frames = [textured(seed, (60, 40)).convert("P") for seed in range(3)]
    limits = DecodeLimits(**{**vars(LIMITS), "max_frames": 2})

    def visit(frame: Image.Image, sampled: bool) -> tuple[tuple[int, int], bool]:
        return frame.size, sampled

    decoded = decode(animated_gif(frames), limits, visit)
    assert decoded.frames == [(0, ((60, 40), True)), (1, ((60, 40), False)), (2, ((60, 40), True))]


def test_multi_page_tiff_pages_are_checked_too() -> None:
    buffer = io.BytesIO()
    textured(6, (50, 50)).save(
        buffer, "TIFF", save_all=True, append_images=[Image.new("RGB", (10_000, 10))]
    )
    with pytest.raises(errors.BadDimensions):
        decode(buffer.getvalue(), LIMITS)


def _no_whole_file_frame_count(self: GifImagePlugin.GifImageFile) -> int:
    raise AssertionError("n_frames scans the whole file")


def test_a_200000_frame_gif_is_read_to_the_frame_limit_and_hashed_on_64(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        GifImagePlugin.GifImageFile, "n_frames", property(_no_whole_file_frame_count)
    )
    data = many_frame_gif(200_000)
    assert len(data) < 5_000_000
    import moderation.images.pdq  # noqa: F401  (loads torch, not to be timed)

    started = time.process_time()
    signals = extract_signals(data, LIMITS, lambda frame: np.zeros((2, 2, 3), np.uint8))
    # Measured 0.22 s of CPU here (all 200,000 frames hashed: 3.3 s, and 200,000 rows).
    assert time.process_time() - started < 1.5
    assert (signals.frame_count, signals.frame_count_exact) == (10_000, False)
    indices = [frame.index for frame in signals.frames]
    assert len(indices) == LIMITS.max_hashed_frames == 64
    assert (indices[0], indices[-1]) == (0, 9_999)
    gaps = {b - a for a, b in itertools.pairwise(indices)}
    assert gaps <= {158, 159}  # 9,999 / 63, rounded either way
    # The embedded frames are among the hashed ones, spread over them.
    assert [f.index for f in signals.embedded_frames] == [indices[i] for i in (0, 21, 42, 63)]


def test_hashed_frames_are_spread_over_the_frames_and_sampled_among_them() -> None:
    limits = DecodeLimits(**{**vars(LIMITS), "max_hashed_frames": 4, "max_frames": 2})
    decoded = decode(many_frame_gif(10), limits, lambda frame, sampled: frame.getpixel((0, 0)))
    assert (decoded.frame_count, decoded.frame_count_exact) == (10, True)
    assert [index for index, _ in decoded.frames] == [0, 3, 6, 9]
    assert decoded.sampled == [0, 9]
    # Each visited frame is the one at its index (even frames black, odd white), not a
    # neighbour: frames skipped for hashing are still drawn in order.
    assert [pixel for _, pixel in decoded.frames] == [(0, 0, 0), (255, 255, 255)] * 2


def test_a_one_frame_image_is_counted_exactly() -> None:
    decoded = decode(encode(textured(1, (64, 48))), LIMITS)
    assert (decoded.frame_count, decoded.frame_count_exact) == (1, True)


def test_a_frame_larger_than_the_first_is_refused() -> None:
    """Pillow grows a GIF's canvas for a frame drawn past it: the decode budget is
    reserved for the first frame's size, so a larger one is refused before it is read."""
    data = many_frame_gif(3)
    second = data.index(b",", data.index(b",") + 1)
    grown = data[: second + 5] + struct.pack("<HH", 40, 40) + data[second + 9 :]
    with pytest.raises(errors.BadDimensions, match="larger than the first frame"):
        decode(grown, LIMITS)


def test_a_jpeg_declaring_more_than_its_data_holds_is_truncated() -> None:
    data = declared_huge_jpeg()
    assert len(data) == 631
    with pytest.raises(errors.TruncatedImage, match="16000x3000"):
        decode(data, LIMITS)


PHOTO = encode(textured(7, (1600, 1200)))
SCAN = PHOTO.index(b"\xff\xda")


@pytest.mark.parametrize(
    "end", [3, 20, 100, SCAN, SCAN + 5, SCAN + 100, len(PHOTO) // 2, len(PHOTO) - 2, len(PHOTO) - 1]
)
def test_a_photo_cut_anywhere_is_truncated(end: int) -> None:
    with pytest.raises(errors.TruncatedImage):
        decode(PHOTO[:end], LIMITS)


@pytest.mark.parametrize("kept", [20, 1_000, 3_000])
def test_a_photo_cut_in_its_scan_with_its_end_marker_put_back_is_truncated(kept: int) -> None:
    """1600x1200 is 30,000 blocks: at least 3,750 bytes of scan data, whatever the content."""
    with pytest.raises(errors.TruncatedImage, match="ends early"):
        decode(PHOTO[: SCAN + 14 + kept] + b"\xff\xd9", LIMITS)


@pytest.mark.parametrize(
    "data",
    [
        PHOTO,
        encode(textured(8, (640, 480)), progressive=True),
        encode(textured(9, (640, 480)), optimize=True, quality=20),
        encode(Image.new("RGB", (4000, 3000), (90, 90, 90)), quality=10),  # a flat image
        PHOTO + b"trailing bytes after the end marker \xff\xd8",
        # An EXIF-like segment carrying a whole JPEG, end marker included, as a thumbnail.
        with_segment(PHOTO, 0xE1, b"Exif\x00\x00" + encode(textured(1, (160, 120)))),
        with_segment(PHOTO, 0xFE, b"\xff\xd9 a comment with an end marker in it"),
    ],
    ids=["photo", "progressive", "optimized", "flat", "trailing", "thumbnail", "comment"],
)
def test_complete_jpegs_pass_the_truncation_check(data: bytes) -> None:
    assert decode(data, LIMITS, lambda frame, sampled: None).frame_count == 1


def test_no_refusal_quotes_the_file() -> None:
    with pytest.raises(errors.UnsupportedFormat) as raised:
        decode(b"root:*:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n", LIMITS)
    assert "root" not in raised.value.message
    assert "b'" not in raised.value.message


def test_decoder_texts_lose_their_quoted_bytes() -> None:
    png = encode(textured(2, (32, 32)), "PNG")
    # An IHDR chunk renamed: Pillow's error quotes the chunk type it did not expect.
    broken = png[:12] + b"sEcR" + png[16:]
    with pytest.raises(errors.BadInput) as raised:
        decode(broken, LIMITS)
    assert "sEcR" not in str(raised.value)
    assert "b'" not in str(raised.value)


@pytest.mark.parametrize(
    ("exception", "expected"),
    [
        (SyntaxError("broken PNG file (chunk b'sEcR')"), "broken PNG file (chunk <bytes>)"),
        (ValueError('bad data: b"it\'s \\x00 secret"'), "bad data: <bytes>"),
        (OSError("got bytearray(b'secret\\xff') instead"), "got <bytes> instead"),
        (OSError("decoder error -2"), "decoder error -2"),
        (OSError("caf\u00e9\n\x00line"), "cafline"),
        (OSError("x" * 1000), "x" * 157 + "..."),
        (OSError(), "OSError"),
    ],
)
def test_exception_texts_are_made_safe_to_store(exception: Exception, expected: str) -> None:
    assert describe_exception(exception) == expected


@pytest.mark.parametrize(
    "name", ["gif-frame-170-grows-canvas.gif", "gif-frame-grows-canvas-bad-palette.gif"]
)
def test_a_gif_frame_that_would_grow_the_canvas_is_refused_before_pillow_seeks_to_it(
    name: str,
) -> None:
    """Found by .ci/fuzz: 1x1 screens with a later frame drawn at 170 megapixels (the
    first: frame 170 at 13107x13311). Pillow allocated the grown canvas (666 MiB) inside
    `seek`, before the frame could be checked."""
    from tests.fuzz_decode import check

    data = (Path(__file__).parent / "data" / "fuzz" / name).read_bytes()
    with pytest.raises(errors.DecompressionBomb, match=r"\d+x\d+ is 1\d\d megapixels"):
        decode(data, LIMITS)
    check(data)  # within the fuzz target's time and memory allowance
