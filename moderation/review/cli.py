"""`moderation decide HIT --confirm | --dismiss | --escalate`."""

from __future__ import annotations

import click

from moderation.audit.service import cli_actor
from moderation.db import session_scope
from moderation.review import service
from moderation.review.service import Outcome


@click.command()
@click.argument("hit_id", type=int)
@click.option("--confirm", "outcome", flag_value=Outcome.CONFIRM.value, help="It is a match.")
@click.option("--dismiss", "outcome", flag_value=Outcome.DISMISS.value, help="It is not.")
@click.option(
    "--escalate", "outcome", flag_value=Outcome.ESCALATE.value, help="For a senior reviewer."
)
@click.option("--note", default=None, help="Why, for the audit log.")
def decide(hit_id: int, outcome: str | None, note: str | None) -> None:
    """Decide a hit, and with it every open hit of its upload (audited as the OS user)."""
    if outcome is None:
        raise click.UsageError("say --confirm, --dismiss or --escalate")
    try:
        with session_scope() as session:
            decision = service.decide(session, hit_id, Outcome(outcome), note, cli_actor())
    except (service.HitNotFound, service.AlreadyDecided) as error:
        raise click.ClickException(str(error)) from None
    if not decision.changed:
        click.echo(f"hit {hit_id} was already {service.STATUS_AFTER[decision.outcome].value}")
        return
    decided = ", ".join(str(i) for i in sorted(decision.decided))
    status = service.STATUS_AFTER[decision.outcome].value
    click.echo(f"upload {decision.upload_id}: hit(s) {decided} {status}")
