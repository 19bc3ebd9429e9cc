"""The worker process: one screener (model, batcher, bank index) shared by all task
threads, loaded before the first message; a heartbeat that says this process is alive;
and a sweeper that runs every domain's periodic chores (see `sweeper`)."""

from __future__ import annotations

import logging
import threading

from moderation.config import get_settings
from moderation.db import session_scope
from moderation.embedding.clip import ClipEmbedder
from moderation.worker.metrics import on_worker_start
from moderation.worker.pipeline import Screener
from moderation.worker.recovery import Heartbeat
from moderation.worker.sweeper import Sweeper

logger = logging.getLogger(__name__)

_screener: Screener | None = None
_heartbeat: Heartbeat | None = None
_sweeper: Sweeper | None = None
_lock = threading.Lock()


def get_screener(slots: int | None = None) -> Screener:
    """The process's screener, built on first use; `slots`: the task threads it serves
    (default: the configured concurrency)."""
    global _screener, _heartbeat
    with _lock:
        if _screener is None:
            settings = get_settings()
            # Registered before anything is claimed, since claims name this worker; beating
            # already while the model loads, which can take minutes.
            _heartbeat = Heartbeat(settings).start()
            logger.info("worker %s registered", _heartbeat.name)
            _screener = Screener(
                settings,
                session_scope,
                ClipEmbedder.for_worker(settings),
                worker_name=_heartbeat.name,
                slots=slots,
            )
            on_worker_start(settings, _screener.embedder.name)
        return _screener


def start_sweeper() -> None:
    """Once the worker consumes."""
    global _sweeper
    with _lock:
        if _sweeper is None:
            _sweeper = Sweeper(get_settings()).start()


def stop() -> None:
    """After the last task has finished: the screener writes what it has, then the worker
    is recorded as stopped, so nothing it held waits for its heartbeat to go stale."""
    with _lock:
        if _sweeper is not None:
            _sweeper.stop()
        if _screener is not None:
            _screener.close()
        if _heartbeat is not None:
            _heartbeat.stop()
