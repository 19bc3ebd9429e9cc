from __future__ import annotations

import hashlib

import numpy as np
import pdqhash
import pytest
from PIL import Image

from moderation.images.hashing import hamming, parse_hex, pdq, sha256
from tests.images import textured


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
    with pytest.raises(ValueError, match="64 hex digits"):
        parse_hex("abc", length=32, what="SHA-256")
    with pytest.raises(ValueError, match="not hexadecimal"):
        parse_hex("zz" * 32, length=32, what="SHA-256")


def test_hamming_counts_differing_bits() -> None:
    assert hamming(b"\x00" * 32, b"\x00" * 32) == 0
    assert hamming(b"\xff" + b"\x00" * 31, b"\x0f" + b"\x00" * 31) == 4
