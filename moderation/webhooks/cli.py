"""`moderation webhooks send | list | show | redeliver`."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from moderation.console import emit_json, emit_table
from moderation.runtime import Runtime, pass_runtime
from moderation.webhooks import service
from moderation.webhooks.models import DeliveryStatus, WebhookEvent
from moderation.webhooks.sender import Sender


@click.group()
def webhooks() -> None:
    """Verdict webhooks: the outbox of events and the sender that delivers them."""


@webhooks.command()
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@click.option(
    "--heartbeat-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Touch this file after every step that reached the database (for healthchecks).",
)
@click.option(
    "--batch",
    default=16,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Events claimed and posted at once.",
)
@pass_runtime
def send(runtime: Runtime, once: bool, heartbeat_file: Path | None, batch: int) -> None:
    """Deliver outbox events to MODERATION_WEBHOOK_URL until stopped (SIGTERM or Ctrl-C
    finish the delivery in hand). Run as many as you like."""
    sender = Sender(runtime, batch=batch)
    try:
        if once:
            tried = 0
            while claimed := sender.deliver_batch():
                tried += claimed
            click.echo(f"tried {tried} event(s)")
            return
        stop = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        click.echo(f"webhook sender {sender.name}: delivering to {sender.url}")
        sender.run(stop, heartbeat_file)
    finally:
        sender.close()


def _row(event: WebhookEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.event_type.value,
        "upload_id": event.upload_id,
        "status": event.status.value,
        "attempts": event.attempts,
        "created": event.created_at,
        "next_attempt": event.next_attempt_at if event.status is DeliveryStatus.PENDING else None,
        "delivered": event.delivered_at,
        "last_error": event.last_error,
    }


@webhooks.command("list")
@click.option("--status", type=click.Choice([s.value for s in DeliveryStatus]))
@click.option("--upload", "upload_id", type=int, help="Only this upload's events.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def list_(
    runtime: Runtime, status: str | None, upload_id: int | None, limit: int, as_json: bool
) -> None:
    """Events, newest first, and how many are in each state."""
    with runtime.session() as session:
        found = service.list_events(
            session,
            status=DeliveryStatus(status) if status else None,
            upload_id=upload_id,
            limit=limit,
        )
        counts = service.count_by_status(session)
        rows = [_row(event) for event in found]
    if as_json:
        emit_json(rows)
        return
    emit_table(rows, list(rows[0]) if rows else [], empty="no webhook events")
    click.echo(", ".join(f"{count:,} {state.value}" for state, count in counts.items()))
    if len(rows) == limit:
        click.echo(f"showing the newest {limit}: --limit N for more")


@webhooks.command()
@click.argument("event_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def show(runtime: Runtime, event_id: int, as_json: bool) -> None:
    """One event: its body's data and every attempt to deliver it."""
    with runtime.session() as session:
        event = service.get_event(session, event_id)
        row = {**_row(event), "idempotency_key": str(event.idempotency_key)}
        attempts = [
            {
                "attempt": a.attempt,
                "sender": a.sender,
                "started": a.started_at,
                "ms": round(a.duration_ms, 1),
                "status": a.status_code,
                "error": a.error,
            }
            for a in service.attempts_of(session, event_id)
        ]
        payload = event.payload
    # A claim with no recorded attempt: its sender stopped mid-delivery.
    recorded = {a["attempt"] for a in attempts}
    lost = [n for n in range(1, row["attempts"] + 1) if n not in recorded]
    if event.status is DeliveryStatus.PENDING and event.lease_token is not None:
        lost = lost[:-1]  # the last claim may still be in flight
    if as_json:
        emit_json({**row, "data": payload, "attempt_log": attempts, "unrecorded": lost})
        return
    for key, value in row.items():
        click.echo(f"{key:>16}: {'-' if value is None else value}")
    click.echo(f"{'data':>16}: {json.dumps(payload, separators=(',', ':'))}")
    emit_table(attempts, list(attempts[0]) if attempts else [], empty="no attempts yet")
    for number in lost:
        click.echo(f"attempt {number}: no outcome recorded (its sender stopped mid-delivery)")


@webhooks.command()
@click.argument("event_id", type=int)
@pass_runtime
def redeliver(runtime: Runtime, event_id: int) -> None:
    """Send an event again from now on (a failed one, or one the receiver lost). It keeps
    its idempotency key, so a receiver that has it drops it again."""
    with runtime.session() as session:
        event = service.redeliver(session, event_id)
    click.echo(f"event {event.id} is due now")
