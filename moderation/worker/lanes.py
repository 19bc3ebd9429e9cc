"""The models a worker computes, each in a lane of its own: its embedder, its batched
forward passes, its bank matcher and its batched bank search.

A `Lineup` is the lanes of one moment, the active model's first. An upload takes the
lineup once, as its intake starts, and keeps it to its record: one decode gives one crop
per lane's preprocessing, each lane embeds and searches its own crops, and no vector is
ever compared with another model's. While a model change is in progress the lineup has
two lanes (or more), and a bank entry matches under every model it has an embedding for.

The lineup follows the registry (`moderation.embedding.registry`): `RegistryFollower`
reads it every `model_poll_s`, opens the lanes of models added (loading their weights
off the task threads), and swaps the lineup in one assignment. Lanes of retired models
are closed once no upload can still hold them (`stage_timeout_s` later).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from moderation.banks.clip_calibration import plan_for
from moderation.banks.matcher import BankMatcher, ClipHit, MatchSettings
from moderation.config import Settings
from moderation.embedding import registry
from moderation.embedding.embedder import Embedder
from moderation.embedding.feeder import Feeder
from moderation.embedding.preprocessing import Preprocessing
from moderation.worker.batching import Batcher, Chain

logger = logging.getLogger(__name__)

Sessions = Callable[[], AbstractContextManager[Session]]
# A vector and its CLIP hits, as the bank search hands them back.
Searched = tuple[np.ndarray, list[ClipHit]]

# How long the bank search waits for the rest of a forward pass's vectors, which reach it
# as their threads wake. Measured on two loaded cores: 2 and 5 ms both caught a whole
# forward pass (mean 6.5 vectors a search, as many as a forward pass had), where waiting
# `batch_wait_ms` (25) only added its wait to every upload.
SEARCH_WAIT_S = 0.005


class ModelLane:
    """One model's embedder, forward passes, bank matcher and bank search."""

    def __init__(
        self, settings: Settings, sessions: Sessions, embedder: Embedder, model_id: int
    ) -> None:
        self.model_id = model_id
        self.embedder = embedder
        self.matcher = BankMatcher(
            sessions,
            model_id=model_id,
            dim=embedder.dim,
            settings=MatchSettings(
                default_radius=settings.match_radius,
                pdq_threshold=settings.pdq_threshold,
                pdq_min_quality=settings.pdq_min_quality,
            ),
            refresh_s=settings.bank_refresh_s,
            device=settings.resolved_device(),
            # The fastest exact way to score this model's bank, measured (`clip_calibration`).
            plan=plan_for(
                embedder.dim,
                settings.resolved_device(),
                settings.clip_match_methods,
                settings.resolved_clip_plan_cache(),
            ),
        )
        # Many uploads' images per forward pass, and their vectors searched together.
        self.embedding: Batcher[np.ndarray, np.ndarray] = Batcher(
            Feeder(embedder).embed,
            name=f"embedding-{model_id}",
            max_batch=settings.resolved_batch_size(),
            max_wait_s=settings.batch_wait_ms / 1000,
            streams=settings.resolved_streams(),
        )
        self.clip_search: Batcher[np.ndarray, Searched] = Batcher(
            self._search_bank,
            name=f"clip-search-{model_id}",
            max_batch=4 * settings.resolved_batch_size(),
            # A forward pass hands on its vectors together; a moment's wait lets the other
            # stream's next pass join them when the search is slower than the model.
            max_wait_s=min(settings.batch_wait_ms / 1000, SEARCH_WAIT_S),
        )
        # An upload's task thread waits once for its forward pass and its bank search: the
        # embedding stream hands the vectors on to the clip-search thread, which wakes it.
        self.embed_and_search: Chain[np.ndarray, np.ndarray, Searched] = Chain(
            self.embedding, self.clip_search
        )

    @property
    def name(self) -> str:
        return self.embedder.name

    @property
    def preprocess(self) -> Preprocessing:
        return self.embedder.preprocess

    def _search_bank(self, vectors: Sequence[np.ndarray]) -> list[Searched]:
        hits = self.matcher.current().search_clip(np.stack(vectors))
        return list(zip(vectors, hits, strict=True))

    def stages(self) -> tuple[Batcher[np.ndarray, np.ndarray], Batcher[np.ndarray, Searched]]:
        return self.embedding, self.clip_search

    def close(self) -> None:
        for stage in self.stages():
            stage.close()


