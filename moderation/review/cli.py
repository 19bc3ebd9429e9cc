"""`moderation upload ID`, `moderation hits` and `moderation decide HIT --confirm | --dismiss |
--escalate`: uploads with their hits, and deciding them."""

from __future__ import annotations

import click

from moderation.audit.service import cli_actor
from moderation.console import emit_json, emit_table, limit_options, say_if_cut
from moderation.review import service
from moderation.review.service import Outcome, QueueFilter
from moderation.runtime import Runtime, pass_runtime
from moderation.screening import service as screening
from moderation.screening.cli import upload_json
from moderation.screening.models import AS_STORED_FRAME


@click.command()
@click.argument("hit_id", type=int)
@click.option("--confirm", "outcome", flag_value=Outcome.CONFIRM.value, help="It is a match.")
@click.option("--dismiss", "outcome", flag_value=Outcome.DISMISS.value, help="It is not.")
@click.option(
    "--escalate", "outcome", flag_value=Outcome.ESCALATE.value, help="For a senior reviewer."
)
@click.option("--note", default=None, help="Why, for the audit log.")
@pass_runtime
def decide(runtime: Runtime, hit_id: int, outcome: str | None, note: str | None) -> None:
    """Decide a hit, and with it every open hit of its upload (audited as the OS user)."""
    if outcome is None:
        raise click.UsageError("say --confirm, --dismiss or --escalate")
    with runtime.session() as session:
        decision = service.decide(
            session, runtime.settings, hit_id, Outcome(outcome), note, cli_actor()
        )
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
@pass_runtime
def hits(
    runtime: Runtime, upload_id: int | None, limit: int, show_all: bool, as_json: bool
) -> None:
    """Show hits against the banks, newest first, with their evidence and review status
    (`moderation decide` decides them)."""
    every = QueueFilter(status=None, upload_id=upload_id)
    with runtime.session() as session:
        found = service.newest(session, runtime.settings, every, None if show_all else limit)
        cut = not show_all and len(found) == limit
        total = service.count(session, every) if cut else len(found)
    if as_json:
        emit_json(found)
    else:
        emit_hits(found)
    say_if_cut(len(found), total, "hits", as_json)


def emit_hits(found: list[service.HitEvidence]) -> None:
    """Hits as a table that fits 120 columns (`--json`, and `moderation upload ID`, say
    more: the model, the URI, who decided and why)."""
    emit_table(
        [{**vars(h), "found": "retro-hunt" if h.retroactive else "screening"} for h in found],
        [
            "hit_id", "upload_id", "bank", "bank_entry_id", "signal", "distance", "threshold",
            "frame_index", "found", "review_status",
        ],
        headers={
            "hit_id": "hit", "upload_id": "upload", "bank_entry_id": "entry",
            "frame_index": "frame", "review_status": "status",
        },
        widest={"bank": 24},
        empty="no hits",
    )  # fmt: skip


@click.command()
@click.argument("upload_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def upload(runtime: Runtime, upload_id: int, as_json: bool) -> None:
    """Show one upload: its status and error, what was decoded, its signals and its hits
    with their evidence and review status."""
    with runtime.session() as session:
        found = screening.get_upload(session, upload_id)
        signals = screening.upload_signals(session, upload_id)
        hits = service.upload_hits(session, runtime.settings, upload_id)
        shown = {
            **upload_json(found),
            "external_id": found.external_id,
            "attempts": found.attempts,
            "metadata": found.event_metadata,
            "decoded": (
                f"{found.media_format} {found.width}x{found.height}, "
                f"{found.frame_count} frame(s), {found.frames_hashed} hashed"
                if found.media_format
                else None
            ),
            "created_at": found.created_at,
            "finished_at": found.finished_at,
        }
    signal_rows = [
        {
            "signal": s.signal.value,
            "frame": "0 as stored" if s.frame_index == AS_STORED_FRAME else s.frame_index,
            "value": s.value.hex(),
            "quality": s.quality,
        }
        for s in signals
    ]
    if as_json:
        emit_json({**shown, "signals": signal_rows, "hits": hits})
        return
    for name, value in shown.items():
        if name == "error" and value:
            click.echo(f"error: {value['code']}: {value['message']}")
        elif value is not None:
            click.echo(f"{name}: {value}")
    click.echo()
    emit_table(signal_rows, ["signal", "frame", "quality", "value"], empty="no signals")
    click.echo()
    emit_hits(hits)
