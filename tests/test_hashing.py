from __future__ import annotations

import hashlib
import io

import numpy as np
import pdqhash
import pytest
from PIL import Image, ImageOps

from moderation.config import Settings
from moderation.images.decode import DecodeLimits
from moderation.images.hashing import InvalidHex, hamming, parse_hex, pdq, sha256
from moderation.images.signals import extract_signals
from tests.images import encode, textured

LIMITS = DecodeLimits.from_settings(Settings())


def test_pdq_hex_follows_the_threatexchange_convention() -> None:
    image = textured(1, (400, 300))
    bits, quality = pdqhash.compute(np.asarray(image))
    # ThreatExchange writes the bit vector as one binary number, most significant bit first.
    expected = f"{int(''.join(str(int(b)) for b in bits), 2):064x}"
    hashed = pdq(image)
    assert hashed.hex == expected
    assert hashed.quality == quality


def test_pdq_survives_reencoding_and_resizing_but_separates_different_images() -> None:
    image = textured(2)
    half = image.resize((320, 240), Image.Resampling.LANCZOS)
    other = textured(3)
    assert hamming(pdq(image).bits, pdq(half).bits) <= 31
    assert hamming(pdq(image).bits, pdq(other).bits) > 31


def test_flat_images_have_low_pdq_quality() -> None:
    assert (pdq(Image.new("RGB", (300, 300), "gray")).quality or 0) < 50
    assert (pdq(textured(4)).quality or 0) >= 50


def test_sha256_and_hex_parsing() -> None:
    digest = sha256(b"abc")
    assert digest == hashlib.sha256(b"abc").digest()
    assert parse_hex(digest.hex().upper(), length=32, what="SHA-256") == digest
    with pytest.raises(InvalidHex, match="64 hex digits"):
        parse_hex("abc", length=32, what="SHA-256")
    with pytest.raises(InvalidHex, match="not hexadecimal"):
        parse_hex("zz" * 32, length=32, what="SHA-256")


def test_hamming_counts_differing_bits() -> None:
    assert hamming(b"\x00" * 32, b"\x00" * 32) == 0
    assert hamming(b"\xff" + b"\x00" * 31, b"\x0f" + b"\x00" * 31) == 4


def _reference_hex(image: Image.Image) -> str:
    vector, _ = pdqhash.compute(np.asarray(image.convert("RGB")))
    return np.packbits(vector.astype(np.uint8)).tobytes().hex()


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_a_photo_stored_turned_is_hashed_upright_and_as_stored(orientation: int) -> None:
    """Hash lists made without applying EXIF orientation (ThreatExchange's Python hasher,
    used by HMA) hold the PDQ of the pixels as stored: an upload keeps that one too."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(textured(7, (400, 300)), "PNG", exif=exif)
    stored = Image.open(io.BytesIO(data))
    upright = ImageOps.exif_transpose(stored)

    signals = extract_signals(data, LIMITS, lambda frame: np.zeros((2, 2, 3), np.uint8))

    assert signals.frames[0].pdq.hex == _reference_hex(upright)
    assert signals.pdq_as_stored is not None
    assert signals.pdq_as_stored.hex == _reference_hex(stored)
    assert hamming(signals.pdq_as_stored.bits, signals.frames[0].pdq.bits) > 31


def test_an_unturned_photo_has_one_pdq() -> None:
    data = encode(textured(7, (400, 300)), "PNG")
    signals = extract_signals(data, LIMITS, lambda frame: np.zeros((2, 2, 3), np.uint8))
    assert signals.pdq_as_stored is None
