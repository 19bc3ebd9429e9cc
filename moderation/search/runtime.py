"""What a process needs to answer searches: each model's index, opened once, and the model
itself for text and image queries, loaded on the first such query.

Which model answers follows the registry (`moderation.embedding.registry`): the active
model, read again at most every `model_poll_s`, so an activation switches every search
process within that. A query is embedded by one model and searched in that model's index
only (`SearchQuery.model_id`): a switch between embedding a query and searching it never
compares vectors of two models. `model` pins a runtime to one registered model instead
(`moderation search --model NAME` queries a candidate before it is activated).

The CLI opens a runtime per call (the index tails once, as it opens); the API holds one for
its lifetime with a `Follower` thread per index, so new uploads become searchable within a
second or two of their screening committing, and it opens the candidates' indexes beside
the active one's as they appear, so that an activation finds its index built.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moderation.embedding import registry
from moderation.embedding.models import EmbeddingModel, ModelState
from moderation.embedding.service import embed_first_frame
from moderation.errors import Invalid
from moderation.http.limits import FETCHES_SETTING, ApiLimits
from moderation.images.decode import DecodeLimits
from moderation.images.fetch import fetch, to_uri
from moderation.images.uri_policy import UriPolicy
from moderation.runtime import Runtime
from moderation.search import service
from moderation.search.rerank import SearchQuery
from moderation.search.rerankers import reranker_named
from moderation.search.store import (
    Follower,
    IndexSettings,
    NoEmbeddings,
    model_named,
    open_index,
    save_if_due,
)
from moderation.search.vector_index import VectorIndex

if TYPE_CHECKING:
    from moderation.embedding.embedder import Embedder
    from moderation.search.milvus_index import Milvus

logger = logging.getLogger(__name__)


@dataclass
class ModelSearch:
    """One model's index, and the thread that follows it."""

    model_id: int
    name: str
    index: VectorIndex
    follower: Follower | None = None


class EmptyQuery(Invalid):
    code = "empty_query"


