"""The evidence vault: a store and the key that seals what goes into it, and the names
blobs go under. Built from the settings by entry points (`Vault.from_settings`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from moderation.config import Settings
from moderation.evidence.sealing import Sealer, parse_key
from moderation.evidence.storage import EvidenceStore, open_store


@dataclass(frozen=True)
class Vault:
    store: EvidenceStore
    sealer: Sealer
    retention: timedelta
    # Longer side of the frames kept.
    side: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Vault | None:
        """The configured vault; None when no key is set (nothing is kept)."""
        if settings.evidence_key is None:
            return None
        previous = settings.evidence_previous_keys
        return cls(
            store=open_store(
                settings.evidence_uri, s3_endpoint_url=settings.evidence_s3_endpoint_url
            ),
            sealer=Sealer(
                parse_key(settings.evidence_key.get_secret_value()),
                [
                    parse_key(key)
                    for key in (previous.get_secret_value().split(",") if previous else [])
                    if key.strip()
                ],
            ),
            retention=timedelta(days=settings.evidence_retention_days),
            side=settings.evidence_side,
        )

    def put(self, name: str, plain: bytes) -> None:
        self.store.put(name, self.sealer.seal(name, plain))

    def get(self, name: str) -> bytes | None:
        sealed = self.store.get(name)
        return None if sealed is None else self.sealer.open(name, sealed)


def frame_name(upload_id: int, sha256: bytes, frame: int) -> str:
    """A kept frame's name: the upload, the bytes it was rendered from, the frame."""
    return f"uploads/{upload_id}/{sha256.hex()}/frame-{frame}.jpg"


def report_name(upload_id: int, sha256: bytes) -> str:
    return f"uploads/{upload_id}/{sha256.hex()}/report.json"
