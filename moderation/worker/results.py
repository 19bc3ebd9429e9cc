"""Writing what screening found: the uploads screened, with their signals and embeddings
(the screening domain's), their hits (the review queue's) and the evidence kept of them
(sealed into the vault before this transaction), in one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy.orm import Session

from moderation.config import Settings
from moderation.evidence import service as evidence
from moderation.review import service as review
from moderation.screening import service as screening
from moderation.webhooks.service import screening_hits_enabled


def record_results(
    session: Session,
    settings: Settings,
    results: Sequence[screening.Screened],
    kept: Sequence[evidence.Kept] = (),
    retention: timedelta = timedelta(days=90),
) -> list[bool]:
    """Record a group's results in the caller's transaction; per result, whether it was
    written (False for an upload already final: a redelivered or concurrent duplicate,
    which writes nothing, its hits and evidence included). `kept`: the evidence sealed for
    uploads of the group with hits, kept for `retention`. `settings`: whether hits are
    announced to the webhook receiver."""
    written = screening.record_screened(session, results)
    new = {r.upload_id for r, fresh in zip(results, written, strict=True) if fresh}
    found = {r.upload_id: r.matches for r in results if r.upload_id in new}
    review.record_hits(session, found, notify=screening_hits_enabled(settings))
    evidence.record_kept(session, [k for k in kept if k.upload_id in new], retention)
    return written