class SearchRuntime:
    """Searches on `runtime`'s settings and database."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        follow: bool,
        model: str | None = None,
        limits: ApiLimits | None = None,
    ) -> None:
        """`limits`: what its queries' decodes and fetches (and its reranker's) count
        against; the API application's own, shared with its other routes, else limits of
        this runtime's own from its settings."""
        self.runtime = runtime
        self.settings = runtime.settings
        self.limits = limits or ApiLimits.from_settings(self.settings)
        self.engine = runtime.engine
        self.config = IndexSettings.from_settings(self.settings)
        self.follow = follow
        self._pinned = model
        self._lock = threading.Lock()
        self._models: dict[int, ModelSearch] = {}
        self._embedders: dict[int, Embedder] = {}
        self._embedder_lock = threading.Lock()
        self._served: tuple[int, str] | None = None
        self._checked_at = -float("inf")
        self._opening: set[int] = set()
        self._milvus: Milvus | None = None

    def _milvus_client(self) -> Milvus:
        from moderation.search.milvus_index import Milvus, MilvusSettings

        with self._lock:
            if self._milvus is None:
                self._milvus = Milvus(MilvusSettings.from_settings(self.settings))
            return self._milvus

    @property
    def model_name(self) -> str:
        return self._serving()[1]

    def _serving(self) -> tuple[int, str]:
        """The model that answers now: the pinned one, or the registry's active model
        (read again once `model_poll_s` has passed)."""
        with self._lock:
            now = time.monotonic()
            if self._served is None or now - self._checked_at >= self.settings.model_poll_s:
                self._served = self._read_served()
                self._checked_at = now
            return self._served

    def _read_served(self) -> tuple[int, str]:
        with self.runtime.session() as session:
            if self._pinned is not None:
                model = model_named(session, registry.registered_name(self._pinned))
            else:
                model = registry.active_model(session) or model_named(
                    session, self.settings.resolved_model()
                )
            candidates = [
                (m.id, m.name)
                for m in registry.computed_models(session)
                if m.state is ModelState.CANDIDATE
            ]
        if self.follow and self._pinned is None:
            for candidate in candidates:
                self._open_in_background(*candidate)
        return model.id, model.name

    def _open_in_background(self, model_id: int, name: str) -> None:
        """A candidate's index, built and followed beside the serving one (the caller
        holds `_lock`)."""
        if model_id in self._models or model_id in self._opening:
            return
        self._opening.add(model_id)

        def build() -> None:
            try:
                self._model_search(model_id, name)
            except NoEmbeddings:
                pass  # nothing embedded yet: tried again at the next poll
            except Exception:
                logger.exception("building the index of candidate model %s failed", name)
            finally:
                with self._lock:
                    self._opening.discard(model_id)

        threading.Thread(target=build, name=f"index-build-{model_id}", daemon=True).start()

    def _model_search(self, model_id: int, name: str) -> ModelSearch:
        with self._lock:
            found = self._models.get(model_id)
        if found is not None:
            return found
        with self.runtime.session() as session:
            model = model_named(session, name)
        if self.settings.search_backend == "milvus":
            # The collection is kept current by `moderation index sync`, not by this process.
            from moderation.search import milvus_sync

            opened = milvus_sync.open_index(self.engine, self._milvus_client(), model)
            with self._lock:
                return self._models.setdefault(model_id, ModelSearch(model_id, name, opened))
        index = open_index(self.engine, model, self.config)
        save_if_due(index, self.config)
        with self._lock:
            if model_id in self._models:  # opened by another thread meanwhile
                return self._models[model_id]
            follower = None
            if self.follow:
                follower = Follower(
                    self.engine, index, self.config, self.settings.search_tail_interval_s
                ).start()
            searched = self._models[model_id] = ModelSearch(model_id, name, index, follower)
            return searched

    def _current(self) -> ModelSearch:
        return self._model_search(*self._serving())

    def index(self, model_id: int | None = None) -> VectorIndex:
        """The index of the model that answers now (or of `model_id`, a query's)."""
        if model_id is None:
            return self._current().index
        with self._lock:
            found = self._models.get(model_id)
        if found is not None:
            return found.index
        with self.runtime.session() as session:
            name = session.get_one(EmbeddingModel, model_id).name
        return self._model_search(model_id, name).index

    def embedder(self) -> Embedder:
        return self._embedder_of(*self._serving())

    def _embedder_of(self, model_id: int, name: str) -> Embedder:
        with self._embedder_lock:
            if model_id not in self._embedders:
                from moderation.embedding.families import open_embedder

                self._embedders[model_id] = open_embedder(name, self.settings.resolved_device())
            return self._embedders[model_id]

    def text_query(self, text: str) -> SearchQuery:
        if not text.strip():
            raise EmptyQuery("the text query is empty")
        model_id, name = self._serving()
        vector = self._embedder_of(model_id, name).embed_texts([text])[0]
        return SearchQuery(vector=vector, model_id=model_id, text=text)

    def image_query(self, data: bytes) -> SearchQuery:
        """An example image's bytes, decoded and embedded exactly as screening does."""
        limits = DecodeLimits.from_settings(self.settings)
        model_id, name = self._serving()
        embedder = self._embedder_of(model_id, name)
        _, vector = embed_first_frame(data, embedder, limits, budget=self.limits.decodes)
        return SearchQuery(vector=vector, model_id=model_id, image=data)

    def fetched_image_query(self, path_or_uri: str, *, operator_file: bool) -> SearchQuery:
        """An example image by path or URI, fetched under the URI policy. `operator_file`:
        a path on the operator's own command line, readable wherever it is (as for
        `moderation bank add`)."""
        policy = UriPolicy.from_settings(self.settings)
        if operator_file:
            policy = policy.allowing_files([path_or_uri])
        uri = to_uri(path_or_uri)
        with self.limits.fetches.taken(uri, setting=FETCHES_SETTING):
            data = fetch(
                uri,
                policy=policy,
                max_bytes=self.settings.max_bytes,
                timeout_s=self.settings.fetch_timeout_s,
            )
        return self.image_query(data)

    def upload_query(self, upload_id: int) -> SearchQuery:
        index = self._current().index
        with self.runtime.session() as session:
            vector = service.upload_vector(session, index.model_id, index.model_name, upload_id)
        return SearchQuery(vector=vector, model_id=index.model_id, upload_id=upload_id)

    def search(
        self,
        query: SearchQuery,
        k: int,
        filters: service.Filters,
        *,
        reranker: str | None = None,
    ) -> list[service.SearchResult]:
        """The k best uploads, ordered by `reranker` (by name; default: the setting)."""
        index = self.index(query.model_id)
        if query.model_id is not None and index.model_id != query.model_id:
            raise RuntimeError("a query reached another model's index")  # never: see index()
        with self.runtime.session() as session:
            service.check_filters(session, filters)
            return service.search(
                session,
                index,
                query,
                k,
                filters,
                candidates=self.settings.search_candidates,
                exact_scan_max=self.settings.search_exact_scan_max,
                reranker=reranker_named(
                    reranker or self.settings.search_reranker,
                    session,
                    self.settings,
                    limits=self.limits,
                ),
            )

    def close(self) -> None:
        """Stop following, saving what was added since the last snapshot."""
        with self._lock:
            models = list(self._models.values())
            self._models = {}
        for searched in models:
            if searched.follower is not None:
                searched.follower.stop()
