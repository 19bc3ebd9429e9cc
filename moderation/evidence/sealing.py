"""Sealing evidence at rest: AES-256-GCM (`cryptography`'s AEAD) under a key from the
environment, bound to the blob's name.

A sealed blob is `MAGIC | key id (8) | nonce (12) | ciphertext and tag`. The name it is
stored under is the associated data, so a blob copied or renamed onto another upload's
name fails to open instead of showing the wrong image. The key id (the first 8 bytes of
the key's SHA-256) picks the key to open with, so keys can be rotated: new blobs are
sealed with the current key, old ones still open with the previous keys listed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moderation.errors import Invalid, ModerationError

MAGIC = b"MEV1"
KEY_BYTES = 32
_ID_BYTES = 8
_NONCE_BYTES = 12


class BadEvidenceKey(Invalid):
    code = "bad_evidence_key"


class EvidenceTampered(ModerationError):
    """A blob that does not open: altered, misnamed, or sealed under a key not configured."""

    code = "evidence_tampered"
    status = 500


def new_key() -> str:
    """A fresh key, as `MODERATION_EVIDENCE_KEY` takes it."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()


def parse_key(text: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except (binascii.Error, ValueError) as error:
        raise BadEvidenceKey("the evidence key is not URL-safe base64") from error
    if len(key) != KEY_BYTES:
        raise BadEvidenceKey(
            f"the evidence key is {len(key)} bytes; it must be {KEY_BYTES} "
            "(`moderation evidence new-key` makes one)"
        )
    return key


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:_ID_BYTES]


class Sealer:
    def __init__(self, key: bytes, previous: list[bytes] | None = None) -> None:
        self._current = (_key_id(key), AESGCM(key))
        self._keys = {key_id: aead for key_id, aead in [self._current]}
        for old in previous or []:
            self._keys.setdefault(_key_id(old), AESGCM(old))

    def seal(self, name: str, plain: bytes) -> bytes:
        key_id, aead = self._current
        nonce = os.urandom(_NONCE_BYTES)
        return MAGIC + key_id + nonce + aead.encrypt(nonce, plain, name.encode())

    def open(self, name: str, sealed: bytes) -> bytes:
        header = len(MAGIC) + _ID_BYTES + _NONCE_BYTES
        if len(sealed) < header or not sealed.startswith(MAGIC):
            raise EvidenceTampered(f"evidence {name} is not a sealed blob")
        key_id = sealed[len(MAGIC) : len(MAGIC) + _ID_BYTES]
        aead = self._keys.get(key_id)
        if aead is None:
            raise EvidenceTampered(
                f"evidence {name} was sealed under a key that is not configured "
                "(MODERATION_EVIDENCE_PREVIOUS_KEYS keeps old keys readable)"
            )
        nonce = sealed[len(MAGIC) + _ID_BYTES : header]
        try:
            return aead.decrypt(nonce, sealed[header:], name.encode())
        except InvalidTag as error:
            raise EvidenceTampered(f"evidence {name} does not open: altered or misnamed") from error
