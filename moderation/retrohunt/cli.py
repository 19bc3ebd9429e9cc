"""`moderation retrohunt ...`: the jobs that search past uploads for new bank entries."""

from __future__ import annotations

import getpass
import sys
import time
from collections.abc import Sequence

import click

from moderation.banks import service as banks
from moderation.console import emit_json, emit_table
from moderation.retrohunt import service, tasks
from moderation.retrohunt.models import FINAL_JOB_STATUSES, JobStatus
from moderation.runtime import Runtime, pass_runtime

# `--wait` reports progress this often on stderr.
_PROGRESS_EVERY_S = 5.0
# How long `wait` lets transactions that may still add entries end before it starts hunts.
_SETTLE_WAIT_S = 30.0
# Exit status when `--wait` runs out of time (as `submit --wait`).
EXIT_TIMED_OUT = 3


@click.group()
def retrohunt() -> None:
    """Retro-hunt jobs: past uploads searched for bank entries added after them."""


@retrohunt.command("list")
@click.option("--status", type=click.Choice([s.value for s in JobStatus]), help="Only this status.")
@click.option("--limit", default=100, show_default=True, help="Newest jobs shown.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def list_(runtime: Runtime, status: str | None, limit: int, as_json: bool) -> None:
    """Show jobs, newest first, with their progress."""
    with runtime.session() as session:
        jobs = service.list_jobs(session, status=JobStatus(status) if status else None, limit=limit)
    if as_json:
        emit_json([_json(job) for job in jobs])
        return
    emit_table(
        [{**vars(job), "progress": job.progress} for job in jobs],
        ["id", "bank", "status", "entries", "progress", "hits_found", "created_at", "error"],
        empty="no retro-hunt jobs",
    )


@retrohunt.command("show")
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def show(runtime: Runtime, job_id: int, as_json: bool) -> None:
    """Show one job and its progress."""
    with runtime.session() as session:
        job = service.get_job(session, job_id)
    if as_json:
        emit_json(_json(job))
        return
    for name, value in _json(job).items():
        click.echo(f"{name}: {'-' if value is None else value}")


@retrohunt.command("start")
@pass_runtime
@click.argument("bank_name", metavar="BANK")
@click.option("--wait", is_flag=True, help="Wait until the job has finished, showing progress.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@click.option("--added-by", default=lambda: f"cli:{getpass.getuser()}", show_default="cli:$USER")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def start(
    runtime: Runtime,
    bank_name: str,
    wait: bool,
    timeout: float | None,
    added_by: str,
    as_json: bool,
) -> None:
    """Hunt past uploads for every entry of BANK (e.g. after it was enabled again)."""
    with runtime.session() as session:
        job_id = service.hunt_bank(
            session, banks.get_bank(session, bank_name), created_by=added_by
        ).id
    tasks.send_steps(runtime, [service.NextStep(job_id, 0)])
    if not as_json:
        click.echo(f"retro-hunt job {job_id} started for every entry of {bank_name}")
    finished = wait_for_jobs(runtime, [job_id], timeout, quiet=as_json) if wait else None
    if as_json:
        with runtime.session() as session:
            emit_json(_json(service.get_job(session, job_id)))
    if finished is not None:
        exit_for(finished)


@retrohunt.command("wait")
@pass_runtime
@click.option("--bank", "bank_name", help="Only this bank's jobs.")
@click.option("--timeout", type=float, help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the jobs waited for.")
def wait(runtime: Runtime, bank_name: str | None, timeout: float | None, as_json: bool) -> None:
    """Wait until every unfinished job (of BANK) has finished, showing progress; jobs for
    entries already added are started first, without waiting for a worker's sweeper.
    Exits 3 on timeout, 1 if a job failed."""
    if tasks.start_hunts(runtime, settle_wait_s=_SETTLE_WAIT_S) is None:
        click.echo(
            "could not start hunts for the latest entries yet (a long transaction is running "
            "on the database server); workers' sweepers will start them once it ends",
            err=True,
        )
    with runtime.session() as session:
        bank = banks.get_bank(session, bank_name) if bank_name else None
        job_ids = service.unfinished_jobs(session, bank_id=bank.id if bank else None)
    finished = wait_for_jobs(runtime, job_ids, timeout, quiet=as_json)
    if as_json:
        emit_json([_json(job) for job in finished or []])
    exit_for(finished)


def wait_for_jobs(
    runtime: Runtime, job_ids: Sequence[int], timeout_s: float | None, *, quiet: bool = False
) -> list[service.JobView] | None:
    """Wait until the jobs are final, reporting progress on stderr every few seconds
    (not if `quiet`). Returns the jobs, or None if `timeout_s` passed first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    reported = 0.0
    while True:
        with runtime.session() as session:
            jobs = [service.get_job(session, job_id) for job_id in job_ids]
        if all(JobStatus(job.status) in FINAL_JOB_STATUSES for job in jobs):
            return jobs
        now = time.monotonic()
        if not quiet and now - reported >= _PROGRESS_EVERY_S:
            for job in jobs:
                click.echo(
                    f"retro-hunt job {job.id}: {job.status}, {job.progress}, "
                    f"{job.hits_found} hit(s) so far",
                    err=True,
                )
            reported = now
        if deadline is not None and now >= deadline:
            return None
        time.sleep(0.5)


def exit_for(jobs: list[service.JobView] | None) -> None:
    """Exit 3 if waiting timed out, 1 if a job failed; say how each ended on stderr."""
    if jobs is None:
        click.echo("timed out waiting for the retro-hunt; it goes on in the background", err=True)
        sys.exit(EXIT_TIMED_OUT)
    for job in jobs:
        click.echo(
            f"retro-hunt job {job.id} {job.status}: {job.progress}, {job.hits_found} new hit(s)"
            + (f"; {job.error}" if job.error else ""),
            err=True,
        )
    if any(job.status == JobStatus.FAILED for job in jobs):
        sys.exit(1)


def _json(job: service.JobView) -> dict[str, object]:
    return {**vars(job), "progress": job.progress}
