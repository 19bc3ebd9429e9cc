"""Hash signals: SHA-256 of the bytes and PDQ (Meta's 256-bit perceptual hash) of a frame."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from PIL import Image

from moderation.errors import Invalid

PDQ_BYTES = 32


class InvalidHex(Invalid):
    code = "invalid_hex"


@dataclass(frozen=True)
class PdqHash:
    bits: bytes  # 32 bytes, most significant bit first, as in ThreatExchange's hex strings
    quality: int | None  # 0-100; None when imported from a list that did not say

    @property
    def hex(self) -> str:
        return self.bits.hex()


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def pdq(frame: Image.Image) -> PdqHash:
    """PDQ of an RGB frame at full resolution, as the reference implementation hashes it."""
    # Imported here: it loads torch, which producers and most commands never need.
    from moderation.images.pdq import pdq_bits_and_quality

    bits, quality = pdq_bits_and_quality(frame)
    return PdqHash(bits=bits, quality=quality)


def parse_hex(value: str, *, length: int, what: str) -> bytes:
    """Parse a hex digest from a hash list, with an error that says what was wrong."""
    cleaned = value.strip().lower()
    if len(cleaned) != 2 * length:
        raise InvalidHex(f"{what} must be {2 * length} hex digits, got {len(cleaned)}: {value!r}")
    # Checked digit by digit: bytes.fromhex would skip spaces and return a short hash.
    if not all(c in "0123456789abcdef" for c in cleaned):
        raise InvalidHex(f"{what} is not hexadecimal: {value!r}")
    return bytes.fromhex(cleaned)


def hamming(a: bytes, b: bytes) -> int:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()
