"""Opening, rebuilding and persisting a model's index, and the thread that keeps it current.

A process opens an index from the model's snapshot and tails it (`open_index`); with no
snapshot yet it builds one from the table first. Long-lived processes (the API) then run
a `Follower`, which tails every `search_tail_interval_s` and writes a new snapshot once
`search_snapshot_every` rows have been added, so the next start re-reads little.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from moderation.config import Settings
from moderation.embedding.models import Embedding, EmbeddingModel
from moderation.errors import NotFound
from moderation.search.follow import FollowedIndex, Progress, read_since
from moderation.search.indexes import IndexPlan, build_index
from moderation.search.snapshot import read_snapshot, write_snapshot

logger = logging.getLogger(__name__)


class NoEmbeddings(NotFound):
    code = "no_embeddings"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"nothing has been embedded by model {model!r} yet; screen uploads with it "
            "(MODERATION_MODEL names the model searches use)"
        )


@dataclass(frozen=True)
class IndexSettings:
    directory: Path
    plan: IndexPlan
    commit_lag_s: float
    snapshot_every: int

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexSettings:
        return cls(
            directory=settings.index_dir,
            plan=IndexPlan.from_settings(settings),
            commit_lag_s=settings.search_commit_lag_s,
            snapshot_every=settings.search_snapshot_every,
        )


def model_named(session: Session, name: str) -> EmbeddingModel:
    model = session.scalar(select(EmbeddingModel).where(EmbeddingModel.name == name))
    if model is None:
        raise NoEmbeddings(name)
    return model


def count_embeddings(session: Session, model_id: int) -> int:
    return int(session.scalar(select(func.count()).where(Embedding.model_id == model_id)) or 0)


def build(
    engine: Engine,
    model: EmbeddingModel,
    config: IndexSettings,
    *,
    reading: Progress | None = None,
    indexing: Progress | None = None,
) -> FollowedIndex:
    """A new index over every row of the model (not yet written to disk)."""
    read = read_since(
        engine, model.id, model.dim, 0, np.empty(0, np.int64), reading or (lambda _: None)
    )
    built = build_index(read.vectors, config.plan, progress=indexing or (lambda _: None))
    return FollowedIndex(
        model_id=model.id,
        model_name=model.name,
        dim=model.dim,
        built=built,
        # Label i is row order[i] of what was read (tuning queries are added last).
        embedding_ids=read.embedding_ids[built.order],
        upload_ids=read.upload_ids[built.order],
        # Nothing is settled yet: the checkpoint moves at a later tail (see `follow.py`).
        checkpoint=0,
        commit_lag_s=config.commit_lag_s,
        pending=[read.horizon],
        unsaved=len(read.embedding_ids),
    )


def save(index: FollowedIndex, config: IndexSettings) -> Path:
    with index.locked():
        path = write_snapshot(config.directory, index.snapshot())
        index.unsaved = 0
    logger.info(
        "saved index of model %s: %d vectors, checkpoint %d, at %s",
        index.model_name,
        index.size,
        index.checkpoint,
        path,
    )
    return path


def settle(index: FollowedIndex, engine: Engine, timeout_s: float = 10.0) -> bool:
    """Tail until the checkpoint passes the rows of the first read (see `follow.py`), so a
    snapshot saved now lets the next start re-read nothing; True if it did in time. A
    snapshot saved before is still correct: the next start only re-reads more ids."""
    target = index.pending[0].allocated if index.pending else 0
    deadline = time.monotonic() + timeout_s
    while index.checkpoint < target and time.monotonic() < deadline:
        time.sleep(min(0.25, index.commit_lag_s + 0.05))
        index.tail(engine)
    return index.checkpoint >= target


def open_index(engine: Engine, model: EmbeddingModel, config: IndexSettings) -> FollowedIndex:
    """The model's index from its snapshot plus the rows since (built and saved first if
    there is no usable snapshot)."""
    snapshot = read_snapshot(config.directory, model.id)
    if snapshot is not None and (snapshot.model_name, snapshot.dim) == (model.name, model.dim):
        index = FollowedIndex.from_snapshot(snapshot, commit_lag_s=config.commit_lag_s)
    else:
        logger.warning(
            "no index snapshot for model %s under %s: building", model.name, config.directory
        )
        index = build(engine, model, config)
        settle(index, engine)
        save(index, config)
    index.tail(engine)
    return index


def outgrown_by(index: FollowedIndex, plan: IndexPlan) -> str | None:
    """A note when the corpus has grown past the kind of index it was built as."""
    wanted = plan.kind_for(index.size)
    if wanted is index.kind:
        return None
    return (
        f"the index of {index.model_name} holds {index.size} vectors, for which the settings "
        f"call for {wanted.value}, but it was built as {index.kind.value}: run "
        "`moderation index rebuild` (searches stay correct meanwhile; `moderation index "
        "eval` shows its recall)"
    )


def save_if_due(index: FollowedIndex, config: IndexSettings) -> bool:
    if index.unsaved >= config.snapshot_every:
        save(index, config)
        return True
    return False


class Follower:
    """A daemon thread that tails an index every `interval_s` until `stop`; errors (the
    database away) are logged and retried at the next turn, never fatal."""

    def __init__(
        self, engine: Engine, index: FollowedIndex, config: IndexSettings, interval_s: float
    ) -> None:
        self.engine = engine
        self.index = index
        self.config = config
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"index-follower-{index.model_id}", daemon=True
        )

    def start(self) -> Follower:
        self._thread.start()
        return self

    def _run(self) -> None:
        outgrown = False
        while not self._stop.wait(self.interval_s):
            try:
                added = self.index.tail(self.engine)
                if added:
                    logger.info("index of %s: %d new vectors", self.index.model_name, added)
                save_if_due(self.index, self.config)
                if not outgrown and (message := outgrown_by(self.index, self.config.plan)):
                    outgrown = True
                    logger.warning("%s", message)
            except Exception:
                logger.exception("tailing the index of %s failed; retrying", self.index.model_name)

    def stop(self) -> None:
        """Stop tailing and save what was added since the last snapshot."""
        self._stop.set()
        self._thread.join()
        if self.index.unsaved:
            try:
                save(self.index, self.config)
            except OSError:
                logger.exception("could not save the index of %s", self.index.model_name)
