"""The banks' periodic chore: keeping the change log bounded (see `pruning`)."""

from __future__ import annotations

from collections.abc import Mapping

from moderation.banks.pruning import prune_expired
from moderation.chores import Chore
from moderation.runtime import Runtime


def _prune(runtime: Runtime, *, complete: bool) -> Mapping[str, object]:
    pruned = prune_expired(runtime, batches=None) if complete else prune_expired(runtime)
    return {"bank_changes_pruned": pruned.rows, "bank_changes_pruned_through": pruned.through}


CHORES = (Chore("pruning the bank change log", _prune),)
