"""Delivering outbox events: claim one, sign it, POST it, record the attempt; repeat.

A sender holds no transaction while it waits on the receiver: the claim commits first (its
lease keeps other senders off the event), the attempt is recorded after. Any number of
senders may run; each event is posted by one of them at a time, and again only after a
failure or an expired lease. The contract a receiver sees is in docs/api.md ("Webhooks").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path

import httpx

from moderation.config import Settings
from moderation.db import session_scope
from moderation.errors import Unavailable
from moderation.webhooks import service
from moderation.webhooks.service import AttemptOutcome, ClaimedEvent

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Moderation-Signature"
TIMESTAMP_HEADER = "X-Moderation-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
EVENT_TYPE_HEADER = "X-Moderation-Event"
# A receiver's error text kept with the attempt, at most.
ERROR_TEXT_CHARS = 500


class WebhookNotConfigured(Unavailable):
    code = "webhook_not_configured"


def body_of(event: ClaimedEvent) -> bytes:
    """The JSON body: the same bytes on every attempt (only the timestamp header changes)."""
    document = {
        "idempotency_key": str(event.idempotency_key),
        "id": event.id,
        "type": event.event_type,
        "created_at": event.created_at.isoformat(),
        "data": event.payload,
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 over `<timestamp>.<body>`: the timestamp is signed, so a captured request
    cannot be replayed later with a fresh one."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def post(client: httpx.Client, url: str, secret: bytes, event: ClaimedEvent) -> AttemptOutcome:
    """One attempt. Any answer but a 2xx is a failure, redirects included: they are not
    followed (the URL is the operator's; a receiver that moved is a configuration error)."""
    body = body_of(event)
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "moderation-webhooks",
        IDEMPOTENCY_HEADER: str(event.idempotency_key),
        EVENT_TYPE_HEADER: event.event_type,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    status_code: int | None = None
    error: str | None = None
    try:
        response = client.post(url, content=body, headers=headers)
        status_code = response.status_code
        if response.is_redirect:
            location = response.headers.get("location", "")
            error = f"HTTP {status_code} to {location}: redirects are not followed; fix the URL"
        elif not response.is_success:
            error = f"HTTP {status_code}: {response.text[:ERROR_TEXT_CHARS]}"
    except httpx.HTTPError as failure:
        error = f"{type(failure).__name__}: {failure}"[:ERROR_TEXT_CHARS]
    duration_ms = (time.perf_counter() - started) * 1000
    return AttemptOutcome(started_at, duration_ms, status_code, error)


class Sender:
    """One sending loop. `run` until `stop` is set; `deliver_batch` for a single step.

    Each step claims up to `batch` due events and posts them at once, one thread each, and
    records each outcome as it comes (so a sender killed mid-step has recorded all but the
    posts still in flight). Measured on two loaded cores against a receiver on 127.0.0.1
    (bench/webhooks.py): one event per step, 53 events/s, a tenth of a plain loop of POSTs;
    16 per step, 100 events/s against 335 plain POSTs/s, the rest being one commit per
    recorded attempt.
    """

    def __init__(self, settings: Settings, name: str | None = None, batch: int = 16) -> None:
        if not settings.webhook_url:
            raise WebhookNotConfigured(
                "MODERATION_WEBHOOK_URL is not set: there is nowhere to send events"
            )
        if settings.webhook_secret is None or not settings.webhook_secret.get_secret_value():
            raise WebhookNotConfigured(
                "MODERATION_WEBHOOK_SECRET is not set: events are always signed; share a "
                "random secret with the receiver (python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')"
            )
        if settings.webhook_lease_s < 2 * settings.webhook_timeout_s:
            raise WebhookNotConfigured(
                f"MODERATION_WEBHOOK_LEASE_S ({settings.webhook_lease_s}) must be at least "
                f"twice MODERATION_WEBHOOK_TIMEOUT_S ({settings.webhook_timeout_s}), or a "
                "slow delivery would be taken over by another sender while in flight"
            )
        self.settings = settings
        self.url = settings.webhook_url
        self.secret = settings.webhook_secret.get_secret_value().encode()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.batch = batch
        self.client = httpx.Client(
            timeout=httpx.Timeout(settings.webhook_timeout_s),
            follow_redirects=False,
            # The receiver is named by the operator; proxies from the environment are not.
            trust_env=False,
            limits=httpx.Limits(max_connections=batch),
        )
        self.pool = ThreadPoolExecutor(max_workers=batch, thread_name_prefix="webhook-post")

    def close(self) -> None:
        self.pool.shutdown()
        self.client.close()

    def deliver_batch(self) -> int:
        """Claim due events and try each once; how many were claimed (0: none was due)."""
        with session_scope() as session:
            claimed = service.claim_due(
                session, lease_s=self.settings.webhook_lease_s, limit=self.batch
            )
        posts = {
            self.pool.submit(post, self.client, self.url, self.secret, event): event
            for event in claimed
        }
        for done in as_completed(posts):
            event, outcome = posts[done], done.result()
            with session_scope() as session:
                service.record_attempt(
                    session, event, outcome, sender=self.name, settings=self.settings
                )
            if outcome.delivered:
                logger.info("delivered event %d (attempt %d)", event.id, event.attempt)
            else:
                logger.warning(
                    "event %d, attempt %d failed: %s", event.id, event.attempt, outcome.error
                )
        return len(claimed)

    def run(self, stop: threading.Event, heartbeat: Path | None = None) -> None:
        """Deliver until `stop` is set, finishing the step in hand. A database error is
        logged and retried after the poll interval: the outbox keeps every event. The
        heartbeat file, if given, is touched after every step that reached the database
        (a container's healthcheck reads its age)."""
        while not stop.is_set():
            try:
                claimed = self.deliver_batch()
            except Exception:
                logger.exception("webhook sender: retrying after an error")
                stop.wait(self.settings.webhook_poll_s)
                continue
            if heartbeat is not None:
                heartbeat.touch()
            if not claimed:
                stop.wait(self.settings.webhook_poll_s)
