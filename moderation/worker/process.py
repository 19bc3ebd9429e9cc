"""The worker process: one screener (models, batchers, bank indexes) shared by all task
threads, loaded before the first message; a heartbeat that says this process is alive;
and a sweeper that runs every domain's periodic chores (see `sweeper`).

The models computed are the registry's (`moderation.embedding.registry`): the active one
and every candidate, followed while the worker runs. `MODERATION_MODEL` only seeds the
first active model of a database that has none."""

from __future__ import annotations

import logging
import threading

from moderation.config import Settings, get_settings
from moderation.db import session_scope
from moderation.embedding import registry
from moderation.embedding.embedder import Embedder
from moderation.embedding.families import embedder_for_worker, open_embedder
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
                computed_embedders(settings),
                worker_name=_heartbeat.name,
                slots=slots,
            )
            _screener.follow_registry(lambda name: embedder_for_worker(settings, name))
            on_worker_start(settings, _screener.embedder.name)
        return _screener


def computed_embedders(settings: Settings) -> list[Embedder]:
    """The registry's computed models, loaded, the active one first; the configured model
    becomes the active one if the registry has none (its fingerprint checked: a worker
    never computes other weights under a registered name)."""
    with session_scope() as session:
        active = registry.active_model(session)
    if active is None:
        seed = open_embedder(settings.resolved_model())
        with session_scope() as session:
            registry.seed_active(
                session,
                seed.name,
                family=seed.family,
                dim=seed.dim,
                fingerprint=seed.fingerprint,
            )
    with session_scope() as session:
        names = [model.name for model in registry.computed_models(session)]
    embedders = [embedder_for_worker(settings, names[0])]
    for name in names[1:]:
        try:
            embedders.append(embedder_for_worker(settings, name))
        except Exception as error:  # a candidate that cannot load must not stop screening
            logger.error("cannot compute candidate model %s: %s", name, error)
    return embedders


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
