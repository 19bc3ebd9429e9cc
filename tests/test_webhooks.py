"""The webhook outbox delivering to a real receiver on 127.0.0.1: retries, one effect per
event, several senders, a sender killed mid-delivery, signatures as docs/api.md checks them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moderation.banks.matcher import Match
from moderation.config import Settings, settings_fields
from moderation.embedding.service import get_or_create_model
from moderation.images.hashing import PdqHash
from moderation.images.signals import FrameSignals, ImageSignals, SignalType
from moderation.main.cli import main
from moderation.review import service as review
from moderation.review.service import Outcome
from moderation.runtime import Runtime
from moderation.screening import service as screening
from moderation.webhooks import sender as sending
from moderation.webhooks import service
from moderation.webhooks.models import DeliveryStatus, EventType, WebhookAttempt, WebhookEvent
from moderation.webhooks.sender import Sender
from moderation.worker.results import record_results
from tests.conftest import TEST_ENV, TEST_RUNTIME, settings_for_tests
from tests.review_fixtures import make_bank, make_entry, make_hit, make_upload
from tests.webhook_receiver import Receiver, running_receiver

SECRET = "test-secret"
API_DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"
# Fast retries for the tests; a lease short enough to wait out, twice the timeout.
FAST = {
    "MODERATION_WEBHOOK_SECRET": SECRET,
    "MODERATION_WEBHOOK_RETRY_BASE_S": "0.05",
    "MODERATION_WEBHOOK_RETRY_MAX_S": "0.2",
    "MODERATION_WEBHOOK_TIMEOUT_S": "1",
    "MODERATION_WEBHOOK_LEASE_S": "2",
    "MODERATION_WEBHOOK_POLL_S": "0.05",
}


def sending_to(url: str) -> dict[str, str]:
    """The settings that send to `url`, fast, as a child process's environment has them."""
    return {**FAST, "MODERATION_WEBHOOK_URL": url}


# What writes events (`review.decide`, `worker.results`) reads from its settings is only
# whether a receiver is configured; a sender delivers them to its own runtime's receiver.
WRITING_EVENTS = settings_for_tests(webhook_url="http://127.0.0.1:9/unused")


@pytest.fixture
def receiver(clean_db: None) -> Iterator[Receiver]:
    with running_receiver(Receiver()) as running:
        yield running


@pytest.fixture
def hooked(receiver: Receiver, make_runtime: Callable[..., Runtime]) -> Callable[..., Runtime]:
    """Runtimes whose settings send to the receiver, with `changes` (by field name) on top."""

    def make(**changes: Any) -> Runtime:
        return make_runtime(**{**settings_fields(sending_to(receiver.url)), **changes})

    return make


def _confirmed_uploads(count: int, hits_each: int = 2) -> list[int]:
    """Uploads with hits, each confirmed by a reviewer (one event each)."""
    upload_ids = []
    with TEST_RUNTIME.session() as session:
        bank = make_bank(session, f"bank-{os.urandom(3).hex()}")
        for _ in range(count):
            upload = make_upload(session, external_id=os.urandom(6).hex())
            hits = [make_hit(session, upload, make_entry(session, bank)) for _ in range(hits_each)]
            review.decide(
                session, WRITING_EVENTS, hits[0].id, Outcome.CONFIRM, "seen", "key:1:alice"
            )
            upload_ids.append(upload.id)
    return upload_ids


def _until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _statuses() -> Counter[DeliveryStatus]:
    with TEST_RUNTIME.session() as session:
        return Counter(session.scalars(select(WebhookEvent.status)))


def _deliver_until_idle(sender: Sender) -> None:
    """Deliver until nothing is pending, waiting out the retry delays."""
    while _statuses()[DeliveryStatus.PENDING]:
        if not sender.deliver_batch():
            time.sleep(0.02)


