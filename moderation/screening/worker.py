"""The worker process: one screener (model, batcher, bank index) shared by all task threads,
loaded before the first message, and a sweeper that re-enqueues stuck uploads."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from moderation.config import get_settings
from moderation.db import session_scope
from moderation.embedding.clip import ClipEmbedder
from moderation.screening.pipeline import Screener
from moderation.screening.tasks import sweep_once

logger = logging.getLogger(__name__)

_screener: Screener | None = None
_screener_lock = threading.Lock()
_stop = threading.Event()


def get_screener() -> Screener:
    global _screener
    with _screener_lock:
        if _screener is None:
            settings = get_settings()
            _screener = Screener(settings, session_scope, ClipEmbedder.for_worker(settings))
        return _screener


def _sweep_forever() -> None:
    interval = get_settings().sweep_interval_s
    while not _stop.wait(interval):
        try:
            sweep_once()
        except Exception:
            logger.exception("sweep failed; trying again in %.0f s", interval)


@worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    threading.Thread(target=_sweep_forever, name="sweeper", daemon=True).start()


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    _stop.set()
    if _screener is not None:
        _screener.close()
