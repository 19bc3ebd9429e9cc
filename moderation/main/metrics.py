"""`/metrics`: Prometheus metrics of the service as a whole, read at scrape time.

PostgreSQL holds the truth (uploads, hits, decisions), so the API reads it when scraped
rather than counting in one process of many. Each scrape is a handful of bounded queries,
each on an index: uploads waiting or in progress (the backlog), and what finished,
failed, hit or was decided within the last `WINDOW` (by `updated_at`, `created_at` and
`reviewed_at`), never a count over whole tables; plus the length of the broker queue in
Redis. Counts over the window are gauges: `rate()` does not apply, read them as they are.

Submission batch sizes are observed in this process as requests arrive (a histogram per
API process; with `--workers` above 1 each scrape sees the process that answered it).
Names share the `moderation_` prefix with the worker's own metrics (`moderation.worker.metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

import redis
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Float, cast, func, select, text
from sqlalchemy.orm import Session

from moderation.evaluation import service as evaluation
from moderation.http.access import app_runtime, public
from moderation.http.metrics import REGISTRY
from moderation.lifecycle import reembed
from moderation.lifecycle.service import list_models
from moderation.main.health import CHECK_REDIS, CHECK_TIMEOUT_S
from moderation.review.models import Hit, ReviewStatus
from moderation.runtime import Runtime
from moderation.screening.models import Upload, UploadStatus

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

WINDOW = timedelta(hours=1)
# Seconds from acceptance to verdict: most uploads take well under a second on a worker
# that keeps up; the long tail is retries with backoff.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def _window() -> object:
    return func.now() - func.make_interval(0, 0, 0, 0, 0, 0, WINDOW.total_seconds())


class ServiceCollector(Collector):
    """Reads an application's PostgreSQL and Redis at a scrape. A source that is down is
    reported as `moderation_metrics_source_up 0` and its metrics left out, never a failed
    scrape."""

    def __init__(self, runtime: Runtime, redis_client: redis.Redis) -> None:
        self.runtime = runtime
        self.redis_client = redis_client

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "moderation_metrics_source_up",
            "Whether this scrape could read the source (1) or not (0)",
            labels=["source"],
        )
        try:
            with self.runtime.session() as session:
                session.execute(
                    text(f"SET LOCAL statement_timeout = {int(CHECK_TIMEOUT_S * 1000)}")
                )
                families = list(_database_metrics(session))
            yield from families
            up.add_metric(["postgresql"], 1)
        except Exception:
            logger.warning("metrics: PostgreSQL could not be read", exc_info=True)
            up.add_metric(["postgresql"], 0)
        try:
            yield _queue_depth(self.runtime.settings.queue, self.redis_client)
            up.add_metric(["redis"], 1)
        except Exception:
            logger.warning("metrics: Redis could not be read", exc_info=True)
            up.add_metric(["redis"], 0)
        yield up


def _model_metrics(session: Session) -> Iterable[Metric]:
    """The registry's states, and the progress of unfinished re-embedding jobs."""
    state = GaugeMetricFamily(
        "moderation_model_state",
        "1 for each registered embedding model's state (candidate, active, retired)",
        labels=["model", "state"],
    )
    for model in list_models(session):
        state.add_metric([model.name, model.state], 1)
    yield state
    labels = ["job", "model"]
    done = GaugeMetricFamily(
        "moderation_reembed_done", "Items a re-embedding job has handled", labels=labels
    )
    total = GaugeMetricFamily(
        "moderation_reembed_total", "Items a re-embedding job covers", labels=labels
    )
    rate = GaugeMetricFamily(
        "moderation_reembed_rate", "Items handled per second since the job started", labels=labels
    )
    eta = GaugeMetricFamily(
        "moderation_reembed_eta_seconds", "Seconds left at the job's rate so far", labels=labels
    )
    failures = GaugeMetricFamily(
        "moderation_reembed_failures",
        "Items a re-embedding job could not embed, by reason",
        labels=[*labels, "reason"],
    )
    for job in reembed.list_jobs(session, unfinished=True):
        key = [str(job.id), job.model]
        done.add_metric(key, job.done)
        if job.total is not None:
            total.add_metric(key, job.total)
        if job.rate_per_s is not None:
            rate.add_metric(key, job.rate_per_s)
        if job.eta_s is not None:
            eta.add_metric(key, job.eta_s)
        for reason, count in job.failures.items():
            failures.add_metric([*key, reason], count)
    yield from (done, total, rate, eta, failures)


