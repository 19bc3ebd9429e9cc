"""Screening one upload: claim, intake, embed, search, match, record.

Follow one upload from its message to its commit:

    Celery worker process (one per machine, or per GPU)
    │
    ├─ Celery consumer thread ── message "screen uploads 42…57" ──▶ a Celery task thread
    │
    ├─ Celery task thread: Screener.run_many([42, …, 57])
    │    1. claim   ─▶ claim-writer thread      one transaction claims many uploads
    │    then each upload goes to a screening thread; the task waits for them all
    │
    ├─ screening thread (of `concurrency` + `worker_fetches`): Screener.process(42)
    │    2. fetch      (this thread)            http(s) bytes, under a fetch slot and one
    │                                           for the host (`intake/fetches.py`)
    │       intake  ─▶ intake process (pipe)    (file:// read), SHA-256, decode, PDQ, one crop per
    │               ◀── its reader thread       model computed; the crops are written into
    │                                           a shared-memory slot held by this upload
    │    3. embed   ─▶ embedding stream thread  one forward pass over many uploads' crops;
    │                  │ (per model: `lanes`)   it hands their vectors on, together, to the
    │    4. search     └▶ clip-search thread    one bank search for many vectors, which
    │               ◀──── one wait for 3 and 4  wakes this thread with its vectors and hits
    │                     (for every model)
    │                  (slot released: the crop was copied into the forward pass's batch)
    │    5. match      (this thread)            SHA-256 and PDQ against the bank
    │    6. record  ─▶ result-writer thread     one transaction records many uploads
    │    then, every upload of the message recorded (or its retry sent), Celery
    │    acknowledges the message (acks_late): only after step 6 committed
    │
    └─ intake processes (`intake_processes`, one BLAS thread each), started by a forkserver;
       each works on one job and holds the next in its pipe, so it never waits for this
       interpreter; one that dies or hangs costs only the upload it was working on (a job
       it had not taken from its pipe goes to another process). The pool and its reader
       threads: `intake/pool.py`; inside a process: `intake/process.py`

A thread waits at every arrow; each wait has a limit (`stage_timeout_s`, and
`intake_timeout_s` for intake) past which it gives up with a retried fault
(`StageTimeout`, `IntakeStalled`; a log line names the stage), so a stall never becomes a
hang. A write that timed out may still commit: every write is idempotent (status guard,
`ON CONFLICT DO NOTHING`). No database connection is held while an image is fetched,
decoded or embedded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta

import numpy as np
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from moderation.banks.matcher import ClipHit, Match, merge_model_matches
from moderation.config import Settings
from moderation.embedding.embedder import Embedder
from moderation.evidence import service as evidence
from moderation.evidence.storage import StoreUnavailable
from moderation.evidence.vault import Vault
from moderation.images.errors import BadInput, IntakeError, TransientFault
from moderation.images.signals import ImageSignals
from moderation.images.uri_policy import FILE_REFUSED, PREFIX_REFUSED
from moderation.screening import service
from moderation.worker.batching import BatchTimeout
from moderation.worker.group_commit import GroupCommit
from moderation.worker.intake.fetches import WorkerFetches
from moderation.worker.intake.full_resolution import FullResolutionPdq
from moderation.worker.intake.jobs import IntakeTimes
from moderation.worker.intake.pool import build_intake
from moderation.worker.intake.stage import Intake
from moderation.worker.lanes import (
    Lineup,
    ModelLane,
    RegistryFollower,
    Searched,
    Sessions,
    registered_id,
)
from moderation.worker.results import record_results

logger = logging.getLogger(__name__)


class InternalFault(TransientFault):
    """Something unexpected (a bug, the model) failed; retried like a transient fault."""

    code = "internal_error"


class StageTimeout(TransientFault):
    """A stage did not answer within its limit: a stalled stage, retried."""

    code = "stage_timeout"


class EvidenceNotSealed(TransientFault):
    """An upload hit, and its evidence could not be sealed into the vault: retried, since
    a hit recorded without the evidence would show reviewers nothing."""

    code = "evidence_not_sealed"


# What the result writer records for one upload: its results and the evidence kept of it.
Recorded = tuple[service.Screened, evidence.Kept | None]


@dataclass
class StageTimes:
    """Wall seconds task threads spent in each stage, summed over uploads (the benchmark
    reads them from the worker's log to say where an upload's time goes)."""

    seconds: dict[str, float] = field(default_factory=dict)
    uploads: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def count_upload(self) -> None:
        with self._lock:
            self.uploads += 1

    def per_upload_ms(self) -> dict[str, float]:
        with self._lock:
            count = max(1, self.uploads)
            return {stage: round(total * 1000 / count, 2) for stage, total in self.seconds.items()}


class Screener:
    def __init__(
        self,
        settings: Settings,
        sessions: Sessions,
        embedders: Embedder | Sequence[Embedder],
        *,
        worker_name: str | None = None,
        slots: int | None = None,
    ) -> None:
        """`embedders`: the models to compute, the active one first (a worker passes the
        registry's and then follows it: `follow_registry`). `worker_name`: this process's
        row in `workers`, recorded as each claim's holder. `slots`: uploads in intake or
        embedding at once (the task threads; default: the configured concurrency)."""
        self.settings = settings
        self.worker_name = worker_name
        self.times = StageTimes()
        self._sessions = sessions
        self._timeout_s = settings.stage_timeout_s
        models: list[Embedder] = (
            list(embedders) if isinstance(embedders, list | tuple) else [embedders]  # type: ignore[list-item]
        )
        lanes = []
        for embedder in models:
            with sessions() as session:
                model_id = registered_id(session, embedder)
            lanes.append(ModelLane(settings, sessions, embedder, model_id))
        # Replaced whole by the registry follower; read once per upload.
        self.lineup = Lineup(tuple(lanes))
        self._follower: RegistryFollower | None = None
        # Uploads being screened at once (each waits on a stage most of the time), each
        # with a crop slot of its own while it is in intake or embedding.
        at_once = slots or settings.resolved_concurrency()
        self.intake: Intake = build_intake(settings, slots=at_once)
        self._full_resolution_pdq = FullResolutionPdq(settings)
        # http(s) fetches, on the screening threads before intake (`intake/fetches.py`):
        # threads for as many uploads in fetch beyond those the CPU stages hold.
        self.fetches = WorkerFetches(settings)
        self._threads = ThreadPoolExecutor(
            at_once + settings.worker_fetches, thread_name_prefix="screening"
        )
        self._claims: GroupCommit[int, service.Claim | None] = GroupCommit(
            sessions, self._write_claims, name="claim-writer"
        )
        # Evidence of uploads that hit; None: no key is configured, and nothing is kept.
        self.vault = Vault.from_settings(settings)
        self._results: GroupCommit[Recorded, bool] = GroupCommit(
            sessions, self._write_results, name="result-writer"
        )

    @property
    def embedder(self) -> Embedder:
        """The active model's embedder."""
        return self.lineup.primary.embedder

    def follow_registry(self, open_model: Callable[[str], Embedder]) -> None:
        """Follow the model registry from now on (see `moderation.worker.lanes`)."""

        def set_lineup(lineup: Lineup) -> None:
            self.lineup = lineup

        self._follower = RegistryFollower(
            self.settings, self._sessions, lambda: self.lineup, set_lineup, open_model
        ).start()

    # The stages' batch functions, run on the stages' own threads.

    def _write_claims(
        self, session: Session, upload_ids: Sequence[int]
    ) -> list[service.Claim | None]:
        return service.claim_many(
            session, upload_ids, max_attempts=self.settings.max_attempts, worker=self.worker_name
        )

    def _write_results(self, session: Session, results: Sequence[Recorded]) -> list[bool]:
        kept = [k for _, k in results if k is not None]
        retention = self.vault.retention if self.vault is not None else timedelta(0)
        return record_results(session, self.settings, [r for r, _ in results], kept, retention)

    # One upload, on a task thread.

    def run_many(self, upload_ids: Sequence[int]) -> dict[int, float]:
        """Screen a message's uploads: claim them together, then screen each on a thread
        of the screener's own. Returns the retries due, as seconds until each by upload.
        Raises a database error once every upload has had its chance (the task retries
        the message then: uploads already final are skipped)."""
        unique = list(dict.fromkeys(upload_ids))
        if not unique:
            return {}
        try:
            with self._stage("claim", unique[0]):
                claims = self._claims.many(unique, self._timeout_s)
        except StageTimeout:
            # The claims may still commit (claiming again is harmless): each upload is
            # sent again after the first backoff, rather than the message failing.
            return dict.fromkeys(unique, self.settings.retry_backoff_s)
        outcomes = {
            upload_id: self._threads.submit(self._settle, upload_id, claim)
            for upload_id, claim in zip(unique, claims, strict=True)
        }
        # Woken once, when the last is done: waiting on each in turn woke this thread as
        # each upload finished, a hand-off of the GIL per upload.
        wait(outcomes.values())
        retries: dict[int, float] = {}
        database_error: DBAPIError | None = None
        for upload_id, outcome in outcomes.items():
            try:
                delay = outcome.result()
            except DBAPIError as error:
                database_error = database_error or error
                continue
            if delay is not None:
                retries[upload_id] = delay
        if database_error is not None:
            raise database_error
        return retries

    def _settle(self, upload_id: int, claim: service.Claim | Exception | None) -> float | None:
        """Screen one claimed upload; seconds until its retry if a transient fault needs
        one, else None."""
        try:
            if isinstance(claim, Exception):
                raise claim
            self.process(upload_id, claim)
        except service.UploadNotFound:
            logger.error("upload %d does not exist; dropping it", upload_id)
        except TransientFault as fault:
            return self.defer(upload_id, fault)
        return None

    def run(self, upload_id: int) -> None:
        """Screen one upload end to end, on the calling thread (see `process`)."""
        self.process(upload_id, self.claim(upload_id))

    def process(self, upload_id: int, claim: service.Claim | None) -> None:
        """Screen a claimed upload (None: nothing left to do) and record the outcome.

        Bad input is recorded as a final failure here. Transient faults (a stage's timeout
        included) are raised for the task to retry (see `defer`); database errors propagate
        untouched, since nothing can be recorded while the database is unreachable.
        """
        if claim is None:
            logger.info("upload %d is already final; nothing to do", upload_id)
            return
        try:
            signals, vectors, matches = self.screen(upload_id, claim)
        except BadInput as error:
            message = self._told(error)
            logger.info("upload %d refused: %s: %s", upload_id, error.code, message)
            with self._sessions() as session:
                service.record_failed(session, upload_id, error.code, message)
            return
        except (IntakeError, DBAPIError):
            raise
        except Exception as exc:
            logger.exception("screening upload %d failed unexpectedly", upload_id)
            raise InternalFault(f"{type(exc).__name__}: {exc}") from exc
        kept = self.keep_evidence(upload_id, claim, signals, matches)
        if self.record(service.Screened(upload_id, signals, vectors, matches), kept):
            logger.info("upload %d screened: %d hit(s)", upload_id, len(matches))
        else:
            logger.info("upload %d was screened by another delivery meanwhile", upload_id)
        self.times.count_upload()

    def _told(self, error: BadInput) -> str:
        """The stored message of a refusal: a refusal by the URI prefixes names this
        worker's, which need not be those of the producer that accepted the URI."""
        if error.message in (FILE_REFUSED, PREFIX_REFUSED):
            prefixes = ", ".join(self.settings.allowed_uri_prefixes) or "none"
            return f"{error.message} (this worker's: {prefixes})"
        return error.message

    def claim(self, upload_id: int) -> service.Claim | None:
        with self._stage("claim", upload_id):
            return self._claims(upload_id, self._timeout_s)

    def screen(
        self, upload_id: int, claim: service.Claim
    ) -> tuple[ImageSignals, dict[int, np.ndarray], list[Match]]:
        """Intake, embed, search and match a claimed upload under every model of the
        lineup; writes nothing. Returns the vectors by model id."""
        lineup = self.lineup  # one lineup from intake to record
        # The fetched bytes count against the worker's body budget until screened.
        with ExitStack() as held:
            with self._stage("fetch", upload_id):
                # Before a crop slot or an intake process is taken: a slow server holds only
                # this thread and its fetch slots.
                fetched = held.enter_context(self.fetches.fetched(claim.uri, claim.submitted_by))
            return self._screen_fetched(upload_id, claim, lineup, fetched)

    def _screen_fetched(
        self, upload_id: int, claim: service.Claim, lineup: Lineup, fetched: bytes | None
    ) -> tuple[ImageSignals, dict[int, np.ndarray], list[Match]]:
        started = time.perf_counter()
        with self.intake.screened(
            claim.uri, claim.declared_sha256, lineup.preprocessings, fetched
        ) as (signals, times):
            self._add_intake_times(times, time.perf_counter() - started)
            embedded = self.embed(upload_id, signals, lineup)
        with self._stage("match", upload_id):
            per_model = [
                lane.matcher.current().match_searched(
                    signals, embedded[lane.model_id][1], model_id=lane.model_id
                )
                for lane in lineup.lanes
            ]
            matches = merge_model_matches(per_model)
            # PDQ is the same under every model: the active lane's index says whether the
            # reduced-scale hash fell near an entry (see `FullResolutionPdq`).
            active = lineup.lanes[0].matcher.current()
            near_miss = active.pdq_near_miss(signals, self.settings.pdq_full_resolution_margin)
        if near_miss:
            with self._stage("full_resolution_pdq", upload_id):
                full = self._full_resolution_pdq(claim.uri, claim.declared_sha256, fetched)
            signals = replace(signals, pdq_full_resolution=full)
            with self._stage("match", upload_id):
                per_model = [
                    lane.matcher.current().match_searched(
                        signals, embedded[lane.model_id][1], model_id=lane.model_id
                    )
                    for lane in lineup.lanes
                ]
                matches = merge_model_matches(per_model)
        return signals, {model: vectors for model, (vectors, _) in embedded.items()}, matches

    def embed(
        self, upload_id: int, signals: ImageSignals, lineup: Lineup
    ) -> dict[int, tuple[np.ndarray, list[list[ClipHit]]]]:
        """The vectors of the upload's embedded frames under each model, and each one's
        CLIP hits: every model's forward pass and search at once, waited for together."""
        with self._stage("embed+search", upload_id):
            deadline = time.monotonic() + self._timeout_s
            pending = [
                (lane, lane.embed_and_search.submit_async(signals.embedding_inputs(position)))
                for position, lane in enumerate(lineup.lanes)
            ]
            embedded = {}
            for lane, waiting in pending:
                searched: list[Searched] = waiting.result(max(0.0, deadline - time.monotonic()))
                embedded[lane.model_id] = (
                    np.stack([vector for vector, _ in searched]),
                    [hits for _, hits in searched],
                )
        return embedded

    def keep_evidence(
        self, upload_id: int, claim: service.Claim, signals: ImageSignals, matches: list[Match]
    ) -> evidence.Kept | None:
        """Seal what screening saw of an upload that hit into the vault, before its hits
        are recorded: a reviewer sees these frames, never a later fetch of the URI."""
        if not matches or self.vault is None:
            return None
        report = evidence.screening_report(
            upload_id, claim.uri, signals, matches, worker=self.worker_name
        )
        with self._stage("evidence", upload_id):
            try:
                return evidence.keep_screened(self.vault, upload_id, signals, report)
            except StoreUnavailable as error:
                raise EvidenceNotSealed(error.message) from error

    def record(self, screened: service.Screened, kept: evidence.Kept | None = None) -> bool:
        with self._stage("record", screened.upload_id):
            return self._results((screened, kept), self._timeout_s)

    @contextmanager
    def _stage(self, stage: str, upload_id: int) -> Iterator[None]:
        """Time a stage, and turn its timeout into a retried fault with a log line."""
        started = time.perf_counter()
        try:
            yield
        except BatchTimeout as timeout:
            logger.error("upload %d: stage %s stalled: %s", upload_id, stage, timeout)
            raise StageTimeout(f"{stage} gave no answer within {self._timeout_s:g} s") from None
        finally:
            self.times.add(stage, time.perf_counter() - started)

    def _add_intake_times(self, times: IntakeTimes, waited: float) -> None:
        self.times.add("intake", waited)
        self.times.add("intake.fetch", times.fetch)
        self.times.add("intake.decode_hash_preprocess", times.decode_hash_preprocess)

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

    def close(self) -> None:
        """Finish what the stages hold, stop the intake processes, and log the stages'
        batching and where an upload's time went."""
        if self._follower is not None:
            self._follower.stop()
        self._threads.shutdown(wait=True)
        model_stages = [stage for lane in self.lineup.lanes for stage in lane.stages()]
        stages = (*model_stages, self._claims, self._results)
        for stage in stages:
            stage.close()
        self.intake.close()
        for stage in stages:
            logger.info(
                "%s: %d items in %d batches (mean %.1f), busy %.0f%%",
                stage.name,
                stage.stats.items,
                stage.stats.batches,
                stage.stats.mean_batch,
                100 * stage.stats.utilisation,
            )
        logger.info("stage ms per upload: %s", self.times.per_upload_ms())
