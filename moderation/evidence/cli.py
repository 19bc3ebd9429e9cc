"""`moderation evidence new-key | hold | release | export`: the evidence key, legal holds,
and a report's files. Every read and every hold is audited as the OS user."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moderation.audit.service import cli_actor
from moderation.errors import Unavailable
from moderation.evidence import service
from moderation.evidence.sealing import new_key
from moderation.evidence.vault import Vault
from moderation.runtime import Runtime, pass_runtime


@click.group()
def evidence() -> None:
    """What screening kept of uploads that hit (docs/evidence.md)."""


@evidence.command("new-key")
def new_key_command() -> None:
    """Print a fresh key for MODERATION_EVIDENCE_KEY (keep the old one in
    MODERATION_EVIDENCE_PREVIOUS_KEYS while its blobs are retained)."""
    click.echo(new_key())


@evidence.command()
@click.argument("upload_id", type=int)
@click.option("--reason", required=True, help="Why, for the audit log.")
@pass_runtime
def hold(runtime: Runtime, upload_id: int, reason: str) -> None:
    """Keep an upload's evidence past its retention until released."""
    with runtime.session() as session:
        held = service.hold(session, upload_id, actor=cli_actor(), reason=reason)
    click.echo(f"upload {upload_id}: {'held' if held else 'no evidence, or already held'}")


@evidence.command()
@click.argument("upload_id", type=int)
@pass_runtime
def release(runtime: Runtime, upload_id: int) -> None:
    """Lift a legal hold: the evidence goes at the end of its retention."""
    with runtime.session() as session:
        released = service.release(session, upload_id, actor=cli_actor())
    click.echo(f"upload {upload_id}: {'released' if released else 'was not held'}")


@evidence.command()
@click.argument("upload_id", type=int)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@pass_runtime
def export(runtime: Runtime, upload_id: int, directory: Path) -> None:
    """Write an upload's kept frames (JPEG) and screening's report (JSON) to DIRECTORY,
    for a report to an authority; the read is audited."""
    vault = Vault.from_settings(runtime.settings)
    if vault is None:
        raise Unavailable("no evidence key is configured (MODERATION_EVIDENCE_KEY)")
    with runtime.session() as session:
        kept = service.evidence_of(session, upload_id)
        frames = kept.frames if kept is not None else []
        images = service.read_frames(
            session, vault, upload_id, frames, actor=cli_actor(), purpose="export"
        )
        report = service.read_report(session, vault, upload_id, actor=cli_actor())
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for frame, data in zip(frames, images, strict=True):
        (directory / f"frame-{frame}.jpg").write_bytes(data)
    (directory / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    click.echo(f"upload {upload_id}: {len(frames)} frame(s) and report.json in {directory}")