def _evaluation_metrics(session: Session) -> Iterable[Metric]:
    """The newest golden-set run of each model and reranker: its figures per modality, and
    whether its recall fell beyond the margin from the run before (what an alert watches)."""
    labels = ["model", "reranker"]
    families = {
        measure: GaugeMetricFamily(
            f"moderation_eval_{measure}",
            f"{title} on the golden set, of the newest run, per query modality",
            labels=[*labels, "modality", "k"],
        )
        for measure, title in (
            ("recall", "Mean recall@k"),
            ("precision", "Mean precision@k"),
            ("mrr", "Mean reciprocal rank within the top k"),
        )
    }
    regressed = GaugeMetricFamily(
        "moderation_eval_regressed",
        "1 when the newest golden-set run's recall fell beyond the margin "
        "(MODERATION_EVAL_DROP_MARGIN) from the run before it, in a modality",
        labels=labels,
    )
    corpus = GaugeMetricFamily(
        "moderation_eval_corpus_size",
        "Vectors searched by the newest golden-set run",
        labels=labels,
    )
    finished = GaugeMetricFamily(
        "moderation_eval_run_timestamp_seconds",
        "When the newest golden-set run was recorded (Unix time)",
        labels=labels,
    )
    for run in evaluation.latest_runs(session):
        key = [run.model, run.reranker]
        for modality, figures in run.figures.items():
            if figures["queries"]:
                for measure, family in families.items():
                    family.add_metric([*key, modality, str(run.k)], figures[measure])
        regressed.add_metric(key, 1 if run.regressed else 0)
        corpus.add_metric(key, run.corpus_size)
        finished.add_metric(key, run.created_at.timestamp())
    yield from (*families.values(), regressed, corpus, finished)


def _search_sync_metrics(session: Session) -> Iterable[Metric]:
    """How far each Milvus collection's sync is behind PostgreSQL (none on Faiss)."""
    from moderation.search.milvus_sync import lags

    rows = GaugeMetricFamily(
        "moderation_search_sync_lag_rows",
        "Embeddings of the model above the Milvus collection's recorded checkpoint",
        labels=["model", "collection"],
    )
    seconds = GaugeMetricFamily(
        "moderation_search_sync_lag_seconds",
        "Seconds since the start of the sync's last completed pass: everything committed "
        "before then is searchable in Milvus",
        labels=["model", "collection"],
    )
    for lag in lags(session):
        rows.add_metric([lag.model, lag.collection], lag.rows)
        if lag.seconds is not None:
            seconds.add_metric([lag.model, lag.collection], lag.seconds)
    yield from (rows, seconds)


