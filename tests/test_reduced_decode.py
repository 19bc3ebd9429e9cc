"""Large JPEGs decode at reduced scale (libjpeg's DCT scaling): where, how far PDQ moves,
and that every refusal and guarantee of the full-resolution decode still holds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pdqhash
import pytest
from PIL import ExifTags, Image
from sqlalchemy.orm import Session

from moderation.banks import service as banks
from moderation.banks.matcher import MatchSettings, load_index
from moderation.config import Settings
from moderation.embedding.clip import ClipEmbedder
from moderation.embedding.service import get_or_create_model
from moderation.images import errors
from moderation.images.budget import PEAK_BYTES_PER_PIXEL, MemoryBudget
from moderation.images.decode import DecodeLimits, decode
from moderation.images.hashing import PdqHash
from moderation.images.signals import SignalType, extract_signals
from tests.images import encode, textured
from tests.photos import PHONE, phone_photo, synthetic_scene

LIMITS = DecodeLimits.from_settings(Settings())
FULL = DecodeLimits.from_settings(Settings(full_resolution_decode=True))
# The most PDQ moved from the full-resolution reference at the default minimum side (512:
# 1/4 at 4032x3024), measured by bench/decode_scale.py on the held-out phone-sized images:
# 6 bits on the photos, 12 on the smooth synthetic scenes (whose many near-zero DCT
# coefficients sit at the median, so that any change flips some). Two bits of margin.
PHOTO_DRIFT_BOUND = 6 + 2
SYNTHETIC_DRIFT_BOUND = 12 + 2


def _no_pixels(frame: Image.Image) -> np.ndarray:
    return np.zeros((2, 2, 3), np.uint8)


def _reference(image: Image.Image) -> PdqHash:
    vector, quality = pdqhash.compute(np.asarray(image))
    return PdqHash(np.packbits(vector.astype(np.uint8)).tobytes(), int(quality))


def _distance(a: PdqHash, b: PdqHash) -> int:
    return sum((x ^ y).bit_count() for x, y in zip(a.bits, b.bits, strict=True))


def _sideways(image: Image.Image) -> bytes:
    """As a phone stores a portrait photo: turned on its side, with an EXIF orientation (6:
    shown turned 90 degrees clockwise) that turns it back."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return encode(image.transpose(Image.Transpose.ROTATE_90), quality=90, exif=exif)


@pytest.fixture(scope="module")
def phone_jpeg() -> bytes:
    return encode(textured(1, PHONE), quality=90)


def test_a_large_jpeg_is_decoded_at_reduced_scale(phone_jpeg: bytes) -> None:
    decoded = decode(phone_jpeg, LIMITS)
    assert decoded.scale == 4
    assert decoded.frames[0][1].size == (1008, 756)
    assert (decoded.width, decoded.height) == PHONE  # what the file holds


def test_a_small_jpeg_is_decoded_at_full_scale() -> None:
    decoded = decode(encode(textured(2, (640, 480))), LIMITS)
    assert decoded.scale == 1
    assert decoded.frames[0][1].size == (640, 480)


def test_full_resolution_decoding_turns_it_off(phone_jpeg: bytes) -> None:
    decoded = decode(phone_jpeg, FULL)
    assert decoded.scale == 1
    assert decoded.frames[0][1].size == PHONE


def test_only_jpegs_are_reduced() -> None:
    decoded = decode(encode(textured(3, (2048, 1536)), "PNG", compress_level=1), LIMITS)
    assert decoded.scale == 1
    assert decoded.frames[0][1].size == (2048, 1536)


def test_a_multi_picture_jpeg_is_decoded_at_full_scale() -> None:
    """An MPO re-reads each picture's header as it seeks, so its pictures would not share
    one scale: it is left at full resolution."""
    first, second = textured(4, (2048, 1536)), textured(5, (2048, 1536))
    decoded = decode(encode(first, "MPO", save_all=True, append_images=[second]), LIMITS)
    assert decoded.format == "MPO"
    assert (decoded.scale, decoded.frame_count) == (1, 2)
    assert [frame.size for _, frame in decoded.frames] == [(2048, 1536)] * 2


