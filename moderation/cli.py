"""The `moderation` command."""

from __future__ import annotations

import logging

import click

from moderation.banks.cli import bank
from moderation.embedding.cli import embed, model
from moderation.screening.cli import hits, resubmit, submit, sweep, uploads, worker


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def main(verbose: bool) -> None:
    """Screen images against banks of known-bad content."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.group()
def db() -> None:
    """Database schema."""


@db.command()
def upgrade() -> None:
    """Create the database if needed and apply every migration."""
    from moderation import schema

    schema.upgrade()
    click.echo("database is at the latest migration")


@db.command()
def check() -> None:
    """Fail if the models and the migrated schema differ."""
    from moderation import schema

    differences = schema.drift()
    if differences:
        for difference in differences:
            click.echo(f"drift: {difference}", err=True)
        raise click.ClickException("models and migrations differ; generate a migration")
    click.echo("models and migrations agree")


@main.command()
def demo() -> None:
    """Screen the bundled sample set against a sample bank with a real worker."""
    from moderation.demo.run import run_demo

    run_demo()


for command in (bank, embed, model, submit, resubmit, hits, uploads, worker, sweep):
    main.add_command(command)
