"""Screening one upload: claim, fetch, decode, hash, embed, match, record.

A `Screener` is built once per worker process and shared by all its task threads. Claims
and results are written by group commit (many uploads per transaction, see
`moderation.group_commit`), and no connection is held while the image is fetched, decoded
or embedded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from moderation.banks.matcher import BankMatcher, ClipHit, MatchSettings
from moderation.batching import Batcher
from moderation.config import Settings
from moderation.embedding.clip import ClipEmbedder
from moderation.embedding.service import get_or_create_model
from moderation.group_commit import GroupCommit
from moderation.images.budget import MemoryBudget
from moderation.images.decode import DecodeLimits
from moderation.images.errors import BadInput, ContentMismatch, IntakeError, TransientFault
from moderation.images.fetch import fetch
from moderation.images.hashing import sha256
from moderation.images.signals import extract_signals
from moderation.images.uri_policy import UriPolicy
from moderation.screening import service

logger = logging.getLogger(__name__)

Sessions = Callable[[], AbstractContextManager[Session]]


class InternalFault(TransientFault):
    """Something unexpected (a bug, the model) failed; retried like a transient fault."""

    code = "internal_error"


class Screener:
    def __init__(
        self,
        settings: Settings,
        sessions: Sessions,
        embedder: ClipEmbedder,
        *,
        worker_name: str | None = None,
    ) -> None:
        """`worker_name`: this process's row in `workers`, recorded as each claim's holder."""
        self.settings = settings
        self.embedder = embedder
        self._sessions = sessions
        self._limits = DecodeLimits.from_settings(settings)
        self._uri_policy = UriPolicy.from_settings(settings)
        self._decode_memory = MemoryBudget(settings.decode_memory_mb * 2**20)
        with sessions() as session:
            self.model_id = get_or_create_model(session, embedder.name, embedder.dim).id
        self.matcher = BankMatcher(
            sessions,
            model_id=self.model_id,
            dim=embedder.dim,
            settings=MatchSettings(
                default_radius=settings.match_radius,
                pdq_threshold=settings.pdq_threshold,
                pdq_min_quality=settings.pdq_min_quality,
            ),
            refresh_s=settings.bank_refresh_s,
            device=settings.resolved_device(),
        )
        self._claim: GroupCommit[int, service.Claim | None] = GroupCommit(
            sessions,
            lambda session, ids: service.claim_many(
                session, ids, max_attempts=settings.max_attempts, worker=worker_name
            ),
            name="claim-writer",
        )
        self._record: GroupCommit[service.Screened, bool] = GroupCommit(
            sessions,
            lambda session, results: service.record_screened(session, results, self.model_id),
            name="result-writer",
        )
        # Many uploads' images per forward pass, and their vectors searched together.
        self.embedding: Batcher[np.ndarray, np.ndarray] = Batcher(
            lambda pixels: list(embedder.embed(np.stack(pixels))),
            name="embedding",
            max_batch=settings.resolved_batch_size(),
            max_wait_s=settings.batch_wait_ms / 1000,
            streams=settings.resolved_streams(),
        )
        self.clip_search: Batcher[np.ndarray, list[ClipHit]] = Batcher(
            lambda vectors: self.matcher.current().search_clip(np.stack(vectors)),
            name="clip-search",
            max_batch=4 * settings.resolved_batch_size(),
            # A forward pass releases its images together, but their threads wake one by
            # one: a moment's wait lets a whole batch's vectors be searched in one pass.
            max_wait_s=settings.batch_wait_ms / 1000,
        )

    def close(self) -> None:
        stages = (self.embedding, self.clip_search, self._claim, self._record)
        for stage in stages:
            stage.close()
        for stage in stages:
            logger.info(
                "%s: %d items in %d batches (mean %.1f)",
                stage.name,
                stage.stats.items,
                stage.stats.batches,
                stage.stats.mean_batch,
            )

    def run(self, upload_id: int) -> None:
        """Screen one upload end to end.

        Bad input is recorded as a final failure here. Transient faults are raised for the
        task to retry (see `defer`); database errors propagate untouched, since nothing can
        be recorded while the database is unreachable.
        """
        claim = self._claim(upload_id)
        if claim is None:
            logger.info("upload %d is already final; nothing to do", upload_id)
            return
        try:
            data = fetch(
                claim.uri,
                policy=self._uri_policy,
                max_bytes=self.settings.max_bytes,
                timeout_s=self.settings.fetch_timeout_s,
            )
            _check_declared_bytes(data, claim.declared_sha256)
            signals = extract_signals(
                data, self._limits, self.embedder.preprocess, self._decode_memory
            )
            vectors = np.stack(self.embedding.submit(signals.embedding_inputs()))
            clip_hits = self.clip_search.submit(list(vectors))
            matches = self.matcher.current().match_searched(signals, clip_hits)
        except BadInput as error:
            logger.info("upload %d refused: %s", upload_id, error)
            with self._sessions() as session:
                service.record_failed(session, upload_id, error.code, error.message)
            return
        except (IntakeError, DBAPIError):
            raise
        except Exception as exc:
            logger.exception("screening upload %d failed unexpectedly", upload_id)
            raise InternalFault(f"{type(exc).__name__}: {exc}") from exc
        if self._record(service.Screened(upload_id, signals, vectors, matches)):
            logger.info("upload %d screened: %d hit(s)", upload_id, len(matches))
        else:
            logger.info("upload %d was screened by another delivery meanwhile", upload_id)

    def defer(self, upload_id: int, fault: TransientFault) -> float | None:
        """Record a transient fault: seconds until the retry, or None if it is now final."""
        with self._sessions() as session:
            attempts = service.record_transient_fault(
                session,
                upload_id,
                fault.code,
                fault.message,
                max_attempts=self.settings.max_attempts,
            )
        if attempts is None:
            logger.warning("upload %d failed for good: %s", upload_id, fault)
            return None
        delay = min(
            self.settings.retry_backoff_max_s, self.settings.retry_backoff_s * 2.0 ** (attempts - 1)
        )
        logger.info("upload %d: %s; retry %d in %.1f s", upload_id, fault, attempts, delay)
        return delay


def _check_declared_bytes(data: bytes, declared_sha256: bytes | None) -> None:
    """Refuse bytes other than those submitted (the file was replaced after submission)
    before paying for their decode."""
    if declared_sha256 is not None and sha256(data) != declared_sha256:
        raise ContentMismatch(
            f"the bytes at the URI are not the ones submitted: SHA-256 {sha256(data).hex()}, "
            f"declared {declared_sha256.hex()}"
        )
