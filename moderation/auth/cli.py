"""`moderation apikey create | list | revoke`."""

from __future__ import annotations

import click

from moderation.audit.service import cli_actor
from moderation.auth import service
from moderation.auth.models import Role
from moderation.console import emit_json, emit_table
from moderation.runtime import Runtime, pass_runtime


@click.group()
def apikey() -> None:
    """API keys for the HTTP API and the review pages."""


@apikey.command()
@click.option(
    "--role", required=True, type=click.Choice([role.value for role in Role]), help="What it may do"
)
@click.option("--name", default=None, help="Whose key it is (the audit log's actor).")
@pass_runtime
def create(runtime: Runtime, role: str, name: str | None) -> None:
    """Make a key and print it, once: only its hash is stored."""
    with runtime.session() as session:
        key, secret = service.create_key(
            session, role=Role(role), name=name or f"{role} key", actor=cli_actor()
        )
    click.echo(f"created API key {key.id} ({key.name}, role {key.role.value}); it is shown once:")
    click.echo(secret)


@apikey.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_runtime
def list_(runtime: Runtime, include_revoked: bool, as_json: bool) -> None:
    """Keys, oldest first (never their secrets)."""
    with runtime.session() as session:
        keys = service.list_keys(session, include_revoked=include_revoked)
    rows = [
        {
            "id": key.id,
            "name": key.name,
            "role": key.role.value,
            "prefix": key.prefix,
            "created": key.created_at,
            "last_used": key.last_used_at,
            "revoked": key.revoked_at,
        }
        for key in keys
    ]
    if as_json:
        emit_json(rows)
    else:
        emit_table(
            rows,
            list(rows[0]) if rows else [],
            empty="no API keys; make one with `moderation apikey create --role R`",
        )


@apikey.command()
@click.argument("key_id", type=int)
@pass_runtime
def revoke(runtime: Runtime, key_id: int) -> None:
    """Revoke a key at once; requests with it are refused from now on."""
    with runtime.session() as session:
        key = service.revoke_key(session, key_id, actor=cli_actor())
    click.echo(f"revoked API key {key.id} ({key.name})")