def _database_metrics(session: Session) -> Iterable[Metric]:
    yield from _model_metrics(session)
    yield from _evaluation_metrics(session)
    yield from _search_sync_metrics(session)
    since = _window()
    window = f"{WINDOW.total_seconds():g} s"

    backlog = GaugeMetricFamily(
        "moderation_uploads_in_progress",
        "Uploads queued or being screened now",
        labels=["status"],
    )
    counts = {
        key: n
        for key, n in session.execute(
            select(Upload.status, func.count())
            .where(Upload.status.in_((UploadStatus.QUEUED, UploadStatus.PROCESSING)))
            .group_by(Upload.status)
        )
    }
    for status in (UploadStatus.QUEUED, UploadStatus.PROCESSING):
        backlog.add_metric([status.value], counts.get(status, 0))
    yield backlog

    finished = GaugeMetricFamily(
        "moderation_uploads_finished_recently",
        f"Uploads screened or failed within the last {window}",
        labels=["status"],
    )
    counts = {
        key: n
        for key, n in session.execute(
            select(Upload.status, func.count())
            .where(
                Upload.status.in_((UploadStatus.SCREENED, UploadStatus.FAILED)),
                Upload.updated_at >= since,
            )
            .group_by(Upload.status)
        )
    }
    for status in (UploadStatus.SCREENED, UploadStatus.FAILED):
        finished.add_metric([status.value], counts.get(status, 0))
    yield finished

    failures = GaugeMetricFamily(
        "moderation_upload_failures_recently",
        f"Uploads failed within the last {window}, by error code",
        labels=["code"],
    )
    for code, n in session.execute(
        select(Upload.error_code, func.count())
        .where(Upload.status == UploadStatus.FAILED, Upload.updated_at >= since)
        .group_by(Upload.error_code)
    ):
        failures.add_metric([code or "unknown"], n)
    yield failures

    yield _latency(session, since, window)

    hits = GaugeMetricFamily(
        "moderation_hits_recently",
        f"Hits found within the last {window}, by signal",
        labels=["signal"],
    )
    for signal, n in session.execute(
        select(Hit.signal, func.count()).where(Hit.created_at >= since).group_by(Hit.signal)
    ):
        hits.add_metric([signal.value], n)
    yield hits

    pending = GaugeMetricFamily(
        "moderation_hits_pending_review", "Hits waiting for a reviewer's decision now"
    )
    pending.add_metric(
        [],
        session.scalar(select(func.count()).where(Hit.review_status == ReviewStatus.PENDING)) or 0,
    )
    yield pending

    decisions = GaugeMetricFamily(
        "moderation_review_decisions_recently",
        f"Hits decided within the last {window}, by outcome",
        labels=["outcome"],
    )
    decided = {
        key: n
        for key, n in session.execute(
            select(Hit.review_status, func.count())
            .where(Hit.reviewed_at >= since, Hit.review_status != ReviewStatus.PENDING)
            .group_by(Hit.review_status)
        )
    }
    for outcome in (ReviewStatus.CONFIRMED, ReviewStatus.DISMISSED, ReviewStatus.ESCALATED):
        decisions.add_metric([outcome.value], decided.get(outcome, 0))
    yield decisions


def _latency(session: Session, since: object, window: str) -> Metric:
    """From acceptance (`created_at`) to verdict, of the uploads screened in the window:
    one pass that counts each bucket in SQL, so no row leaves the database."""
    seconds = cast(func.extract("epoch", Upload.finished_at - Upload.created_at), Float)
    columns = [func.count().filter(seconds <= bound) for bound in LATENCY_BUCKETS]
    row = session.execute(
        select(*columns, func.count(), func.coalesce(func.sum(seconds), 0.0)).where(
            Upload.status == UploadStatus.SCREENED,
            Upload.updated_at >= since,
            Upload.finished_at.is_not(None),
        )
    ).one()
    *cumulative, total, total_seconds = row
    buckets = [(str(bound), n) for bound, n in zip(LATENCY_BUCKETS, cumulative, strict=True)]
    buckets.append(("+Inf", total))
    return GaugeHistogramMetricFamily(
        "moderation_screening_latency_seconds",
        f"Seconds from an upload's acceptance to its verdict, for uploads screened within "
        f"the last {window}",
        buckets=buckets,
        gsum_value=float(total_seconds),
    )


def _queue_depth(queue: str, redis_client: redis.Redis) -> Metric:
    depth = GaugeMetricFamily(
        "moderation_queue_messages",
        "Screening messages waiting on the broker queue (each names up to 16 uploads)",
        labels=["queue"],
    )
    depth.add_metric([queue], redis_client.llen(queue))
    return depth


@router.get("/metrics", openapi_extra=public(), response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format: what this process observed (`REGISTRY`), then the service's
    metrics, read now on the application's runtime."""
    service = CollectorRegistry()
    service.register(ServiceCollector(app_runtime(request), CHECK_REDIS.get(request)))
    return Response(
        generate_latest(REGISTRY) + generate_latest(service), media_type=CONTENT_TYPE_LATEST
    )
