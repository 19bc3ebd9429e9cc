"""The webhook sender against hostile receivers (issue 27, item 4): each attempt is over by
its wall-clock deadline however the receiver trickles, reads at most a few KiB of an
answer however large, stores what the receiver wrote only once it is safe text, and gives
up on an event when its time is up even if no attempt could be recorded.

The receivers are real HTTP servers on 127.0.0.1 (`tests.webhook_receiver`), writing their
answers byte by byte on the socket.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, update

from moderation.config import settings_fields
from moderation.runtime import Runtime
from moderation.webhooks import service
from moderation.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookEvent
from moderation.webhooks.sender import ANSWER_BYTES_READ, Sender
from tests.conftest import TEST_RUNTIME
from tests.test_webhooks import _confirmed_uploads, sending_to
from tests.webhook_receiver import Receiver, running_receiver

# The attempt's deadline here (MODERATION_WEBHOOK_TIMEOUT_S), and what the receivers do
# that a per-read timeout of the same length never notices.
DEADLINE_S = 1.0
BYTE_EVERY_S = 0.25
# How long a trickling receiver keeps going if nobody hangs up on it. The bounds below
# leave a loaded machine seconds of slack; a sender bounded per read only (a byte every
# 0.25 s never trips its 1 s read timeout) takes 10 s on the head and 20 s on the body.
TRICKLE_FOR_S = 20.0


def _sending(chunks: Iterator[bytes], every_s: float = 0.0) -> Callable[[socket.socket], int]:
    """A raw answer: `chunks` written in turn, `every_s` apart, until they end or the
    sender hangs up; how many bytes went out."""
    stop = threading.Event()

    def respond(conn: socket.socket) -> int:
        sent = 0
        try:
            for chunk in chunks:
                conn.sendall(chunk)
                sent += len(chunk)
                if every_s and stop.wait(every_s):
                    break
        except OSError:
            pass
        return sent

    return respond


def _trickled(answer: bytes) -> Iterator[bytes]:
    started = time.monotonic()
    for byte in answer:
        if time.monotonic() - started > TRICKLE_FOR_S:
            return
        yield bytes([byte])


def _settings(url: str) -> dict[str, str]:
    return {**sending_to(url), "MODERATION_WEBHOOK_TIMEOUT_S": str(DEADLINE_S)}


@pytest.fixture
def receiver(clean_db: None) -> Iterator[Receiver]:
    with running_receiver(Receiver()) as running:
        yield running


@pytest.fixture
def hooked(receiver: Receiver, make_runtime: Callable[..., Runtime]) -> Callable[..., Runtime]:
    """Runtimes whose settings send to the receiver, with `changes` (by field name) on top."""

    def make(**changes: Any) -> Runtime:
        return make_runtime(**{**settings_fields(_settings(receiver.url)), **changes})

    return make


def _one_attempt(runtime: Runtime) -> tuple[WebhookEvent, WebhookAttempt, float]:
    """Deliver the one due event once: the event and its attempt after, and how long the
    sender took."""
    sender = Sender(runtime)
    started = time.monotonic()
    try:
        assert sender.deliver_batch() == 1
    finally:
        sender.close()
    took = time.monotonic() - started
    with TEST_RUNTIME.session() as session:
        (event,) = session.scalars(select(WebhookEvent))
        (attempt,) = service.attempts_of(session, event.id)
        session.expunge_all()
    return event, attempt, took


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", id="trickled head"),
        pytest.param(
            b"HTTP/1.1 500 Oops\r\nContent-Length: 400\r\n\r\n" + b"x" * 400, id="trickled body"
        ),
    ],
)
def test_an_attempt_ends_at_its_deadline_however_the_receiver_trickles(
    receiver: Receiver, hooked: Callable[..., Runtime], answer: bytes
) -> None:
    """A byte every 0.25 s never trips a 1 s read timeout; the attempt's deadline does."""
    head = answer.index(b"\r\n\r\n") + 4
    # The head at once for the body case, so that it is the body that trickles.
    at_once = answer[:head] if b" 500 " in answer[:head] else b""
    rest = answer[len(at_once) :]
    receiver.respond = _sending(
        itertools.chain([at_once], _trickled(rest)) if at_once else _trickled(rest), BYTE_EVERY_S
    )
    _confirmed_uploads(1)
    event, attempt, took = _one_attempt(hooked())
    assert attempt.status_code is None or attempt.status_code == 500
    assert attempt.error is not None
    assert "Timeout" in attempt.error
    assert attempt.duration_ms < (DEADLINE_S + 1.0) * 1000
    assert took < DEADLINE_S + 4.0
    # Still the sender's to retry, well within its lease.
    assert event.status is DeliveryStatus.PENDING


