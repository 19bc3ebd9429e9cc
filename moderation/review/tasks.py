"""The review queue's periodic chore: evidence for hits that screening did not keep it for
(found later by a retro-hunt, or before evidence was kept), fetched again by the worker's
sweeper, never by a reviewer's view (`moderation.evidence.capture`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta

from moderation.chores import Chore
from moderation.evidence import service as evidence
from moderation.evidence.capture import capture
from moderation.evidence.vault import Vault
from moderation.images.decode import DecodeLimits
from moderation.images.uri_policy import UriPolicy
from moderation.review import service
from moderation.runtime import Runtime

logger = logging.getLogger(__name__)

# Uploads fetched again per sweep (each up to a fetch timeout): a sweep stays short.
CAPTURES_PER_SWEEP = 8
# A capture not finished this long after it was taken is taken again (its sweeper died).
CAPTURE_STALE_AFTER = timedelta(minutes=5)


def _capture(runtime: Runtime, *, complete: bool) -> Mapping[str, object]:
    settings = runtime.settings
    vault = Vault.from_settings(settings)
    if vault is None:
        return {}
    policy = UriPolicy.from_settings(settings)
    limits = DecodeLimits.from_settings(settings)
    outcomes: dict[str, int] = {}
    while True:
        with runtime.session() as session:
            due = service.uploads_missing_evidence(
                session, CAPTURES_PER_SWEEP, stale_after=CAPTURE_STALE_AFTER
            )
            taken = evidence.start_captures(session, due, stale_after=CAPTURE_STALE_AFTER)
        for one in taken:
            outcome = capture(
                vault,
                one,
                policy=policy,
                limits=limits,
                max_bytes=settings.max_bytes,
                timeout_s=settings.fetch_timeout_s,
            )
            with runtime.session() as session:
                evidence.finish_capture(session, outcome, vault.retention)
                if service.was_escalated(session, one.upload_id):
                    evidence.hold(session, one.upload_id, actor="system", reason="escalated")
            key = f"evidence_{outcome.state.value}"
            outcomes[key] = outcomes.get(key, 0) + 1
        if not complete or len(due) < CAPTURES_PER_SWEEP:
            return outcomes


CHORES = (Chore("fetching evidence for hits found after screening", _capture),)
