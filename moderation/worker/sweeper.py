"""Every worker's sweeper: the periodic chores of every domain, on a thread, every
`sweep_interval_s`; and the same chores once, complete, for `moderation sweep`. Both run
them on the runtime their process was given.

A chore that fails (the database or the broker is down) is logged and tried again at the
next interval; it never stops the worker, nor the chores after it.
"""

from __future__ import annotations

import logging
import threading

from moderation.banks import tasks as banks
from moderation.chores import Chore
from moderation.evaluation import tasks as evaluation
from moderation.evidence import tasks as evidence
from moderation.lifecycle import tasks as lifecycle
from moderation.retrohunt import tasks as retrohunt
from moderation.review import tasks as review
from moderation.runtime import Runtime
from moderation.worker.recovery import REQUEUE_LOST

logger = logging.getLogger(__name__)

# Lost uploads first: they are what users wait for.
CHORES: tuple[Chore, ...] = (
    REQUEUE_LOST,
    *retrohunt.CHORES,
    *lifecycle.CHORES,
    *review.CHORES,
    *evidence.CHORES,
    *banks.CHORES,
    # Last: a due run takes a pass over the golden set.
    *evaluation.CHORES,
)
# A shutdown waits this long at most for a sweep caught in a dead connection.
_JOIN_TIMEOUT_S = 30.0


def sweep_all(runtime: Runtime, chores: tuple[Chore, ...] = CHORES) -> dict[str, object]:
    """Every chore once, complete; what each did. A failing chore raises, after the others
    have run."""
    done: dict[str, object] = {}
    failed: list[Exception] = []
    for chore in chores:
        try:
            done.update(chore.run(runtime, complete=True))
        except Exception as error:
            logger.exception("%s failed", chore.name)
            failed.append(error)
    if failed:
        raise failed[0]
    return done


class Sweeper:
    def __init__(self, runtime: Runtime, chores: tuple[Chore, ...] = CHORES) -> None:
        self._runtime = runtime
        self._interval_s = runtime.settings.sweep_interval_s
        self._chores = chores
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=_JOIN_TIMEOUT_S)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            for chore in self._chores:
                try:
                    chore.run(self._runtime, complete=False)
                except Exception:
                    logger.exception(
                        "%s failed; trying again in %g s", chore.name, self._interval_s
                    )