def test_a_huge_error_body_is_not_read(receiver: Receiver, hooked: Callable[..., Runtime]) -> None:
    """600 MiB declared and offered as fast as the socket takes it: the sender reads a few
    KiB, keeps at most 500 characters, and hangs up."""
    declared = 600 * 1024 * 1024
    chunk = b"E" * 65536

    def flood() -> Iterator[bytes]:
        yield f"HTTP/1.1 500 Oops\r\nContent-Length: {declared}\r\n\r\n".encode()
        for _ in range(declared // len(chunk)):
            yield chunk

    receiver.respond = _sending(flood())
    _confirmed_uploads(1)
    _, attempt, took = _one_attempt(hooked())
    assert attempt.status_code == 500
    assert attempt.error is not None
    assert attempt.error.startswith("HTTP 500: EEEE")
    assert len(attempt.error) <= service.ERROR_TEXT_CHARS
    assert took < DEADLINE_S + 4.0
    _until_sent(receiver)
    # What the kernel's socket buffers took before the sender hung up, not 600 MiB.
    assert 0 <= receiver.bytes_sent[0] < 64 * 1024 * 1024 or receiver.bytes_sent[0] == -1
    assert ANSWER_BYTES_READ < 64 * 1024


def _until_sent(receiver: Receiver, timeout_s: float = 30.0) -> None:
    """Wait for the receiver's handler to finish (the sender hung up, or it was done)."""
    deadline = time.monotonic() + timeout_s
    while not receiver.bytes_sent:
        assert time.monotonic() < deadline, "the receiver is still sending"
        time.sleep(0.02)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"bad\x00news", id="NUL"),
        pytest.param(b"bad \xff\xfe bytes", id="invalid UTF-8"),
        pytest.param(b"ansi \x1b[31mred\x1b[0m", id="terminal escapes"),
    ],
)
def test_error_text_is_cleaned_before_it_is_stored_and_the_event_gives_up(
    receiver: Receiver, hooked: Callable[..., Runtime], body: bytes
) -> None:
    """A NUL in an error body made the attempt's INSERT fail: never recorded, the event was
    posted again forever instead of failing at its give-up time."""
    answer = b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    receiver.respond = _sending(iter([answer]))
    _confirmed_uploads(1)
    event, attempt, _ = _one_attempt(hooked(webhook_give_up_after_s=0.001))
    assert attempt.error is not None
    assert attempt.error.startswith("HTTP 500: ")
    assert all(c.isprintable() for c in attempt.error)
    assert event.status is DeliveryStatus.FAILED
    assert event.last_error == attempt.error


def test_an_event_whose_attempts_were_never_recorded_gives_up(
    receiver: Receiver, hooked: Callable[..., Runtime]
) -> None:
    """Claimed before (its sender died, or could not record), due again, past its give-up
    time: failed, not posted again."""
    _confirmed_uploads(1)
    with TEST_RUNTIME.session() as session:
        session.execute(
            update(WebhookEvent).values(
                attempts=3,
                pending_since=WebhookEvent.pending_since - func.make_interval(0, 0, 0, 4),
            )
        )
    sender = Sender(hooked())
    try:
        assert sender.deliver_batch() == 0
    finally:
        sender.close()
    assert receiver.requests == []
    with TEST_RUNTIME.session() as session:
        (event,) = session.scalars(select(WebhookEvent))
        assert event.status is DeliveryStatus.FAILED
        assert event.last_error is not None
        assert "given up" in event.last_error
