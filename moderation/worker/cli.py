"""`moderation worker`, `moderation sweep` and `moderation ping`: running a screening
worker, its periodic chores once by hand, and asking whether workers answer."""

from __future__ import annotations

import socket
import sys

import click

from moderation.console import emit_json
from moderation.runtime import Runtime, pass_runtime


@click.command()
@pass_runtime
@click.option(
    "--concurrency",
    type=int,
    help="Uploads screened at once (default: twice the batch size times the streams).",
)
@click.option("--loglevel", default="INFO", show_default=True)
def worker(runtime: Runtime, concurrency: int | None, loglevel: str) -> None:
    """Run a screening worker: one process, the registry's models, many task threads."""
    from moderation.images.memory import configure_allocator
    from moderation.worker.celery_app import create_app
    from moderation.worker.process import WorkerState

    # Before any thread exists: arenas made by then would stay (see images/memory.py).
    configure_allocator()
    settings = runtime.settings
    concurrency = concurrency or settings.resolved_concurrency()
    app = create_app(runtime)
    # Load the model and bank index and start the intake processes before taking any
    # message, so failures show at start.
    screener = WorkerState.of(app).screener(slots=concurrency)
    click.echo(
        f"worker: model {screener.embedder.name} on {screener.embedder.device}, "
        f"{settings.resolved_streams()} stream(s) of batch {settings.resolved_batch_size()}, "
        f"{settings.resolved_intake_processes()} intake process(es), "
        f"{concurrency} uploads at once beside {settings.worker_fetches} http(s) fetches "
        f"({settings.worker_fetches_per_host} per host), queues {settings.queue}, "
        f"{settings.resolved_retrohunt_queue()} and {settings.resolved_reembed_queue()}"
    )
    # What this worker fetches: a producer with another list accepts URIs it refuses.
    click.echo(
        "worker: fetches URIs under MODERATION_ALLOWED_URI_PREFIXES "
        f"{', '.join(settings.allowed_uri_prefixes) or '(none)'}; private networks allowed: "
        f"{', '.join(settings.fetch_allowed_networks) or 'none'}"
    )
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            # Messages in flight. Most carry 16 uploads (see `UPLOADS_PER_MESSAGE`), claimed
            # together and screened as the screener's threads come free; half as many
            # messages as those threads keeps them busy without claiming far more than
            # they can screen soon, and still fills a batch per stream with messages of
            # one upload each.
            # And one per upload that may be in fetch (`worker_fetches`): a message waits for
            # all its uploads, so messages held by slow servers' uploads must leave enough
            # task threads for the rest (`intake/fetches.py`).
            f"--concurrency={max(1, concurrency // 2) + settings.worker_fetches}",
            # Retro-hunt steps too, one at a time per process (see `retrohunt.tasks`).
            # Re-embedding steps too (see `worker.reembed`).
            f"--queues={settings.queue},{settings.resolved_retrohunt_queue()},"
            f"{settings.resolved_reembed_queue()}",
            f"--loglevel={loglevel}",
            f"--hostname={NODE_PREFIX}%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )


# A worker's Celery node name is this followed by its host's name (Python's, which not
# every container runtime exports as HOSTNAME).
NODE_PREFIX = "screening@"


@click.command()
@pass_runtime
@click.option(
    "--host",
    default=socket.gethostname,
    show_default="this host",
    help="Ask the worker on this host; '*' asks every worker.",
)
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for answers.")
def ping(runtime: Runtime, host: str, timeout: float) -> None:
    """Ask workers over the broker whether they answer: a worker answers once its model is
    loaded and it consumes. Exits 1 if none answered (compose's healthcheck)."""
    destination = None if host == "*" else [f"{NODE_PREFIX}{host}"]
    replies = runtime.producer.app.control.ping(destination=destination, timeout=timeout) or []
    names = sorted(name for reply in replies for name in reply)
    if not names:
        click.echo(f"no worker answered within {timeout:g} s", err=True)
        sys.exit(1)
    for name in names:
        click.echo(f"{name}: answers")


@click.command()
@pass_runtime
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sweep(runtime: Runtime, as_json: bool) -> None:
    """Run every periodic chore once, completely, as each worker's sweeper does every few
    seconds: re-send uploads whose message or worker was lost, start retro-hunts for new
    bank entries and send those that are due, delete bank change log rows older than
    MODERATION_BANK_CHANGES_RETENTION_S."""
    from moderation.worker.sweeper import sweep_all

    done = sweep_all(runtime)
    if as_json:
        emit_json(done)
        return
    for what, value in done.items():
        if isinstance(value, list):
            click.echo(f"{what.replace('_', ' ')}: {len(value)}" + (f" {value}" if value else ""))
        else:
            click.echo(f"{what.replace('_', ' ')}: {value}")
