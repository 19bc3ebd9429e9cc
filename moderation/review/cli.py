"""`moderation hits` and `moderation decide HIT --confirm | --dismiss | --escalate`."""

from __future__ import annotations

import click

from moderation.audit.service import cli_actor
from moderation.console import emit_json, emit_table, limit_options, say_if_cut
from moderation.db import session_scope
from moderation.review import service
from moderation.review.service import Outcome, QueueFilter


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


@click.command()
@click.option("--upload", "upload_id", type=int, help="Only this upload's hits.")
@limit_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def hits(upload_id: int | None, limit: int, show_all: bool, as_json: bool) -> None:
    """Show hits against the banks, newest first, with their evidence and review status
    (`moderation decide` decides them)."""
    every = QueueFilter(status=None, upload_id=upload_id)
    with session_scope() as session:
        found = service.newest(session, every, None if show_all else limit)
        cut = not show_all and len(found) == limit
        total = service.count(session, every) if cut else len(found)
    if as_json:
        emit_json(found)
    else:
        columns = ["upload_id", "bank", "bank_entry_id", "signal", "distance", "threshold"]
        emit_table(
            [vars(h) for h in found],
            [*columns, "frame_index", "model", "retroactive", "review_status", "upload_uri"],
            empty="no hits",
        )
    say_if_cut(len(found), total, "hits", as_json)
