"""What a process needs to answer searches: the configured model's index, opened once, and
the model itself for text and image queries, loaded on the first such query.

The CLI opens a runtime per call (the index tails once, as it opens); the API holds one for
its lifetime with a `Follower` thread, so new uploads become searchable within a second or
two of their screening committing.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from moderation.config import Settings
from moderation.db import session_scope
from moderation.embedding.service import embed_first_frame
from moderation.errors import Invalid
from moderation.images.decode import DecodeLimits
from moderation.images.fetch import fetch, to_uri
from moderation.images.uri_policy import UriPolicy
from moderation.search import service
from moderation.search.follow import FollowedIndex
from moderation.search.rerank import SearchQuery
from moderation.search.store import (
    Follower,
    IndexSettings,
    model_named,
    open_index,
    save_if_due,
)

if TYPE_CHECKING:
    from moderation.embedding.clip import ClipEmbedder


class EmptyQuery(Invalid):
    code = "empty_query"


class SearchRuntime:
    def __init__(self, settings: Settings, engine: Engine, *, follow: bool) -> None:
        self.settings = settings
        self.engine = engine
        self.config = IndexSettings.from_settings(settings)
        self.follow = follow
        self._lock = threading.Lock()
        self._index: FollowedIndex | None = None
        self._follower: Follower | None = None
        self._embedder: ClipEmbedder | None = None

    @property
    def model_name(self) -> str:
        return self.settings.resolved_model()

    def index(self) -> FollowedIndex:
        """The configured model's index: opened (and, in a following runtime, tailed from
        then on) on first use."""
        with self._lock:
            if self._index is None:
                with session_scope() as session:
                    model = model_named(session, self.model_name)
                index = open_index(self.engine, model, self.config)
                save_if_due(index, self.config)
                if self.follow:
                    self._follower = Follower(
                        self.engine, index, self.config, self.settings.search_tail_interval_s
                    ).start()
                self._index = index
            return self._index

    def embedder(self) -> ClipEmbedder:
        with self._lock:
            if self._embedder is None:
                from moderation.embedding.clip import ClipEmbedder

                self._embedder = ClipEmbedder(self.model_name, self.settings.resolved_device())
            return self._embedder

    def text_query(self, text: str) -> SearchQuery:
        if not text.strip():
            raise EmptyQuery("the text query is empty")
        return SearchQuery(vector=self.embedder().embed_texts([text])[0], text=text)

    def image_query(self, data: bytes) -> SearchQuery:
        """An example image's bytes, decoded and embedded exactly as screening does."""
        limits = DecodeLimits.from_settings(self.settings)
        _, vector = embed_first_frame(data, self.embedder(), limits)
        return SearchQuery(vector=vector, image=data)

    def fetched_image_query(self, path_or_uri: str, *, operator_file: bool) -> SearchQuery:
        """An example image by path or URI, fetched under the URI policy. `operator_file`:
        a path on the operator's own command line, readable wherever it is (as for
        `moderation bank add`)."""
        policy = UriPolicy.from_settings(self.settings)
        if operator_file:
            policy = policy.allowing_files([path_or_uri])
        data = fetch(
            to_uri(path_or_uri),
            policy=policy,
            max_bytes=self.settings.max_bytes,
            timeout_s=self.settings.fetch_timeout_s,
        )
        return self.image_query(data)

    def upload_query(self, upload_id: int) -> SearchQuery:
        index = self.index()
        with session_scope() as session:
            vector = service.upload_vector(session, index.model_id, index.model_name, upload_id)
        return SearchQuery(vector=vector, upload_id=upload_id)

    def search(
        self, query: SearchQuery, k: int, filters: service.Filters
    ) -> list[service.SearchResult]:
        index = self.index()
        with session_scope() as session:
            service.check_filters(session, filters)
            return service.search(
                session,
                index,
                query,
                k,
                filters,
                candidates=self.settings.search_candidates,
                exact_scan_max=self.settings.search_exact_scan_max,
            )

    def close(self) -> None:
        """Stop following, saving what was added since the last snapshot."""
        with self._lock:
            if self._follower is not None:
                self._follower.stop()
                self._follower = None
