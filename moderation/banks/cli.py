"""`moderation bank ...`: create banks and add known-bad entries to them."""

from __future__ import annotations

import getpass
from pathlib import Path

import click
import numpy as np

from moderation.audit.service import cli_actor
from moderation.banks import service
from moderation.console import emit_json, emit_table
from moderation.embedding import registry
from moderation.embedding.service import get_or_create_model, model_dim, normalise
from moderation.images.decode import DecodeLimits
from moderation.images.fetch import fetch, to_uri
from moderation.images.hashing import PdqHash, parse_hex
from moderation.images.uri_policy import UriPolicy
from moderation.runtime import Runtime, pass_runtime


@click.group()
def bank() -> None:
    """Banks of known-bad content (signals only, never the content)."""


@bank.command("create")
@click.argument("name")
@click.option("--radius", type=float, help="CLIP cosine distance for this bank (default: global).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def create(runtime: Runtime, name: str, radius: float | None, as_json: bool) -> None:
    """Create a bank called NAME."""
    with runtime.session() as session:
        created = service.create_bank(session, name, radius)
        service.audit_created(session, created, actor=cli_actor())
        row = {"id": created.id, "name": created.name, "radius": created.radius}
    if as_json:
        emit_json(row)
    else:
        click.echo(f"created bank {name} (id {row['id']})")


@bank.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_runtime
def list_(runtime: Runtime, as_json: bool) -> None:
    """List banks with their entry counts, and their CLIP entries per model: a worker
    matches only the entries embedded by its own model."""
    with runtime.session() as session:
        banks = service.list_banks(session)
    if as_json:
        emit_json(banks)
    else:
        rows = [
            {
                **vars(b),
                "clip_entries_by_model": ", ".join(f"{m}: {n}" for m, n in b.clip_entries.items())
                or None,
            }
            for b in banks
        ]
        emit_table(
            rows,
            ["id", "name", "radius", "enabled", "entries", "clip_entries_by_model"],
            empty="no banks",
        )


@bank.command("add")
@click.argument("name")
@click.argument("images", nargs=-1)
@click.option(
    "--embedding",
    "embedding_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A .npy of one embedding (d,) or several (n, d) from the configured model.",
)
@click.option("--pdq", "pdq_hashes", multiple=True, help="A PDQ hash, 64 hex digits (repeatable).")
@click.option(
    "--sha256", "sha256_hashes", multiple=True, help="A SHA-256, 64 hex digits (repeatable)."
)
@click.option(
    "--source-ref", help="Where the source lives in restricted storage (default: the image path)."
)
@click.option("--added-by", default=lambda: f"cli:{getpass.getuser()}", show_default="cli:$USER")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the new entries with their id.")
@pass_runtime
def add(
    runtime: Runtime,
    name: str,
    images: tuple[str, ...],
    embedding_file: Path | None,
    pdq_hashes: tuple[str, ...],
    sha256_hashes: tuple[str, ...],
    source_ref: str | None,
    added_by: str,
    as_json: bool,
) -> None:
    """Add entries to bank NAME: from IMAGES, an embedding file, or hashes. A retro-hunt
    then searches the uploads screened before them, in the background (`moderation
    retrohunt wait --bank NAME` waits for it)."""
    if not (images or embedding_file or pdq_hashes or sha256_hashes):
        raise click.UsageError("give IMAGES, --embedding, --pdq or --sha256")
    entries = [
        *(service.NewEntry(sha256=parse_hex(h, length=32, what="SHA-256")) for h in sha256_hashes),
        *(
            service.NewEntry(pdq=PdqHash(parse_hex(h, length=32, what="PDQ"), None))
            for h in pdq_hashes
        ),
    ]
    if images or embedding_file:
        entries += _model_entries(runtime, images, embedding_file, source_ref)
    with runtime.session() as session:
        target = service.get_bank(session, name)
        rows = service.add_entries(session, target, entries, added_by=added_by)
        service.audit_added(session, target, rows, actor=cli_actor(), how="cli")
        added = [
            {
                "id": r.id,
                "bank": name,
                "sha256": r.sha256,
                "pdq": r.pdq,
                "pdq_quality": r.pdq_quality,
                "embedding": bool(r.embeddings),
                "source_ref": r.source_ref,
            }
            for r in rows
        ]
    if as_json:
        emit_json(added)
    else:
        ids = ", ".join(str(a["id"]) for a in added)
        if len(added) == 1:
            click.echo(f"added 1 entry to {name}: id {ids}")
        else:
            click.echo(f"added {len(added)} entries to {name}: ids {ids}")
        if target.enabled:
            click.echo(
                "a retro-hunt searches past uploads for them in the background: "
                f"`moderation retrohunt wait --bank {name}`"
            )


@bank.command("remove")
@click.argument("name")
@click.argument("entry_ids", nargs=-1, required=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: what was removed.")
@pass_runtime
def remove(runtime: Runtime, name: str, entry_ids: tuple[int, ...], as_json: bool) -> None:
    """Remove entries ENTRY_IDS from bank NAME, with their hits no reviewer confirmed or
    escalated (an entry that has such hits is kept). Recorded in the audit log; all or
    none."""
    with runtime.session() as session:
        target = service.get_bank(session, name)
        removed = [
            service.remove_entry(session, target, entry_id, actor=cli_actor())
            for entry_id in entry_ids
        ]
    if as_json:
        emit_json(removed)
    else:
        for entry in removed:
            click.echo(
                f"removed entry {entry['bank_entry_id']} from {name} "
                f"(and {entry['hits']} undecided hit(s))"
            )


def _model_entries(
    runtime: Runtime, images: tuple[str, ...], embedding_file: Path | None, source_ref: str | None
) -> list[service.NewEntry]:
    """Entries that carry an embedding, tied to the active model (the configured one
    where the registry has none yet)."""
    # Imported here: torch and transformers take seconds to load, and most commands
    # never run a model.
    from moderation.embedding.families import open_embedder

    settings = runtime.settings
    entries: list[service.NewEntry] = []
    with runtime.session() as session:
        name = registry.serving_name(session, settings.resolved_model())
    if embedding_file is not None:
        vectors = normalise(np.load(embedding_file, allow_pickle=False))
        with runtime.session() as session:
            model = get_or_create_model(session, name, model_dim(name))
        entries += [
            service.NewEntry(embedding=v, model=model, source_ref=source_ref) for v in vectors
        ]
    if images:
        embedder = open_embedder(name, settings.resolved_device())
        limits = DecodeLimits.from_settings(settings)
        # The operator's own files, named on their command line (see `allowing_files`).
        policy = UriPolicy.from_settings(settings).allowing_files(images)
        with runtime.session() as session:
            model = registry.registered(session, embedder)
        for image in images:
            uri = to_uri(image)
            data = fetch(
                uri, policy=policy, max_bytes=settings.max_bytes, timeout_s=settings.fetch_timeout_s
            )
            entries.append(
                service.entry_from_image(data, embedder, model, limits, source_ref or uri)
            )
    return entries