def test_an_event_fails_twice_then_is_delivered_once(
    receiver: Receiver, hooked: Callable[..., Runtime]
) -> None:
    receiver.fail_first = 2
    (upload_id,) = _confirmed_uploads(1)
    sender = Sender(hooked(), name="test-sender")
    try:
        _deliver_until_idle(sender)
    finally:
        sender.close()
    assert len(receiver.requests) == 3
    assert len(set(receiver.keys_requested())) == 1
    (effect,) = receiver.effects.values()
    assert effect["type"] == "upload.confirmed"
    assert effect["data"]["upload"]["id"] == upload_id
    assert len(effect["data"]["hits"]) == 2
    with TEST_RUNTIME.session() as session:
        (event,) = session.scalars(select(WebhookEvent))
        attempts = service.attempts_of(session, event.id)
        assert event.status is DeliveryStatus.DELIVERED
        assert event.attempts == 3
        assert event.delivered_at is not None
        assert str(event.idempotency_key) == effect["idempotency_key"]
        assert [(a.attempt, a.status_code) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
        assert [a.error is None for a in attempts] == [False, False, True]
        assert all(a.duration_ms > 0 and a.sender == "test-sender" for a in attempts)
    # Every attempt carried the same body and key; the receiver acted once.
    assert len({request.body for request in receiver.requests}) == 1


def test_a_repeat_is_dropped_by_the_receiver(
    receiver: Receiver, hooked: Callable[..., Runtime]
) -> None:
    _confirmed_uploads(2)
    sender = Sender(hooked())
    try:
        _deliver_until_idle(sender)
        with TEST_RUNTIME.session() as session:
            first = min(session.scalars(select(WebhookEvent.id)))
            service.redeliver(session, first)
        _deliver_until_idle(sender)
    finally:
        sender.close()
    assert len(receiver.requests) == 3
    assert len(receiver.effects) == 2


def test_several_senders_post_each_event_once(
    receiver: Receiver, hooked: Callable[..., Runtime]
) -> None:
    _confirmed_uploads(30, hits_each=1)
    stop = threading.Event()
    runtime = hooked()
    senders = [Sender(runtime, name=f"sender-{i}") for i in range(4)]
    threads = [threading.Thread(target=sender.run, args=(stop,)) for sender in senders]
    for thread in threads:
        thread.start()
    try:
        _until(lambda: _statuses()[DeliveryStatus.DELIVERED] == 30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for sender in senders:
            sender.close()
    requested = Counter(receiver.keys_requested())
    assert len(requested) == 30
    assert set(requested.values()) == {1}
    with TEST_RUNTIME.session() as session:
        used = set(session.scalars(select(WebhookAttempt.sender)))
    assert len(used) > 1  # they shared the work


def _sender_process(log: Path, receiver: Receiver) -> subprocess.Popen[bytes]:
    """`moderation webhooks send` to `receiver`, a real process, logging to `log`."""
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "moderation", "-v", "webhooks", "send"],
            env={**os.environ, **TEST_ENV, **sending_to(receiver.url)},
            stdout=output,
            stderr=output,
        )


def test_a_sender_killed_mid_delivery_loses_nothing(
    receiver: Receiver, hooked: Callable[..., Runtime], tmp_path: Path
) -> None:
    """SIGKILL while the receiver holds the third request: another sender delivers that
    event once the lease runs out, and the receiver sees at most repeats it drops."""
    receiver.hold_request = 3
    _confirmed_uploads(5)
    log = tmp_path / "senders.log"
    first = _sender_process(log, receiver)
    try:
        assert receiver.held.wait(60), log.read_text()
        # The sender posts its claimed events at once: the other four are answered and
        # recorded while the third is held.
        _until(lambda: _statuses()[DeliveryStatus.DELIVERED] == 4)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    assert _statuses()[DeliveryStatus.DELIVERED] == 4
    receiver.release.set()
    second = _sender_process(log, receiver)
    try:
        _until(lambda: _statuses()[DeliveryStatus.DELIVERED] == 5)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0, log.read_text()
    assert len(receiver.effects) == 5
    requested = Counter(receiver.keys_requested())
    assert len(requested) == 5
    assert sorted(requested.values()) == [1, 1, 1, 1, 2]
    (held_key,) = [key for key, count in requested.items() if count == 2]
    with TEST_RUNTIME.session() as session:
        event = session.scalars(
            select(WebhookEvent).where(WebhookEvent.idempotency_key == held_key)
        ).one()
        assert event.attempts == 2
        assert [a.attempt for a in service.attempts_of(session, event.id)] == [2]
    shown = CliRunner().invoke(main, ["webhooks", "show", str(event.id)], obj=hooked())
    assert shown.exit_code == 0, shown.output
    assert "attempt 1: no outcome recorded" in shown.output


def _documented_verify() -> Callable[..., bool]:
    """The five lines of docs/api.md, run as written."""
    block = re.search(r"```python\n(import hashlib.*?def verify.*?)```", API_DOCS.read_text(), re.S)
    assert block is not None, "docs/api.md has no signature check"
    assert len([line for line in block[1].splitlines() if line.strip()]) == 5
    namespace: dict[str, object] = {}
    exec(block[1], namespace)
    verify = namespace["verify"]
    assert callable(verify)
    return verify


