"""Scheduled runs on the golden set: a chore every worker's sweeper tries, which runs only
when `eval_interval_s` is set and that long has passed since the last scheduled run.

Every worker runs every chore, so the decision is taken under a transaction-level advisory
lock and re-read inside it: of the workers that try at once, one runs, and the others find
the run recorded (the lock is held until the run commits).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text

from moderation.chores import Chore
from moderation.evaluation import runner
from moderation.evaluation.models import EvaluationRun
from moderation.runtime import Runtime
from moderation.search.store import NoEmbeddings

logger = logging.getLogger(__name__)

SCHEDULE = "schedule"
# pg_advisory_xact_lock's key for "a scheduled golden-set run is being decided".
_LOCK_KEY = 0x601DE7


def run_if_due(runtime: Runtime) -> dict[str, object]:
    settings = runtime.settings
    if settings.eval_interval_s is None:
        return {}
    with runtime.session() as session:
        if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _LOCK_KEY}):
            return {}  # another worker is deciding, or running one now
        last = session.scalar(
            select(func.max(EvaluationRun.created_at)).where(EvaluationRun.trigger == SCHEDULE)
        )
        if last is not None and datetime.now(UTC) - last < timedelta(
            seconds=settings.eval_interval_s
        ):
            return {}
        try:
            view = runner.evaluate(runtime, trigger=SCHEDULE)
        except NoEmbeddings:
            return {}  # nothing screened yet under the model
    logger.info("scheduled golden-set run %d: %s", view.id, view.figures)
    return {"golden_run": view.id, "golden_regressed": view.regressed}


def _scheduled(runtime: Runtime, *, complete: bool) -> Mapping[str, object]:
    return run_if_due(runtime)


CHORES = (Chore("measuring search on the golden set when due", _scheduled),)
