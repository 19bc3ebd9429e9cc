"""The `moderation` command."""

from __future__ import annotations

import logging
from typing import Any

import click

from moderation.auth.cli import apikey
from moderation.banks.cli import bank
from moderation.config import Settings
from moderation.embedding.cli import embed, model
from moderation.evaluation.cli import activate as activate_model
from moderation.evaluation.cli import eval_, golden
from moderation.evidence.cli import evidence
from moderation.lifecycle.cli import COMMANDS as MODEL_COMMANDS
from moderation.lifecycle.cli import reembed
from moderation.main.api_cli import api
from moderation.main.cli_errors import explain, redacted
from moderation.main.services_cli import services
from moderation.retrohunt.cli import retrohunt
from moderation.review.cli import decide, hits, upload
from moderation.runtime import Runtime, pass_runtime
from moderation.screening.cli import resubmit, submit, uploads
from moderation.search.cli import index, search
from moderation.webhooks.cli import webhooks
from moderation.worker.cli import ping, sweep, worker

logger = logging.getLogger(__name__)


class Commands(click.Group):
    """The command group, which tells infrastructure errors (PostgreSQL or Redis down, a
    database not migrated, an unknown bank) as one line with the fix, for every command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            runtime = ctx.obj if isinstance(ctx.obj, Runtime) else None
            explained = explain(error, runtime.settings if runtime is not None else None)
            if explained is None:
                raise
            # The whole story with --verbose.
            logger.info("%s", explained.message, exc_info=error)
            raise explained from None


@click.group(
    cls=Commands,
    epilog="Exit status: 0 success; 1 a command failed or an upload failed; 2 usage error; "
    "3 `--wait` timed out; 4 PostgreSQL or Redis unreachable, or the database not migrated.",
)
@click.version_option(package_name="moderation", prog_name="moderation")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Screen images against banks of known-bad content."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The one place the command reads its settings (MODERATION_* variables); a caller that
    # built its own runtime (a test) passes it as `obj`. Subcommands take it with
    # `pass_runtime`.
    if not isinstance(ctx.obj, Runtime):
        ctx.obj = Runtime(Settings())
        ctx.call_on_close(ctx.obj.close)


@main.group()
def db() -> None:
    """Database schema."""


@db.command()
@pass_runtime
def upgrade(runtime: Runtime) -> None:
    """Create the database if needed and apply every migration."""
    from moderation import schema

    url = runtime.settings.database_url
    revision = schema.upgrade(url)
    click.echo(f"database {redacted(url)} is at the latest migration ({revision})")


@db.command()
@pass_runtime
def check(runtime: Runtime) -> None:
    """Fail if the models and the migrated schema differ."""
    from moderation import schema

    differences = schema.drift(runtime.settings.database_url)
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


for model_command in (*MODEL_COMMANDS, activate_model):
    model.add_command(model_command)

for command in (
    api,
    apikey,
    bank,
    embed,
    eval_,
    golden,
    model,
    reembed,
    retrohunt,
    submit,
    resubmit,
    hits,
    upload,
    uploads,
    worker,
    ping,
    sweep,
    search,
    index,
    decide,
    webhooks,
    services,
    evidence,
):
    main.add_command(command)
