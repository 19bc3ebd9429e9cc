"""What a file is, by its first bytes: for choosing the images in a directory to submit.

Extensions lie both ways (a `.jpg` that is text, a photo saved without one); the first
bytes of every format we decode say what it is. This only chooses what to submit: the
worker decodes every upload and refuses what is not really an image.
"""

from __future__ import annotations

from moderation.images.decode import ALLOWED_FORMATS, KNOWN_UNSUPPORTED

# Enough for every signature below, including the ISO-BMFF brand at bytes 4-12.
HEAD_BYTES = 16

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
SNIFFED_FORMATS = frozenset({name for _, name in _SIGNATURES} | {"WEBP"})

NOT_AN_IMAGE = f"not an image by its content (not {', '.join(ALLOWED_FORMATS)})"


def image_format(head: bytes) -> str | None:
    """The format these first bytes begin, if it is one we decode; else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    return None


def why_not_an_image(head: bytes) -> str | None:
    """None if `head` begins an image we decode; else why not, in words."""
    if image_format(head) is not None:
        return None
    if not head:
        return "empty"
    for brand, message in KNOWN_UNSUPPORTED.items():
        if brand in head:
            return message
    return NOT_AN_IMAGE
