"""Making, listing, revoking and checking API keys. Every change is audited in its own
transaction; a key's secret exists only in the value returned by `create_key`."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.auth.models import ApiKey, Role
from moderation.errors import NotFound

# Every key starts with this, so a leaked key is recognisable (secret scanners, logs).
KEY_PREFIX = "mod_"
# Characters of a key shown in listings: the prefix and a few random ones.
SHOWN_CHARACTERS = 12
# A key's `last_used_at` is written at most this often, not on every request.
LAST_USED_RESOLUTION_S = 60.0


class KeyNotFound(NotFound):
    code = "key_not_found"

    def __init__(self, key_id: int) -> None:
        super().__init__(f"no API key with id {key_id}; `moderation apikey list` shows them")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key that authenticated the request."""

    key_id: int
    name: str
    role: Role

    @property
    def actor(self) -> str:
        """The name under which the audit log records what this caller does."""
        return f"key:{self.key_id}:{self.name}"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def create_key(session: Session, *, role: Role, name: str, actor: str) -> tuple[ApiKey, str]:
    """A new key and its secret, which is returned here once and never stored."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        name=name,
        role=role,
        key_hash=hash_key(secret),
        prefix=secret[:SHOWN_CHARACTERS],
        created_by=actor,
    )
    session.add(key)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="apikey.create",
        subject_type="api_key",
        subject_id=key.id,
        after={"name": name, "role": role.value, "prefix": key.prefix},
    )
    return key, secret


def list_keys(session: Session, *, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_key(session: Session, key_id: int, *, actor: str) -> ApiKey:
    """Revoke a key; revoking one already revoked changes nothing and is not audited again."""
    key = session.get(ApiKey, key_id, with_for_update=True)
    if key is None:
        raise KeyNotFound(key_id)
    if key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        audit.record(
            session,
            actor=actor,
            action="apikey.revoke",
            subject_type="api_key",
            subject_id=key.id,
            before={"name": key.name, "role": key.role.value, "revoked": False},
            after={"name": key.name, "role": key.role.value, "revoked": True},
        )
    return key


def authenticate(session: Session, secret: str) -> Principal | None:
    """The principal a key stands for, or None for an unknown or revoked key."""
    if not secret.startswith(KEY_PREFIX):
        return None
    # Columns, not the entity: this runs on every request, and an ORM object costs more.
    key = session.execute(
        select(ApiKey.id, ApiKey.name, ApiKey.role, ApiKey.last_used_at).where(
            ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None)
        )
    ).first()
    if key is None:
        return None
    now = datetime.now(UTC)
    last_used = key.last_used_at
    if last_used is None or (now - last_used).total_seconds() > LAST_USED_RESOLUTION_S:
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
    return Principal(key_id=key.id, name=key.name, role=key.role)
