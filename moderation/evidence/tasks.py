"""Evidence's periodic chore: deleting kept frames past their retention (legal holds
excepted). Every worker's sweeper runs it; rows are taken with SKIP LOCKED."""

from __future__ import annotations

from collections.abc import Mapping

from moderation.chores import Chore
from moderation.evidence import service
from moderation.evidence.storage import open_store
from moderation.runtime import Runtime

# Rows purged per sweep: a sweep stays short however much expires at once.
PURGE_PER_SWEEP = 100


def _purge(runtime: Runtime, *, complete: bool) -> Mapping[str, object]:
    settings = runtime.settings
    store = open_store(settings.evidence_uri, s3_endpoint_url=settings.evidence_s3_endpoint_url)
    purged = 0
    while True:
        with runtime.session() as session:
            done = service.purge_expired(session, store, limit=PURGE_PER_SWEEP)
        purged += done
        if not complete or done < PURGE_PER_SWEEP:
            return {"evidence_purged": purged}


CHORES = (Chore("deleting evidence past its retention", _purge),)
