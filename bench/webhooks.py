"""Webhooks: what announcing screening hits costs a worker's group commit, and how fast one
sender delivers, each against a baseline measured in the same run.

    python bench/webhooks.py [--groups 60] [--events 500] [--out webhooks.json]

Hook: groups of 16 uploads, each with two hits, recorded by `record_results` in one
transaction each (as a worker's group commit does), alternately with
MODERATION_WEBHOOK_ON_SCREENING_HIT off (the baseline) and on (one INSERT ... SELECT per
group). Sender: events delivered by one `Sender` to a receiver on 127.0.0.1 that answers
200 at once, against a plain loop POSTing the same bodies to the same receiver with the
same HTTP client (the ceiling: what is left is claiming and recording in PostgreSQL).
Database: MODERATION_BENCH_DATABASE_URL (default moderation_bench_webhooks, recreated).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation_bench_webhooks"
GROUP = 16

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from sqlalchemy import create_engine, select, text  # noqa: E402

from moderation import schema  # noqa: E402
from moderation.banks.matcher import Match  # noqa: E402
from moderation.banks.models import BankEntry  # noqa: E402
from moderation.banks.service import create_bank  # noqa: E402
from moderation.config import Settings  # noqa: E402
from moderation.embedding.service import get_or_create_model  # noqa: E402
from moderation.images.hashing import PdqHash  # noqa: E402
from moderation.images.signals import FrameSignals, ImageSignals, SignalType  # noqa: E402
from moderation.runtime import Runtime  # noqa: E402
from moderation.screening import service as screening  # noqa: E402
from moderation.webhooks import sender as sending  # noqa: E402
from moderation.webhooks import service as webhooks  # noqa: E402
from moderation.webhooks.models import DeliveryStatus, EventType, WebhookEvent  # noqa: E402
from moderation.worker.results import record_results  # noqa: E402
from tests.webhook_receiver import Receiver, running_receiver  # noqa: E402


def recreate_database(url: str) -> None:
    admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()
    schema.upgrade(url)


def _signals() -> ImageSignals:
    return ImageSignals(
        sha256=os.urandom(32),
        format="JPEG",
        width=640,
        height=480,
        frame_count=1,
        frames=[FrameSignals(index=0, pdq=PdqHash(os.urandom(32), 90), pixels=np.zeros(1))],
    )


def time_group(
    runtime: Runtime, settings: Settings, entries: list[int], model_id: int, dim: int
) -> float:
    """Seconds to record one group of screened uploads with two hits each, committed, under
    `settings` (whether hits are announced)."""
    with runtime.session() as session:
        ids = screening.submit_many(session, [f"https://img.example/{i}.jpg" for i in range(GROUP)])
        screening.claim_many(session, ids, max_attempts=5)
    results = [
        screening.Screened(
            upload_id,
            _signals(),
            {model_id: np.zeros((1, dim), np.float32)},
            [Match(entry, 0, SignalType.SHA256, 0.0, 0, 0.0) for entry in entries],
        )
        for upload_id in ids
    ]
    started = time.perf_counter()
    with runtime.session() as session:
        record_results(session, settings, results)
    return time.perf_counter() - started


def bench_hook(runtime: Runtime, groups: int) -> dict[str, float]:
    # Events are written only where a receiver is configured; none is sent here.
    hooked = runtime.settings.model_copy(update={"webhook_url": "http://127.0.0.1:9/unused"})
    announcing = {
        announce: hooked.model_copy(update={"webhook_on_screening_hit": announce})
        for announce in (False, True)
    }
    with runtime.session() as session:
        model = get_or_create_model(session, "bench", 8)
        bank = create_bank(session, "bench")
        entries = [BankEntry(bank_id=bank.id, sha256=os.urandom(32), added_by="bench")]
        entries.append(BankEntry(bank_id=bank.id, sha256=os.urandom(32), added_by="bench"))
        session.add_all(entries)
        session.flush()
        entry_ids, model_id = [entry.id for entry in entries], model.id
    timings: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):  # warm-up: statement caches, connections
        time_group(runtime, announcing[False], entry_ids, model_id, 8)
    for i in range(2 * groups):
        announce = i % 2 == 1
        timings[announce].append(time_group(runtime, announcing[announce], entry_ids, model_id, 8))
    with runtime.session() as session:
        written = len(list(session.scalars(select(WebhookEvent.id))))
        session.execute(text("DELETE FROM webhook_events"))
    assert written == groups * GROUP, written
    off, on = statistics.median(timings[False]), statistics.median(timings[True])
    return {
        "group_ms_without_events": off * 1000,
        "group_ms_with_events": on * 1000,
        "event_insert_ms_per_group": (on - off) * 1000,
    }


def bench_sender(runtime: Runtime, events: int) -> dict[str, float]:
    with runtime.session() as session:
        upload_ids = screening.submit_many(session, ["https://img.example/x.jpg"] * events)
        webhooks.enqueue(session, EventType.CONFIRMED, upload_ids, hit_ids=[])
    with running_receiver(Receiver()) as receiver:
        to_receiver = Runtime(runtime.settings.model_copy(update={"webhook_url": receiver.url}))
        sender = sending.Sender(to_receiver, name="bench")
        started = time.perf_counter()
        while sender.deliver_batch():
            pass
        sender_s = time.perf_counter() - started
        with runtime.session() as session:
            delivered = session.scalars(
                select(WebhookEvent).where(WebhookEvent.status == DeliveryStatus.DELIVERED)
            ).all()
            bodies = [
                sending.body_of(
                    webhooks.ClaimedEvent(
                        e.id,
                        e.idempotency_key,
                        e.event_type.value,
                        e.payload,
                        e.created_at,
                        1,
                        e.idempotency_key,
                    )
                )
                for e in delivered
            ]
        assert len(bodies) == events, len(bodies)
        with httpx.Client(timeout=10, trust_env=False) as client:
            started = time.perf_counter()
            for body in bodies:
                client.post(receiver.url, content=body, headers={"Idempotency-Key": "x"})
            plain_s = time.perf_counter() - started
        sender.close()
        to_receiver.close()
    return {
        "sender_events_per_s": events / sender_s,
        "plain_posts_per_s": events / plain_s,
        "ratio": plain_s / sender_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", type=int, default=60, help="Groups timed per setting.")
    parser.add_argument("--events", type=int, default=500, help="Events delivered.")
    parser.add_argument("--out", type=Path, default=Path("webhooks.json"))
    args = parser.parse_args()
    settings = Settings(
        database_url=os.environ.get("MODERATION_BENCH_DATABASE_URL", BENCH_DATABASE),
        webhook_secret="bench",
    )
    recreate_database(settings.database_url)
    runtime = Runtime(settings)
    try:
        figures = {**bench_hook(runtime, args.groups), **bench_sender(runtime, args.events)}
    finally:
        runtime.close()
    figures.update(groups=args.groups, group_size=GROUP, events=args.events)
    print(
        f"group commit of {GROUP} uploads with 2 hits each: "
        f"{figures['group_ms_without_events']:.1f} ms without events, "
        f"{figures['group_ms_with_events']:.1f} ms with them "
        f"(+{figures['event_insert_ms_per_group']:.1f} ms; median of {args.groups} each)"
    )
    print(
        f"delivery by one sender: {figures['sender_events_per_s']:.0f} events/s against "
        f"{figures['plain_posts_per_s']:.0f} plain POSTs/s to the same receiver "
        f"({figures['ratio']:.2f} of it)"
    )
    args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
