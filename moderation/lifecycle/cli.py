"""`moderation model add|list|activate|retire`: the registry from the command line."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import click

from moderation.audit.service import cli_actor
from moderation.console import emit_json, emit_table
from moderation.embedding import registry
from moderation.embedding.service import ModelMismatch
from moderation.lifecycle import reembed as jobs
from moderation.lifecycle import service
from moderation.lifecycle.models import FINAL_REEMBED_STATUSES
from moderation.lifecycle.tasks import send_steps
from moderation.runtime import Runtime, pass_runtime


@click.command("add")
@click.argument("name_or_path")
@pass_runtime
def add(runtime: Runtime, name_or_path: str) -> None:
    """Register a checkpoint (local directory or Hugging Face id) as a candidate: every
    worker computes it beside the active model from then on (within MODERATION_MODEL_POLL_S).
    Its weights are loaded here once, for their fingerprint."""
    from moderation.embedding.families import open_embedder

    embedder = open_embedder(name_or_path)
    fingerprint = embedder.fingerprint
    try:
        with runtime.session() as session:
            model, changed = registry.add(
                session,
                name_or_path,
                family=embedder.family,
                dim=embedder.dim,
                fingerprint=fingerprint,
                actor=cli_actor(),
            )
            name, state, model_id = model.name, model.state.value, model.id
    except ModelMismatch as error:
        raise click.ClickException(str(error)) from None
    what = "registered" if changed else "already registered"
    click.echo(
        f"{what}: model {model_id} {name} ({embedder.family}, {embedder.dim}-d, "
        f"fingerprint {fingerprint[:12]}), {state}"
    )


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@pass_runtime
def list_(runtime: Runtime, as_json: bool) -> None:
    """The registered models, what each has embedded, and its state."""
    with runtime.session() as session:
        models = service.list_models(session)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(m) for m in models], default=str, indent=2))
        return
    click.echo(
        f"{'ID':>4}  {'STATE':9}  {'FAMILY':6}  {'DIM':>4}  {'FINGERPRINT':12}  "
        f"{'EMBEDDINGS':>10}  {'BANK_ENTRIES':>12}  NAME"
    )
    for m in models:
        click.echo(
            f"{m.id:>4}  {m.state:9}  {m.family or '?':6}  {m.dim:>4}  "
            f"{(m.fingerprint or '?')[:12]:12}  {m.embeddings:>10}  {m.bank_entries:>12}  {m.name}"
        )


@click.command("retire")
@click.argument("name")
@click.option(
    "--force", is_flag=True, help="Retire even if bank entries lose their only CLIP embedding."
)
@pass_runtime
def retire(runtime: Runtime, name: str, force: bool) -> None:
    """Stop computing a model. Refused while bank entries have a CLIP embedding under it
    and under no other computed model, unless --force."""
    try:
        with runtime.session() as session:
            model = service.retire(session, name, actor=cli_actor(), force=force)
            shown = model.name
    except (service.CoverageLost, registry.BadTransition, registry.ModelNotFound) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"retired: {shown}")


# `model activate` is the evaluation domain's: it judges the candidate on the golden set.
COMMANDS = (add, list_, retire)


# `--wait` reports progress this often on stderr.
_PROGRESS_EVERY_S = 5.0
# Exit status when `--wait` runs out of time (as `submit --wait`).
EXIT_TIMED_OUT = 3


@click.group(invoke_without_command=True)
@click.option("--model", "model_name", help="Start (or resume) re-embedding under this model.")
@click.option("--wait", is_flag=True, help="Wait until the job has finished, showing progress.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@click.option(
    "--duty",
    type=click.FloatRange(0, 1, min_open=True),
    help="Share of each worker's time the job may take (default: MODERATION_REEMBED_DUTY).",
)
@pass_runtime
def reembed(
    runtime: Runtime,
    model_name: str | None,
    wait: bool,
    timeout: float | None,
    duty: float | None,
) -> None:
    """Re-embed every screened upload and every bank entry with a source under a model
    (a candidate, before it is activated), in the background, on the workers."""
    if click.get_current_context().invoked_subcommand is not None:
        return
    if model_name is None:
        raise click.UsageError("give --model NAME, or a command (list, show)")
    try:
        with runtime.session() as session:
            job, new = jobs.start(session, model_name, actor=cli_actor(), duty=duty)
            job_id, step = job.id, job.step
    except (jobs.NotReembeddable, registry.ModelNotFound) as error:
        raise click.ClickException(str(error)) from None
    if new:
        send_steps(runtime, [jobs.NextStep(job_id, step)])
        click.echo(f"started re-embedding job {job_id}")
    else:
        click.echo(f"re-embedding job {job_id} for this model is already running")
    if wait:
        _wait(runtime, job_id, timeout)


def _wait(runtime: Runtime, job_id: int, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    reported = 0.0
    while True:
        with runtime.session() as session:
            view = jobs.get_job(session, job_id)
        if view.status in {s.value for s in FINAL_REEMBED_STATUSES}:
            click.echo(_progress(view))
            if view.status != "done":
                sys.exit(1)
            return
        if time.monotonic() - reported >= _PROGRESS_EVERY_S:
            click.echo(_progress(view), err=True)
            reported = time.monotonic()
        if deadline is not None and time.monotonic() > deadline:
            click.echo(f"re-embedding job {job_id} has not finished: {_progress(view)}", err=True)
            sys.exit(EXIT_TIMED_OUT)
        time.sleep(0.5)


def _progress(view: jobs.JobView) -> str:
    total = "?" if view.total is None else f"{view.total:,}"
    rate = "" if view.rate_per_s is None else f", {view.rate_per_s:.1f}/s"
    eta = "" if view.eta_s is None else f", ETA {view.eta_s:.0f} s"
    failed = ", ".join(f"{reason}: {n}" for reason, n in sorted(view.failures.items()))
    return (
        f"job {view.id} ({view.model}) {view.status}: {view.done:,} of {total} done "
        f"({view.embedded:,} embedded{rate}{eta})" + (f"; failed: {failed}" if failed else "")
    )


@reembed.command("list")
@click.option("--limit", default=100, show_default=True, help="Newest jobs shown.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def reembed_list(runtime: Runtime, limit: int, as_json: bool) -> None:
    """Show re-embedding jobs, newest first, with their progress."""
    with runtime.session() as session:
        views = jobs.list_jobs(session, limit=limit)
    if as_json:
        emit_json([dataclasses.asdict(v) for v in views])
        return
    emit_table(
        [{**dataclasses.asdict(v), "progress": _progress(v)} for v in views],
        ["id", "model", "status", "done", "total", "embedded", "failures", "created_at"],
        empty="no re-embedding jobs",
    )


@reembed.command("show")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def reembed_show(runtime: Runtime, job_id: int, as_json: bool) -> None:
    """Show one job, its progress, and the items it could not embed (with why)."""
    try:
        with runtime.session() as session:
            view = jobs.get_job(session, job_id)
            failed = [
                {
                    "upload_id": f.upload_id,
                    "bank_entry_id": f.bank_entry_id,
                    "reason": f.reason,
                    "message": f.message,
                }
                for f in jobs.failures(session, job_id)
            ]
    except jobs.JobNotFound as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        emit_json({**dataclasses.asdict(view), "failed_items": failed})
        return
    click.echo(_progress(view))
    if failed:
        emit_table(failed, ["upload_id", "bank_entry_id", "reason", "message"], empty="")
