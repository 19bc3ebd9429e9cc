"""Fetching an upload again for evidence, when a hit is found after screening (a
retro-hunt): run by workers' sweepers, never by a reviewer's view, so the uploader's
server learns nothing of when anyone looks.

The bytes are kept only if their SHA-256 is the one screened: a server that served the
banked image to the worker and serves another now gets `changed` recorded, with the new
SHA-256, and none of the new bytes shown to anyone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import UTC, datetime

from moderation.evidence.models import EvidenceSource, EvidenceState
from moderation.evidence.service import Capture, CaptureOutcome, Kept
from moderation.evidence.vault import Vault, frame_name, report_name
from moderation.images.decode import DecodeLimits, decode
from moderation.images.errors import BadInput, TransientFault
from moderation.images.fetch import fetch
from moderation.images.hashing import sha256
from moderation.images.thumbnails import frame_thumbnail
from moderation.images.uri_policy import UriPolicy

logger = logging.getLogger(__name__)


def capture(
    vault: Vault,
    taken: Capture,
    *,
    policy: UriPolicy,
    limits: DecodeLimits,
    max_bytes: int,
    timeout_s: float,
) -> CaptureOutcome:
    """Fetch, check, render and seal one upload's frames (no database)."""
    try:
        data = fetch(taken.uri, policy=policy, max_bytes=max_bytes, timeout_s=timeout_s)
    except BadInput as error:
        return CaptureOutcome(taken.upload_id, EvidenceState.UNAVAILABLE, detail=str(error))
    except TransientFault as fault:
        logger.info("evidence of upload %d: fetch failed, retried: %s", taken.upload_id, fault)
        return CaptureOutcome(taken.upload_id, EvidenceState.CAPTURING, retry=True)
    observed = sha256(data)
    if observed != taken.screened_sha256:
        return CaptureOutcome(
            taken.upload_id,
            EvidenceState.CHANGED,
            observed_sha256=observed,
            detail=f"fetched {datetime.now(UTC):%Y-%m-%d %H:%M:%S %Z}: SHA-256 {observed.hex()}",
        )
    try:
        # Thumbnails only: a large JPEG decodes at the reduced scale that still covers them.
        decoded = decode(
            data,
            replace(limits, max_frames=1, decode_min_side=vault.side),
            lambda frame, _: frame_thumbnail(frame, vault.side),
        )
    except BadInput as error:  # cannot be, for bytes that screened; kept as a reason anyway
        return CaptureOutcome(taken.upload_id, EvidenceState.UNAVAILABLE, detail=str(error))
    for index, thumbnail in decoded.frames:
        vault.put(frame_name(taken.upload_id, observed, index), thumbnail)
    report = {
        "upload_id": taken.upload_id,
        "uri": taken.uri,
        "sha256": observed.hex(),
        "format": decoded.format,
        "width": decoded.width,
        "height": decoded.height,
        "frame_count": decoded.frame_count,
        "source": EvidenceSource.REFETCH.value,
        "fetched_at": datetime.now(UTC).isoformat(),
    }
    vault.put(report_name(taken.upload_id, observed), json.dumps(report, sort_keys=True).encode())
    kept = Kept(
        upload_id=taken.upload_id,
        sha256=observed,
        frames=[index for index, _ in decoded.frames],
        frame_count=decoded.frame_count,
        source=EvidenceSource.REFETCH,
    )
    return CaptureOutcome(taken.upload_id, EvidenceState.PRESERVED, kept=kept)