def test_the_documented_check_accepts_the_signature_and_refuses_forgeries(
    receiver: Receiver, hooked: Callable[..., Runtime]
) -> None:
    _confirmed_uploads(1)
    sender = Sender(hooked())
    try:
        _deliver_until_idle(sender)
    finally:
        sender.close()
    verify = _documented_verify()
    (request,) = receiver.requests
    body, headers = request.body, request.headers
    timestamp, sig = headers["x-moderation-timestamp"], headers["x-moderation-signature"]
    assert verify(SECRET.encode(), body, timestamp, sig)
    assert not verify(b"wrong-secret", body, timestamp, sig)
    assert not verify(SECRET.encode(), body.replace(b"confirmed", b"dismissed"), timestamp, sig)
    # Replayed ten minutes later: the signature of an old timestamp is genuine but stale.
    old = str(int(timestamp) - 600)
    assert not verify(
        SECRET.encode(), body, old, sending.signature(SECRET.encode(), int(old), body)
    )
    # ... and it cannot be given a fresh timestamp without the secret.
    fresh = str(int(timestamp) + 1)
    assert not verify(SECRET.encode(), body, fresh, sig)
    assert headers["idempotency-key"] in body.decode()
    assert headers["x-moderation-event"] == "upload.confirmed"


def test_redirects_are_not_followed_and_old_events_give_up(
    receiver: Receiver, hooked: Callable[..., Runtime]
) -> None:
    receiver.status = 302
    _confirmed_uploads(1)
    sender = Sender(hooked(webhook_give_up_after_s=0.001))
    try:
        assert sender.deliver_batch() == 1
    finally:
        sender.close()
    assert len(receiver.requests) == 1  # the Location was never requested
    with TEST_RUNTIME.session() as session:
        (event,) = session.scalars(select(WebhookEvent))
        (attempt,) = service.attempts_of(session, event.id)
        assert attempt.status_code == 302
        assert attempt.error is not None
        assert "redirects are not followed" in attempt.error
        assert event.status is DeliveryStatus.FAILED
        service.redeliver(session, event.id)
    assert _statuses() == Counter({DeliveryStatus.PENDING: 1})


def test_a_sender_needs_a_url_a_secret_and_a_long_enough_lease(
    make_runtime: Callable[..., Runtime],
) -> None:
    base = {"webhook_url": "http://127.0.0.1:9/", "webhook_secret": "s"}
    for broken in ({"webhook_url": None}, {"webhook_secret": None}, {"webhook_lease_s": 1.0}):
        with pytest.raises(sending.WebhookNotConfigured):
            Sender(make_runtime(**{**base, **broken}))


def _screen(
    session: Session, settings: Settings, upload_id: int, entry_ids: list[int], model_id: int
) -> None:
    signals = ImageSignals(
        sha256=os.urandom(32),
        format="JPEG",
        width=8,
        height=8,
        frame_count=1,
        frames=[FrameSignals(index=0, pdq=PdqHash(b"\x00" * 32, 90), pixels=np.zeros(1))],
    )
    matches = [Match(entry, 0, SignalType.SHA256, 0.0, 0, 0.0) for entry in entry_ids]
    screening.claim(session, upload_id, max_attempts=3)
    screened = screening.Screened(
        upload_id, signals, {model_id: np.zeros((1, 4), np.float32)}, matches
    )
    record_results(session, settings, [screened])


def test_screening_hits_are_announced_when_configured(clean_db: None, session: Session) -> None:
    model = get_or_create_model(session, "m", 4)
    bank = make_bank(session, "b")
    entries = [make_entry(session, bank).id for _ in range(2)]
    quiet, found, clean = (make_upload(session) for _ in range(3))
    _screen(session, WRITING_EVENTS, quiet.id, entries, model.id)  # only confirmations by default
    announcing = settings_for_tests(
        webhook_url="http://127.0.0.1:9/unused", webhook_on_screening_hit=True
    )
    _screen(session, announcing, found.id, entries, model.id)
    _screen(session, announcing, clean.id, [], model.id)
    (event,) = session.scalars(select(WebhookEvent))
    assert event.event_type is EventType.HIT
    assert event.upload_id == found.id
    assert [hit["bank_entry_id"] for hit in event.payload["hits"]] == entries
    assert event.payload["decision"] is None
    # A dismissal is announced too, so that the receiver learns the hit was cleared.
    hit_id = event.payload["hits"][0]["id"]
    review.decide(session, announcing, hit_id, Outcome.DISMISS, None, "key:1:alice")
    kinds = session.scalars(select(WebhookEvent.event_type).order_by(WebhookEvent.id))
    assert list(kinds) == [EventType.HIT, EventType.DISMISSED]
    assert session.scalar(select(func.count()).select_from(WebhookAttempt)) == 0


