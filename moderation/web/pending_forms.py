"""Decision forms that outlived their session.

A reviewer who writes a note and presses Confirm after their session expired (or was
ended) must not lose either. The access check answers such a post 401; the pages' 401
handler keeps the form's fields here under a fresh one-time token (only its SHA-256 is
stored) and sends the browser to the login form with `next=/review/resume/<token>`. Once
logged in, that page gives the reviewer their form back, filled in as they left it, to
send again (nothing is decided without them pressing the button on a page of their new
session, so a forged stash decides nothing). The page may be shown again (a reload, a
browser that prefetches the address after the login): the kept form is discarded when the
decision it gave back is sent (its token rides in the form, `RESUMED_FIELD`), or when it
expires.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from moderation.web.models import PendingForm

# The fields of a decision form worth keeping; anything else a post carries is dropped.
KEPT_FIELDS = ("outcome", "note", "seen", "state", "back")
# At most this many characters of a field are kept (the form's own limits are smaller,
# except `seen`, a list of hit ids).
MAX_FIELD = 200_000


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def keep(session: Session, action: str, fields: dict[str, str], *, lifetime: timedelta) -> str:
    """Keep a form posted to `action`; the token that gets it back."""
    now = datetime.now(UTC)
    session.execute(delete(PendingForm).where(PendingForm.expires_at < now))
    token = secrets.token_urlsafe(24)
    kept = {name: fields[name][:MAX_FIELD] for name in KEPT_FIELDS if name in fields}
    session.add(
        PendingForm(token_hash=_hash(token), action=action, fields=kept, expires_at=now + lifetime)
    )
    session.flush()
    return token


# The field of a given-back form that carries its token, so that sending it discards it.
RESUMED_FIELD = "resumed"


def find(session: Session, token: str) -> PendingForm | None:
    """The form kept under `token`; None if unknown, expired or already sent."""
    return session.scalar(
        select(PendingForm).where(
            PendingForm.token_hash == _hash(token), PendingForm.expires_at > datetime.now(UTC)
        )
    )


def discard(session: Session, token: str) -> None:
    """Forget the form kept under `token`: its decision has been sent."""
    session.execute(delete(PendingForm).where(PendingForm.token_hash == _hash(token)))