def test_a_cmyk_jpeg_is_reduced_and_comes_out_rgb() -> None:
    decoded = decode(encode(textured(6, (2048, 1536)).convert("CMYK")), LIMITS)
    assert decoded.scale == 2
    assert (decoded.frames[0][1].size, decoded.frames[0][1].mode) == ((1024, 768), "RGB")


@pytest.mark.parametrize(
    ("size", "min_side", "scale"),
    [
        ((4032, 3024), 512, 4),
        ((3024, 4032), 512, 4),
        ((4032, 3024), 336, 8),
        ((4032, 3024), 1024, 2),
        ((2016, 1512), 512, 2),
        ((1023, 2000), 512, 1),
        ((1024, 2000), 512, 2),
        ((8000, 6000), 512, 8),  # 1/8 is as far as DCT scaling goes
    ],
)
def test_the_scale_is_the_smallest_that_keeps_the_shorter_side(
    size: tuple[int, int], min_side: int, scale: int
) -> None:
    image = Image.new("RGB", size, (90, 120, 150))
    limits = replace(LIMITS, decode_min_side=min_side)
    decoded = decode(encode(image, quality=50), limits, lambda frame, sampled: frame.size)
    assert decoded.scale == scale
    assert decoded.frames[0][1] == (-(-size[0] // scale), -(-size[1] // scale))
    assert min(decoded.frames[0][1]) >= min_side


def test_the_embedding_models_input_side_is_a_floor(phone_jpeg: bytes) -> None:
    """A model whose input is 1000 pixels gets a frame no smaller: 1/2, not 1/4."""

    class LargeInput:
        decode_side = 1000
        seen: list[tuple[int, int]] = []

        def __call__(self, frame: Image.Image) -> np.ndarray:
            self.seen.append(frame.size)
            return np.zeros((2, 2, 3), np.uint8)

    preprocess = LargeInput()
    extract_signals(phone_jpeg, LIMITS, preprocess)
    assert preprocess.seen == [(2016, 1512)]


class _RecordingBudget(MemoryBudget):
    def __init__(self) -> None:
        super().__init__(2**40)
        self.reserved: list[int] = []

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        self.reserved.append(nbytes)
        with super().reserve(nbytes):
            yield


def test_the_budget_is_reserved_for_the_reduced_frame(phone_jpeg: bytes) -> None:
    budget = _RecordingBudget()
    decode(phone_jpeg, LIMITS, budget=budget)
    decode(phone_jpeg, FULL, budget=budget)
    assert budget.reserved == [p * PEAK_BYTES_PER_PIXEL for p in (1008 * 756, 4032 * 3024)]


def test_a_progressive_jpegs_coefficients_are_reserved_at_the_declared_size() -> None:
    """libjpeg holds every coefficient of a multi-scan JPEG, whatever the output scale."""
    budget = _RecordingBudget()
    progressive = encode(textured(1, PHONE), quality=90, progressive=True)
    assert decode(progressive, LIMITS, budget=budget).scale == 4
    assert budget.reserved == [1008 * 756 * PEAK_BYTES_PER_PIXEL + 4032 * 3024 * 8]


@pytest.fixture(scope="module")
def held_out() -> list[tuple[Image.Image, int]]:
    """Three of the held-out images (as bench/decode_scale.py makes them), each with its
    bound: a landscape photo, a closer portrait one, a synthetic scene."""
    return [
        (phone_photo("coffee"), PHOTO_DRIFT_BOUND),
        (phone_photo("hopper", (PHONE[1], PHONE[0]), zoom=0.7, seed=11), PHOTO_DRIFT_BOUND),
        (synthetic_scene(101), SYNTHETIC_DRIFT_BOUND),
    ]


def test_pdq_stays_within_the_measured_bound_of_the_reference(
    held_out: list[tuple[Image.Image, int]],
) -> None:
    for image, bound in held_out:
        data = encode(image, quality=90)
        reduced = extract_signals(data, LIMITS, _no_pixels).frames[0].pdq
        reference = _reference(decode(data, FULL).frames[0][1])
        assert _distance(reduced, reference) <= bound
        # Turned off, PDQ is the reference's, bit for bit.
        assert extract_signals(data, FULL, _no_pixels).frames[0].pdq.bits == reference.bits


def test_a_large_photo_stored_sideways_is_turned_upright(
    held_out: list[tuple[Image.Image, int]],
) -> None:
    upright = held_out[1][0]  # 3024x4032
    data = _sideways(upright)
    decoded = decode(data, LIMITS, lambda frame, sampled: frame.copy())
    assert decoded.scale == 4
    assert (decoded.width, decoded.height) == (4032, 3024)  # as stored
    assert decoded.frames[0][1].size == (756, 1008)  # as seen
    signals = extract_signals(data, LIMITS, _no_pixels)
    assert _distance(signals.frames[0].pdq, _reference(upright)) <= PHOTO_DRIFT_BOUND
    # As stored: what hash lists made without applying the orientation hold.
    assert signals.pdq_as_stored is not None
    stored = decode(data, FULL, visit_as_stored=_reference).as_stored
    assert _distance(signals.pdq_as_stored, stored) <= PHOTO_DRIFT_BOUND


@pytest.fixture(scope="module")
def cut_photo() -> bytes:
    return encode(textured(7, PHONE), quality=90)


def test_the_cut_photo_would_decode_at_reduced_scale(cut_photo: bytes) -> None:
    assert decode(cut_photo, LIMITS, lambda frame, sampled: None).scale == 4


@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.7, 0.999])
def test_a_large_jpeg_cut_short_is_truncated_at_reduced_scale(
    cut_photo: bytes, fraction: float
) -> None:
    with pytest.raises(errors.TruncatedImage):
        decode(cut_photo[: int(len(cut_photo) * fraction)], LIMITS)


