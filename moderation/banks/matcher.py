"""Matching uploads against every enabled bank, exactly, as the banks change.

A `BankIndex` (`moderation.banks.index`) is an unchanging snapshot that matching reads;
a `BankMatcher` holds the current one and, when the banks change, makes the next from
what changed (`moderation.banks.live`), so running workers pick up bank changes without
a restart and without reloading a bank of a million entries to add one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy.orm import Session

from moderation.banks.clip_plan import ClipPlan
from moderation.banks.clip_search import ClipHit as ClipHit  # in `search_clip`'s signature
from moderation.banks.index import BankIndex as BankIndex
from moderation.banks.index import Match as Match
from moderation.banks.index import MatchSettings as MatchSettings
from moderation.banks.index import merge_model_matches as merge_model_matches
from moderation.banks.live import LiveBanks
from moderation.banks.reads import Reading

logger = logging.getLogger(__name__)


def _reading(model_id: int, dim: int, settings: MatchSettings) -> Reading:
    return Reading(model_id, dim, settings.default_radius, settings.pdq_min_quality)


def load_index(
    session: Session,
    model_id: int,
    dim: int,
    settings: MatchSettings,
    device: str = "cpu",
    plan: ClipPlan | None = None,
) -> BankIndex:
    """A snapshot of every entry of every enabled bank, read afresh. Reads; writes nothing.
    `device`, `plan`: where and how CLIP vectors are scored (see `ClipBank`)."""
    reading = _reading(model_id, dim, settings)
    return LiveBanks.load(session, reading, settings, device, plan).snapshot()


class BankMatcher:
    """The current `BankIndex` for one model, refreshed when the banks change.

    Once `refresh_s` has passed since the last check, the next caller reads the changes
    committed since (an index range scan of the change log: about a millisecond whatever
    the banks' size) and applies them, at a cost in proportion to what they name. Callers
    that arrive meanwhile wait for that check rather than match against a snapshot that
    may lack an entry committed before their upload arrived: every change committed
    before a check starts is in the snapshot it makes. That is the promise a retro-hunt
    relies on when it searches again, `bank_refresh_s` after new entries committed, only
    the uploads screened since (see `moderation.retrohunt.service`). Since a check costs
    milliseconds, the wait is short; only a full load (a truncated table, or a change
    naming more than a quarter of the banks) makes callers wait as long as loading takes.
    """

    def __init__(
        self,
        sessions: Callable[[], AbstractContextManager[Session]],
        *,
        model_id: int,
        dim: int,
        settings: MatchSettings,
        refresh_s: float,
        device: str = "cpu",
        plan: ClipPlan | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`sessions`: READ COMMITTED sessions (each statement sees what committed before
        it); `device`: where CLIP vectors are scored, the worker's
        (`Settings.resolved_device`); `plan`: which method scores them, by batch and bank
        size (`clip_calibration.plan_for`; default: `clip_plan.default_plan`); `clock`:
        seconds, for `refresh_s`."""
        self._sessions = sessions
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at = clock()
        started = time.monotonic()
        with sessions() as session:
            self._banks = LiveBanks.load(
                session, _reading(model_id, dim, settings), settings, device, plan
            )
        self._index = self._banks.snapshot()
        logger.info("bank index loaded in %.3f s: %s", time.monotonic() - started, self._index.size)

    def current(self) -> BankIndex:
        if self._is_stale():
            with self._lock:
                if self._is_stale():  # not already refreshed by the thread we waited for
                    self._refresh()
        return self._index

    def _is_stale(self) -> bool:
        return self._clock() - self._checked_at >= self._refresh_s

    def _refresh(self) -> None:
        # Everything committed before this moment is in the index once the check is done.
        checked_at = self._clock()
        with self._sessions() as session:
            refreshed = self._banks.refresh(session)
        if refreshed is not None:
            self._index = self._banks.snapshot()
            logger.info(
                "bank index %s in %.3f s (%d changes): %s",
                "reloaded" if refreshed.loaded else "refreshed",
                self._clock() - checked_at,
                refreshed.changes,
                self._index.size,
            )
        self._checked_at = checked_at
