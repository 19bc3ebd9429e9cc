"""`moderation model add|list|activate|retire`: the registry from the command line."""

from __future__ import annotations

import dataclasses
import json

import click

from moderation.audit.service import cli_actor
from moderation.db import session_scope
from moderation.embedding import registry
from moderation.embedding.service import ModelMismatch
from moderation.lifecycle import service


@click.command("add")
@click.argument("name_or_path")
def add(name_or_path: str) -> None:
    """Register a checkpoint (local directory or Hugging Face id) as a candidate: every
    worker computes it beside the active model from then on (within MODERATION_MODEL_POLL_S).
    Its weights are loaded here once, for their fingerprint."""
    from moderation.embedding.families import open_embedder

    embedder = open_embedder(name_or_path)
    fingerprint = embedder.fingerprint
    try:
        with session_scope() as session:
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
def list_(as_json: bool) -> None:
    """The registered models, what each has embedded, and its state."""
    with session_scope() as session:
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


@click.command("activate")
@click.argument("name")
def activate(name: str) -> None:
    """Make a candidate the active model: searches answer with it within
    MODERATION_MODEL_POLL_S. The previous active model stays computed, as a candidate,
    until it is retired."""
    try:
        with session_scope() as session:
            model = registry.activate(session, name, actor=cli_actor())
            shown = model.name
    except (registry.BadTransition, registry.ModelNotFound) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"active model: {shown}")


@click.command("retire")
@click.argument("name")
@click.option(
    "--force", is_flag=True, help="Retire even if bank entries lose their only CLIP embedding."
)
def retire(name: str, force: bool) -> None:
    """Stop computing a model. Refused while bank entries have a CLIP embedding under it
    and under no other computed model, unless --force."""
    try:
        with session_scope() as session:
            model = service.retire(session, name, actor=cli_actor(), force=force)
            shown = model.name
    except (service.CoverageLost, registry.BadTransition, registry.ModelNotFound) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"retired: {shown}")


COMMANDS = (add, list_, activate, retire)
