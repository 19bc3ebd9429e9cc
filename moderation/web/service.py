"""Logging in and out of the web pages, and the session cookie's checks.

A login trades an API key for a session: a random token in a cookie, whose SHA-256 is a
`WebSession` row naming the key. Every request with the cookie is checked against the row
and the key, so logging out, the session expiring or the key being revoked ends it at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.auth import service as auth
from moderation.auth.models import ApiKey
from moderation.web.models import WebSession

COOKIE_NAME = "moderation_session"
# Session tokens carry this prefix so that the cookie source never confuses one with a key.
TOKEN_PREFIX = "mws_"
# Expired sessions are deleted this long after they expire (kept a while for inquiries).
PRUNE_AFTER = timedelta(days=30)


@dataclass(frozen=True)
class Login:
    principal: auth.Principal
    # The cookie's value: shown to the browser once, stored only as its hash.
    token: str
    expires_at: datetime


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def log_in(session: Session, secret: str, *, lifetime: timedelta) -> Login | None:
    """A new session for a valid key; None for an unknown or revoked key."""
    principal = auth.authenticate(session, secret)
    if principal is None:
        return None
    now = datetime.now(UTC)
    # Sessions long dead are of no use to anyone: each login clears them away.
    session.execute(delete(WebSession).where(WebSession.expires_at < now - PRUNE_AFTER))
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires_at = now + lifetime
    row = WebSession(token_hash=_hash(token), api_key_id=principal.key_id, expires_at=expires_at)
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor=principal.actor,
        action="web.login",
        subject_type="web_session",
        subject_id=row.id,
        after={"expires_at": expires_at.isoformat()},
    )
    return Login(principal=principal, token=token, expires_at=expires_at)


def authenticate(session: Session, token: str) -> auth.Principal | None:
    """The principal of a live session: not logged out, not expired, its key not revoked."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    key = session.scalar(
        select(ApiKey)
        .join(WebSession, WebSession.api_key_id == ApiKey.id)
        .where(
            WebSession.token_hash == _hash(token),
            WebSession.revoked_at.is_(None),
            WebSession.expires_at > datetime.now(UTC),
            ApiKey.revoked_at.is_(None),
        )
    )
    if key is None:
        return None
    return auth.Principal(key_id=key.id, name=key.name, role=key.role)


def log_out(session: Session, token: str, *, actor: str) -> bool:
    """End the session the token names; False if it was not live."""
    ended = session.scalar(
        update(WebSession)
        .where(WebSession.token_hash == _hash(token), WebSession.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
        .returning(WebSession.id)
    )
    if ended is None:
        return False
    audit.record(
        session, actor=actor, action="web.logout", subject_type="web_session", subject_id=ended
    )
    return True


def csrf_token(token: str) -> str:
    """The anti-forgery token of a session, put into each form it renders.

    Derived from the session token, which only the browser holds (the cookie is HttpOnly),
    so a page on another site can neither read nor compute it; nothing to store.
    """
    return hashlib.sha256(b"csrf\x00" + token.encode()).hexdigest()


def csrf_matches(token: str, submitted: str) -> bool:
    return hmac.compare_digest(csrf_token(token), submitted)
