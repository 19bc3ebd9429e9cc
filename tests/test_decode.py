from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from moderation.config import Settings
from moderation.images import errors
from moderation.images.decode import DecodeLimits, decode
from tests.images import animated_gif, decompression_bomb, encode, textured

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
    assert decoded.frame_count == 10
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


def test_frames_are_decoded_at_full_resolution_for_pdq() -> None:
    decoded = decode(encode(textured(5, (4000, 3000))), LIMITS)
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