def test_the_compose_healthcheck_follows_a_real_sender(receiver: Receiver, tmp_path: Path) -> None:
    from tests.test_compose import SERVICES

    service = SERVICES["webhooks"]
    alive = tmp_path / "webhooks.alive"
    command = [str(alive) if word == "/tmp/webhooks.alive" else word for word in service["command"]]
    health = (
        service["healthcheck"]["test"][1]
        .replace("$$", "$")
        .replace("/tmp/webhooks.alive", str(alive))
    )

    def healthy() -> bool:
        return subprocess.run(["sh", "-c", health], capture_output=True).returncode == 0

    assert not healthy()
    with (tmp_path / "sender.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", *command],
            env={**os.environ, **TEST_ENV, **sending_to(receiver.url)},
            stdout=log,
            stderr=log,
        )
    try:
        _until(healthy)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0


def test_decide_and_list_from_the_command_line(
    receiver: Receiver, hooked: Callable[..., Runtime]
) -> None:
    with TEST_RUNTIME.session() as session:
        bank = make_bank(session, "b")
        upload = make_upload(session)
        first, second = (make_hit(session, upload, make_entry(session, bank)) for _ in range(2))
        first_id, second_id = first.id, second.id
    runner = CliRunner()
    runtime = hooked()
    decided = runner.invoke(
        main, ["decide", str(second_id), "--confirm", "--note", "known"], obj=runtime
    )
    assert decided.exit_code == 0, decided.output
    assert f"hit(s) {first_id}, {second_id} confirmed" in decided.output
    again = runner.invoke(main, ["decide", str(first_id), "--confirm"], obj=runtime)
    assert "already confirmed" in again.output
    refused = runner.invoke(main, ["decide", str(first_id), "--dismiss"], obj=runtime)
    assert refused.exit_code == 1
    assert "already confirmed by cli:" in refused.output
    assert runner.invoke(main, ["decide", str(first_id)], obj=runtime).exit_code == 2
    listed = runner.invoke(main, ["webhooks", "list"], obj=runtime)
    assert listed.exit_code == 0, listed.output
    assert "upload.confirmed" in listed.output
    assert "1 pending, 0 delivered, 0 failed" in listed.output
    sent = runner.invoke(main, ["webhooks", "send", "--once"], obj=runtime)
    assert sent.exit_code == 0, sent.output
    assert "tried 1 event(s)" in sent.output
    assert len(receiver.effects) == 1


def test_retry_delays_double_up_to_the_cap() -> None:
    settings = settings_for_tests(webhook_retry_base_s=5, webhook_retry_max_s=600)
    for attempt, full in [(1, 5), (2, 10), (3, 20), (7, 320), (8, 600), (30, 600), (200, 600)]:
        for _ in range(20):
            assert full / 2 <= service.retry_delay_s(attempt, settings) <= full


def test_events_wait_while_the_receiver_is_down(
    receiver: Receiver, hooked: Callable[..., Runtime]
) -> None:
    """Refused connections are attempts like any other; nothing is lost or given up, and
    the backlog goes out once the receiver answers."""
    _confirmed_uploads(3)
    sender = Sender(hooked(webhook_url="http://127.0.0.1:9/"))
    try:
        deadline = time.monotonic() + 30
        while _attempt_count() < 9:  # three failed attempts each
            assert time.monotonic() < deadline
            if not sender.deliver_batch():
                time.sleep(0.02)
    finally:
        sender.close()
    assert _statuses() == Counter({DeliveryStatus.PENDING: 3})
    with TEST_RUNTIME.session() as session:
        errors = set(session.scalars(select(WebhookAttempt.error)))
        assert all(error and "ConnectError" in error for error in errors)
    sender = Sender(hooked())
    try:
        _deliver_until_idle(sender)
    finally:
        sender.close()
    assert len(receiver.effects) == 3
    assert len(receiver.requests) == 3


def _attempt_count() -> int:
    with TEST_RUNTIME.session() as session:
        return session.scalar(select(func.count()).select_from(WebhookAttempt)) or 0
