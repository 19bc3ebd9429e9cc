"""`/readyz` and `/metrics`: what they read from the real PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, update

from moderation.auth.models import Role
from moderation.banks import service as banks
from moderation.images.signals import SignalType
from moderation.review.models import Hit, ReviewStatus
from moderation.runtime import Runtime
from moderation.screening import service as screening
from moderation.screening.models import Upload, UploadStatus, Worker
from tests.api_fixtures import announced, api, api_on, bearer, keys
from tests.conftest import TEST_RUNTIME
from tests.health_fixtures import live_worker
from tests.images import encode, textured, write
from tests.queues import queue, queue_runtime

__all__ = ["api", "keys", "live_worker", "queue", "queue_runtime"]


def test_ready_with_postgresql_redis_and_a_live_worker(api: TestClient, live_worker: str) -> None:
    response = api.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ready",
        "checks": {"postgresql": "ok", "redis": "ok", "workers": "ok"},
    }


def test_not_ready_without_a_live_worker(
    clean_db: None, live_worker: str, make_runtime: Callable[..., Runtime]
) -> None:
    with TEST_RUNTIME.session() as session:
        session.execute(
            update(Worker)
            .where(Worker.name == live_worker)
            .values(heartbeat_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 10))
        )
    # Every worker of this test run, the shared end-to-end one too, counts as silent.
    with api_on(make_runtime(worker_dead_after_s=0.000001)) as api:
        response = api.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert (checks["postgresql"], checks["redis"]) == ("ok", "ok")
    assert "no worker has sent a heartbeat" in checks["workers"]


def test_not_ready_without_redis(
    clean_db: None, live_worker: str, make_runtime: Callable[..., Runtime]
) -> None:
    with api_on(make_runtime(redis_url="redis://127.0.0.1:1/0")) as api:
        response = api.get("/readyz")
        scraped = _scrape(api)
    assert response.status_code == 503
    assert response.json()["checks"]["redis"].startswith("unreachable")
    # Metrics still answer, saying which source could not be read.
    assert scraped[("moderation_metrics_source_up", (("source", "redis"),))] == 0
    assert scraped[("moderation_metrics_source_up", (("source", "postgresql"),))] == 1


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(api: TestClient) -> Samples:
    response = api.get("/metrics")  # public: no key
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_read_the_database_and_the_queue(
    api: TestClient, keys: dict[Role, str], tmp_path: Path, queue: str
) -> None:
    with TEST_RUNTIME.session() as session:
        bank = banks.create_bank(session, "metrics")
        (entry,) = banks.add_entries(
            session, bank, [banks.NewEntry(sha256=b"\x01" * 32)], added_by="test"
        )
        ids = screening.submit_many(session, [f"file:///m/{i}.jpg" for i in range(5)])
        # Two screened (after 0.3 s and 20 s), one failed, one processing, one queued.
        for upload_id, seconds in zip(ids[:2], (0.3, 20), strict=True):
            session.execute(
                update(Upload)
                .where(Upload.id == upload_id)
                .values(
                    status=UploadStatus.SCREENED,
                    finished_at=Upload.created_at + func.make_interval(0, 0, 0, 0, 0, 0, seconds),
                )
            )
        screening.record_failed(session, ids[2], "truncated_image", "cut short")
        session.execute(
            update(Upload).where(Upload.id == ids[3]).values(status=UploadStatus.PROCESSING)
        )
        session.add_all(
            [
                Hit(
                    upload_id=ids[0],
                    bank_entry_id=entry.id,
                    signal=SignalType.SHA256,
                    distance=0,
                ),
                Hit(
                    upload_id=ids[1],
                    bank_entry_id=entry.id,
                    signal=SignalType.PDQ,
                    distance=3,
                    review_status=ReviewStatus.DISMISSED,
                    reviewed_at=func.now(),
                ),
            ]
        )
    image = write(tmp_path / "a.jpg", encode(textured(1))).resolve().as_uri()
    batch = {"uploads": [{"uri": image}] * 3}
    assert (
        api.post("/v1/uploads", json=batch, headers=bearer(keys[Role.SUBMITTER])).status_code == 202
    )
    announced(api)  # the answer comes once the rows commit; the message follows from a thread

    scraped = _scrape(api)
    status = "status"
    assert scraped[("moderation_uploads_in_progress", ((status, "queued"),))] == 1 + 3
    assert scraped[("moderation_uploads_in_progress", ((status, "processing"),))] == 1
    assert scraped[("moderation_uploads_finished_recently", ((status, "screened"),))] == 2
    assert scraped[("moderation_uploads_finished_recently", ((status, "failed"),))] == 1
    assert scraped[("moderation_upload_failures_recently", (("code", "truncated_image"),))] == 1
    latency = "moderation_screening_latency_seconds_bucket"
    assert scraped[(latency, (("le", "0.25"),))] == 0
    assert scraped[(latency, (("le", "0.5"),))] == 1
    assert scraped[(latency, (("le", "10.0"),))] == 1
    assert scraped[(latency, (("le", "30.0"),))] == 2
    assert scraped[(latency, (("le", "+Inf"),))] == 2
    assert scraped[("moderation_screening_latency_seconds_gsum", ())] == pytest.approx(20.3)
    assert scraped[("moderation_hits_recently", (("signal", "sha256"),))] == 1
    assert scraped[("moderation_hits_recently", (("signal", "pdq"),))] == 1
    assert scraped[("moderation_hits_pending_review", ())] == 1
    decisions = "moderation_review_decisions_recently"
    assert scraped[(decisions, (("outcome", "dismissed"),))] == 1
    assert scraped[(decisions, (("outcome", "confirmed"),))] == 0
    # The three uploads sent together share a message.
    assert scraped[("moderation_queue_messages", (("queue", queue),))] == 1
    assert scraped[("moderation_upload_batch_size_bucket", (("le", "5.0"),))] >= 1
