"""PDQ at full resolution for the few uploads that need it, in the worker's own threads.

Large JPEGs are decoded at reduced scale (`moderation.images.decode`), where PDQ moves a
few bits from the full-resolution reference. Bank entries added from images are hashed
the same way, but entries imported from hash lists were hashed at full resolution. When a
reduced hash comes within `pdq_full_resolution_margin` bits beyond the threshold of an
entry (`BankIndex.pdq_near_miss`), the upload is fetched and decoded again at full
resolution and that hash matched as well. Unrelated photos do not come that close (no
unrelated pair of the held-out photos came within 100 bits: bench/decode_scale.py), so
this costs a full decode (140 ms at 12 megapixels) for near-duplicates of banked content
only: 13 of the 85 near-duplicate pairs of that benchmark (docs/matching.md).

One such decode runs at a time, within its own memory budget of `decode_memory_mb`.
"""

from __future__ import annotations

import threading

from moderation.config import Settings
from moderation.images.budget import MemoryBudget
from moderation.images.decode import DecodeLimits
from moderation.images.fetch import fetch
from moderation.images.hashing import PdqHash
from moderation.images.signals import full_resolution_pdq
from moderation.images.uri_policy import UriPolicy
from moderation.worker.intake.stage import check_declared_bytes


class FullResolutionPdq:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._limits = DecodeLimits.from_settings(settings)
        self._policy = UriPolicy.from_settings(settings)
        self._budget = MemoryBudget(settings.decode_memory_mb * 2**20)
        self._one_at_a_time = threading.Lock()

    def __call__(
        self, uri: str, declared_sha256: bytes | None, fetched: bytes | None = None
    ) -> tuple[PdqHash, ...]:
        """Frame 0's full-resolution PDQ (see `full_resolution_pdq`); `fetched`: the bytes
        at `uri` if the worker has them already (not fetched again). Raises `BadInput` or
        `TransientFault` as intake does."""
        settings = self._settings
        with self._one_at_a_time:
            data = fetched
            if data is None:
                data = fetch(
                    uri,
                    policy=self._policy,
                    max_bytes=settings.max_bytes,
                    timeout_s=settings.fetch_timeout_s,
                )
            check_declared_bytes(data, declared_sha256)
            return full_resolution_pdq(data, self._limits, self._budget)