@pytest.mark.parametrize("kept", [100, 20_000])
def test_a_large_jpeg_cut_with_its_end_marker_put_back_is_truncated_at_reduced_scale(
    cut_photo: bytes, kept: int
) -> None:
    """libjpeg would pad the missing data with grey at any scale; the size check refuses it
    first (4032x3024 needs at least 23,814 bytes of scan data)."""
    scan = cut_photo.index(b"\xff\xda")
    with pytest.raises(errors.TruncatedImage, match="ends early"):
        decode(cut_photo[: scan + 14 + kept] + b"\xff\xd9", LIMITS)


def test_limits_judge_the_declared_size_not_the_reduced_one(phone_jpeg: bytes) -> None:
    """12 megapixels against a limit of 10 is a bomb, though 1/4 of it is under one."""
    with pytest.raises(errors.DecompressionBomb, match="MODERATION_MAX_PIXELS"):
        decode(phone_jpeg, replace(LIMITS, max_pixels=10_000_000))
    with pytest.raises(errors.BadDimensions, match="MODERATION_MAX_SIDE"):
        decode(phone_jpeg, replace(LIMITS, max_side=4000))


def test_a_jpeg_bomb_is_refused_at_reduced_scale() -> None:
    """60 megapixels of one grey, a small file: refused by the default limits (50), though
    at 1/8 it would be under one."""
    data = encode(Image.new("L", (10_000, 6_000), 90), quality=10)
    assert len(data) < 2_000_000
    with pytest.raises(errors.DecompressionBomb):
        decode(data, LIMITS)


def test_an_exact_copy_of_a_banked_large_jpeg_hits_by_pdq_at_distance_0(
    session: Session, tiny_model: Path, held_out: list[tuple[Image.Image, int]]
) -> None:
    """Bank-add and screening decode the same way (both through `extract_signals` with the
    configured limits), so a copy of a large banked photo hashes identically."""
    embedder = ClipEmbedder(str(tiny_model), "cpu")
    model = get_or_create_model(session, embedder.name, embedder.dim)
    data = encode(held_out[0][0], quality=90)
    assert decode(data, LIMITS, lambda frame, sampled: None).scale == 4
    bank = banks.create_bank(session, "large photos")
    entry = banks.entry_from_image(data, embedder, model, LIMITS, None)
    (row,) = banks.add_entries(session, bank, [entry], added_by="test")
    settings = MatchSettings(default_radius=0.05, pdq_threshold=31, pdq_min_quality=50)
    index = load_index(session, model.id, embedder.dim, settings)
    copy = extract_signals(bytes(data), LIMITS, embedder.preprocess)
    vectors = embedder.embed(np.stack(copy.embedding_inputs()))
    found = {(m.bank_entry_id, m.signal, m.distance) for m in index.match(copy, vectors)}
    assert (row.id, SignalType.PDQ, 0.0) in found
