"""Periodic chores: work each domain asks to be done every few seconds, by every worker's
sweeper (`moderation.worker.sweeper`) and by `moderation sweep`.

A domain lists its chores in its `tasks` module; the worker runs them all, on its
runtime (`moderation.runtime`): the database and broker each chore works on come from the
caller. Each must be safe to run in many processes at once and again at any time (an
advisory lock, a checkpoint, a status guard): every worker runs every chore.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from moderation.runtime import Runtime


class ChoreRun(Protocol):
    def __call__(self, runtime: Runtime, *, complete: bool) -> Mapping[str, object]:
        """Do the chore once on `runtime`; `complete`: all that is due (`moderation
        sweep`), not just a sweep's bounded share. Returns what it did, for `moderation
        sweep --json`."""
        ...


@dataclass(frozen=True)
class Chore:
    name: str  # what it does, for logs: "pruning the bank change log"
    run: ChoreRun
