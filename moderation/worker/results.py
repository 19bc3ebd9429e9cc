"""Writing what screening found: the uploads screened, with their signals and embeddings
(the screening domain's), and their hits (the review queue's), in one transaction."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from moderation.review import service as review
from moderation.screening import service as screening
from moderation.webhooks.service import screening_hits_enabled


def record_results(session: Session, results: Sequence[screening.Screened]) -> list[bool]:
    """Record a group's results in the caller's transaction; per result, whether it was
    written (False for an upload already final: a redelivered or concurrent duplicate,
    which writes nothing, its hits included)."""
    written = screening.record_screened(session, results)
    found = {r.upload_id: r.matches for r, new in zip(results, written, strict=True) if new}
    review.record_hits(session, found, notify=screening_hits_enabled())
    return written
