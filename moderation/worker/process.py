"""The worker process's state, built on the runtime its entry point passes down
(`moderation worker`): one screener (models, batchers, bank indexes) shared by all task
threads, loaded before the first message; a heartbeat that says this process is alive; a
sweeper that runs every domain's periodic chores (see `sweeper`); and the threads that
run retro-hunt and re-embedding steps one at a time. The worker's Celery application
holds it (`celery_app.create_app`), and its tasks reach it through their application.

The models computed are the registry's (`moderation.embedding.registry`): the active one
and every candidate, followed while the worker runs. `MODERATION_MODEL` only seeds the
first active model of a database that has none."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from celery import Celery

from moderation.embedding import registry
from moderation.embedding.embedder import Embedder
from moderation.embedding.families import embedder_for_worker, open_embedder
from moderation.retrohunt.service import TargetCache
from moderation.runtime import Runtime
from moderation.worker.metrics import on_worker_start
from moderation.worker.pipeline import Screener
from moderation.worker.recovery import Heartbeat
from moderation.worker.sweeper import Sweeper

logger = logging.getLogger(__name__)

# How much lower than screening's the hunting thread's CPU priority is (Linux nice).
_NICENESS = 10
# The attribute of the Celery application that holds its process's state.
_HELD_AS = "moderation_worker"


def _lower_priority() -> None:
    """On Linux a thread is scheduled as a task of its own: nice this one only, once (a
    thread may lower its own priority but not raise it again)."""
    try:
        thread = threading.get_native_id()
        # setpriority sets a nice value, not an increment: add to the worker's own.
        niceness = min(19, os.getpriority(os.PRIO_PROCESS, thread) + _NICENESS)
        os.setpriority(os.PRIO_PROCESS, thread, niceness)
    except (AttributeError, OSError) as error:  # not Linux, or not allowed
        logger.info("retro-hunt runs at the worker's priority: %s", error)


class WorkerState:
    """What one worker process holds, on `runtime`: the screener and heartbeat, built on
    first use; the sweeper, once the worker consumes; the step threads."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._lock = threading.Lock()
        self._screener: Screener | None = None
        self._heartbeat: Heartbeat | None = None
        self._sweeper: Sweeper | None = None
        # One hunt step at a time per worker process, on this thread, whatever the task
        # threads: the task thread that took the message waits for it without using the
        # CPU (see `moderation.retrohunt.tasks` for what a step costs screening).
        self.hunter = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="retrohunt", initializer=_lower_priority
        )
        # The entries of the job this process hunts last, kept between its steps.
        self.hunt_targets = TargetCache()
        # One re-embedding step at a time per worker process, on this thread. Not niced,
        # unlike the hunt's (whose work is Faiss, outside the GIL): its threads mostly hand
        # items on under the GIL, and a niced thread descheduled while holding it stalls
        # the whole worker (a first try took 88 s for 64 images on a loaded machine). Its
        # duty keeps it below live screening (see `moderation.worker.reembed`).
        self.reembedder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reembed")

    def hold_on(self, app: Celery) -> None:
        """Make this the state `app`'s tasks reach (`of`)."""
        setattr(app, _HELD_AS, self)

    @staticmethod
    def of(app: Celery) -> WorkerState:
        """The state the worker's Celery application holds (`hold_on`)."""
        state: WorkerState = getattr(app, _HELD_AS)
        return state

    def screener(self, slots: int | None = None) -> Screener:
        """The process's screener, built on first use; `slots`: the task threads it serves
        (default: the configured concurrency)."""
        with self._lock:
            if self._screener is None:
                settings = self.runtime.settings
                # Registered before anything is claimed, since claims name this worker;
                # beating already while the model loads, which can take minutes.
                self._heartbeat = Heartbeat(settings).start()
                logger.info("worker %s registered", self._heartbeat.name)
                self._screener = Screener(
                    settings,
                    self.runtime.session,
                    computed_embedders(self.runtime),
                    worker_name=self._heartbeat.name,
                    slots=slots,
                )
                self._screener.follow_registry(lambda name: embedder_for_worker(settings, name))
                on_worker_start(self.runtime, self._screener.embedder.name)
            return self._screener

    def start_sweeper(self) -> None:
        """Once the worker consumes."""
        with self._lock:
            if self._sweeper is None:
                self._sweeper = Sweeper(self.runtime).start()

    def stop(self) -> None:
        """After the last task has finished: the screener writes what it has, then the
        worker is recorded as stopped, so nothing it held waits for its heartbeat to go
        stale."""
        with self._lock:
            if self._sweeper is not None:
                self._sweeper.stop()
            if self._screener is not None:
                self._screener.close()
            if self._heartbeat is not None:
                self._heartbeat.stop()


def computed_embedders(runtime: Runtime) -> list[Embedder]:
    """The registry's computed models, loaded, the active one first; the configured model
    becomes the active one if the registry has none (its fingerprint checked: a worker
    never computes other weights under a registered name)."""
    settings = runtime.settings
    with runtime.session() as session:
        active = registry.active_model(session)
    if active is None:
        seed = open_embedder(settings.resolved_model())
        with runtime.session() as session:
            registry.seed_active(
                session,
                seed.name,
                family=seed.family,
                dim=seed.dim,
                fingerprint=seed.fingerprint,
            )
    with runtime.session() as session:
        names = [model.name for model in registry.computed_models(session)]
    embedders = [embedder_for_worker(settings, names[0])]
    for name in names[1:]:
        try:
            embedders.append(embedder_for_worker(settings, name))
        except Exception as error:  # a candidate that cannot load must not stop screening
            logger.error("cannot compute candidate model %s: %s", name, error)
    return embedders