@dataclass(frozen=True)
class Lineup:
    """The lanes of one moment, the active model's first."""

    lanes: tuple[ModelLane, ...]

    @property
    def primary(self) -> ModelLane:
        return self.lanes[0]

    @property
    def preprocessings(self) -> tuple[Preprocessing, ...]:
        return tuple(lane.preprocess for lane in self.lanes)

    @property
    def model_ids(self) -> tuple[int, ...]:
        return tuple(lane.model_id for lane in self.lanes)

    def lane(self, model_id: int) -> ModelLane | None:
        return next((lane for lane in self.lanes if lane.model_id == model_id), None)


def registered_id(session: Session, embedder: Embedder) -> int:
    """The registry's id for a loaded embedder (see `registry.registered`)."""
    return registry.registered(session, embedder).id


@dataclass(frozen=True)
class ComputedModel:
    model_id: int
    name: str


def read_computed(session: Session) -> list[ComputedModel]:
    return [ComputedModel(m.id, m.name) for m in registry.computed_models(session)]


class RegistryFollower:
    """A daemon thread that keeps a screener's lineup equal to the registry's computed
    models (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        sessions: Sessions,
        get_lineup: Callable[[], Lineup],
        set_lineup: Callable[[Lineup], None],
        open_model: Callable[[str], Embedder],
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._get = get_lineup
        self._set = set_lineup
        self._open = open_model
        self._stop = threading.Event()
        self._retiring: list[tuple[float, ModelLane]] = []
        self._failed: dict[int, str] = {}  # model id -> why it could not be opened
        self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)

    def start(self) -> RegistryFollower:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._settings.model_poll_s):
            try:
                self.follow_once()
            except Exception:
                logger.exception("following the model registry failed; retrying")
            self._close_retired(time.monotonic())

    def follow_once(self) -> bool:
        """Read the registry and swap the lineup if it changed; whether it did."""
        with self._sessions() as session:
            wanted = read_computed(session)
        current = self._get()
        if [m.model_id for m in wanted] == list(current.model_ids) or not wanted:
            return False
        lanes: list[ModelLane] = []
        for model in wanted:
            lane = current.lane(model.model_id) or self._open_lane(model)
            if lane is None:
                if model == wanted[0]:
                    # Never screen without the active model: keep the lineup as it is.
                    return False
                continue
            lanes.append(lane)
        lineup = Lineup(tuple(lanes))
        if lineup.model_ids == current.model_ids:
            return False
        self._set(lineup)
        kept = set(lineup.model_ids)
        dropped = [lane for lane in current.lanes if lane.model_id not in kept]
        later = time.monotonic() + self._settings.stage_timeout_s
        self._retiring += [(later, lane) for lane in dropped]
        logger.info("models computed now: %s", ", ".join(f"{m.name} ({m.model_id})" for m in lanes))
        return True

    def _open_lane(self, model: ComputedModel) -> ModelLane | None:
        if model.model_id in self._failed:
            return None
        try:
            embedder = self._open(model.name)
            with self._sessions() as session:
                model_id = registered_id(session, embedder)
            if model_id != model.model_id:
                raise ValueError(f"{model.name} is model {model_id}, not {model.model_id}")
            return ModelLane(self._settings, self._sessions, embedder, model.model_id)
        except Exception as error:
            # Logged once: the registry asks for it at every poll.
            self._failed[model.model_id] = str(error)
            logger.error("cannot compute model %s: %s", model.name, error)
            return None

    def _close_retired(self, now: float) -> None:
        due = [lane for at, lane in self._retiring if at <= now]
        self._retiring = [(at, lane) for at, lane in self._retiring if at > now]
        for lane in due:
            lane.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for _, lane in self._retiring:
            lane.close()
        self._retiring = []
