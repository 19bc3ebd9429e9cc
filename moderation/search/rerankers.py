"""Rerankers chosen by name (`MODERATION_SEARCH_RERANKER`, `moderation eval run --reranker`):
"exact", the default, and "cross-encoder", BLIP's image-text matching head over the top
candidates' images.

The cross-encoder looks at the pixels, so it fetches each candidate upload's image again,
exactly as screening did: under the URI policy, within `max_bytes` and the fetch timeout,
decoded under the same limits, and under the process's fetch slots (`http.limits`), in all
and per host, as every fetch an API process makes: many analysts' reranks, or candidates
on one slow server, hold no more of them than thumbnails may. An upload whose image cannot
be fetched or decoded any more (or whose fetch found no slot within the fetch timeout)
keeps its exact place after those that were scored: a search never fails because one
uploader's server went away. Queries without text (by image, by upload) are ranked
exactly, since an ITM head judges a text against an image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.config import Settings
from moderation.errors import Invalid
from moderation.http.limits import ApiLimits
from moderation.images.decode import DecodeLimits, decode
from moderation.images.errors import IntakeError
from moderation.images.fetch import fetch
from moderation.images.fetch_slots import FetchesBusy, Full, host_of
from moderation.images.uri_policy import UriPolicy
from moderation.screening.models import Upload
from moderation.search.blip import matcher
from moderation.search.rerank import Candidate, ExactReranker, Reranker, SearchQuery

if TYPE_CHECKING:
    from PIL import Image

    from moderation.search.blip import ImageTextMatcher

logger = logging.getLogger(__name__)

RerankerName = Literal["exact", "cross-encoder"]
RERANKERS: tuple[RerankerName, ...] = ("exact", "cross-encoder")
# Candidate images fetched at once: fetches wait on the network, not the CPU.
_FETCHERS = 8

# Upload ids to the image of each that could be read (absent: could not).
ImageSource = Callable[[Sequence[int]], dict[int, "Image.Image"]]


class UnknownReranker(Invalid):
    code = "unknown_reranker"


class CrossEncoderReranker:
    """Exact scores first; then the top `top` uploads (each by its best frame) reordered by
    P(match) of the query's text with the upload's image. Their scores become that
    probability; the candidates below them keep their cosine and order."""

    def __init__(self, matcher: ImageTextMatcher, images: ImageSource, top: int) -> None:
        self.matcher = matcher
        self.images = images
        self.top = top
        self._exact = ExactReranker()

    def rerank(self, query: SearchQuery, candidates: Sequence[Candidate]) -> list[Candidate]:
        ranked = self._exact.rerank(query, candidates)
        if query.text is None or not ranked:
            return ranked
        head: list[Candidate] = []
        seen: set[int] = set()
        for candidate in ranked:
            if candidate.upload_id not in seen:
                seen.add(candidate.upload_id)
                head.append(candidate)
                if len(head) == self.top:
                    break
        images = self.images([c.upload_id for c in head])
        scored = [c for c in head if c.upload_id in images]
        probabilities = self.matcher.scores(query.text, [images[c.upload_id] for c in scored])
        reordered = sorted(
            (replace(c, score=float(p)) for c, p in zip(scored, probabilities, strict=True)),
            key=lambda c: (-c.score, c.embedding_id),
        )
        moved = {c.embedding_id for c in scored}
        return reordered + [c for c in ranked if c.embedding_id not in moved]


def upload_images(session: Session, settings: Settings, shared: ApiLimits) -> ImageSource:
    """Reads uploads' images as screening did (URI policy, byte and decode limits): the
    first frame, upright and RGB; its fetches and decodes count against `shared`."""
    policy = UriPolicy.from_settings(settings)
    limits = replace(DecodeLimits.from_settings(settings), max_frames=1, max_hashed_frames=1)

    def read(uri: str) -> Image.Image | None:
        try:
            # Waits for a slot (the request waits for its rerank anyway), up to the fetch
            # timeout: its candidates often share a host, which has few slots.
            with shared.fetches.held(host_of(uri), settings.fetch_timeout_s, _no_slot):
                data = fetch(
                    uri,
                    policy=policy,
                    max_bytes=settings.max_bytes,
                    timeout_s=settings.fetch_timeout_s,
                )
            # The shared decode budget (the API application's, as for thumbnails): a rerank
            # decodes up to `top` images at once, and many analysts may rerank together.
            return decode(data, limits, budget=shared.decodes).frames[0][1]
        except (IntakeError, FetchesBusy) as error:
            logger.warning("cross-encoder: %s could not be read again: %s", uri, error.code)
            return None

    def images(upload_ids: Sequence[int]) -> dict[int, Image.Image]:
        rows = session.execute(select(Upload.id, Upload.uri).where(Upload.id.in_(upload_ids)))
        uris = {upload_id: uri for upload_id, uri in rows}
        with ThreadPoolExecutor(_FETCHERS) as pool:
            read_ = dict(zip(uris, pool.map(read, uris.values()), strict=True))
        return {id_: image for id_, image in read_.items() if image is not None}

    return images


def _no_slot(full: Full) -> FetchesBusy:
    return FetchesBusy(f"no fetch slot ({full}) freed within the fetch timeout")


def reranker_named(
    name: str, session: Session, settings: Settings, *, limits: ApiLimits, top: int | None = None
) -> Reranker:
    """The reranker called `name`, reading candidates' images through `session`, within
    `limits`."""
    if name == "exact":
        return ExactReranker()
    if name == "cross-encoder":
        return CrossEncoderReranker(
            matcher(settings.search_rerank_model, settings.resolved_device()),
            upload_images(session, settings, limits),
            top or settings.search_rerank_top,
        )
    raise UnknownReranker(f"no reranker named {name!r}; choose one of {', '.join(RERANKERS)}")
