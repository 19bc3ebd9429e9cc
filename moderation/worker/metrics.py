"""The worker's Prometheus metrics, served on MODERATION_WORKER_METRICS_PORT when it is set.

Served from the worker process itself (a thread of prometheus_client's), so they describe
the process that screens: its model, and the bank entries that model cannot see.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from prometheus_client import REGISTRY, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from moderation.banks.service import unmatchable_clip_entries
from moderation.errors import Unavailable
from moderation.runtime import Runtime

logger = logging.getLogger(__name__)

UNMATCHABLE_CLIP_ENTRIES = Gauge(
    "moderation_unmatchable_clip_entries",
    "CLIP bank entries embedded only by other models than this worker's, so never matched "
    "on CLIP by it (their hashes still are), per bank; counted at worker start",
    ["bank", "model"],
)


class IndexRecall(Collector):
    """The latest `moderation index eval` of each model's search index, read from the
    runtime's database at each scrape: recall falling as the corpus grows shows on a
    dashboard."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        recall = GaugeMetricFamily(
            "moderation_index_recall",
            "recall@k of the similarity index against exact search, as last measured by "
            "`moderation index eval`",
            labels=["model", "index_kind", "k"],
        )
        size = GaugeMetricFamily(
            "moderation_index_evaluated_vectors",
            "vectors in the similarity index when its recall was last measured",
            labels=["model"],
        )
        return recall, size

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # Imported here: the command line imports this module, and needs no Faiss to start.
        from moderation.search.service import latest_evaluations

        recall, size = self._families()
        try:
            with self._runtime.session() as session:
                for model, evaluation in latest_evaluations(session):
                    labels = [model, evaluation.index_kind, str(evaluation.k)]
                    recall.add_metric(labels, evaluation.recall)
                    size.add_metric([model], evaluation.corpus_size)
        except SQLAlchemyError as error:
            logger.warning("cannot read the index evaluations for metrics: %s", error)
        yield recall
        yield size


_served: set[int] = set()
_lock = threading.Lock()


def on_worker_start(runtime: Runtime, model: str) -> None:
    """What a worker reports once its model is loaded: a warning for each bank whose CLIP
    entries its model cannot match, the same as a gauge, and the metrics served, the
    index recall read from the runtime's database."""
    try:
        report_unmatchable_clip_entries(runtime, model)
    except Exception:
        # Never a reason not to screen: hashes and the other entries still match.
        logger.exception("could not count the CLIP entries model %s cannot match", model)
    if runtime.settings.worker_metrics_port is not None:
        serve(runtime.settings.worker_metrics_port, IndexRecall(runtime))


def report_unmatchable_clip_entries(runtime: Runtime, model: str) -> dict[str, int]:
    with runtime.session() as session:
        unmatchable = unmatchable_clip_entries(session, model)
    UNMATCHABLE_CLIP_ENTRIES.clear()
    for bank, count in unmatchable.items():
        UNMATCHABLE_CLIP_ENTRIES.labels(bank=bank, model=model).set(count)
        logger.warning(
            "bank %s has %d CLIP entr%s embedded only by other models than %s: this worker "
            "cannot match them on CLIP (hashes still match); see `moderation bank list`",
            bank,
            count,
            "y" if count == 1 else "ies",
            model,
        )
    return unmatchable


class MetricsPortInUse(Unavailable):
    code = "metrics_port_in_use"

    def __init__(self, port: int, reason: str) -> None:
        super().__init__(
            f"cannot serve metrics on port {port} ({reason}); give each worker on a host its "
            "own MODERATION_WORKER_METRICS_PORT, or leave it unset"
        )


def serve(port: int, *collectors: Collector) -> None:
    """Serve /metrics on `port`, once per process, with `collectors` added to the
    process's registry. A port that cannot be had stops the worker at start, as any other
    misconfiguration does, rather than leave it unwatched."""
    with _lock:
        if port in _served:
            return
        try:
            start_http_server(port, registry=REGISTRY)
        except OSError as error:
            raise MetricsPortInUse(port, error.strerror or str(error)) from None
        for collector in collectors:
            REGISTRY.register(collector)
        _served.add(port)
    logger.info("metrics on http://0.0.0.0:%d/metrics", port)
