"""Errors of the infrastructure, told to an operator as one line with the fix.

`moderation`'s command group passes every exception through `explain` (see `cli.py`), so
no command handles these itself. What it does not recognise is raised unchanged: a bug
keeps its traceback.
"""

from __future__ import annotations

import kombu.exceptions
import redis.exceptions
from click import ClickException
from pydantic import ValidationError
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from moderation.config import Settings
from moderation.errors import ModerationError

# psycopg2's SQLSTATEs for a table and a column that do not exist: a schema behind the code.
_UNDEFINED_TABLE = "42P01"
_UNDEFINED_COLUMN = "42703"


def _sweeper_note(service: str) -> str:
    return (
        "uploads already recorded stay queued in PostgreSQL, and a worker's sweeper re-sends "
        f"them once {service} is back (or run `moderation sweep`)"
    )


class ServiceUnavailable(ClickException):
    """PostgreSQL or Redis cannot be reached, or the database is not set up."""

    exit_code = 4


def redacted(url: str) -> str:
    """A URL as it can be shown: any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(an unparseable URL)"


def explain(error: BaseException, settings: Settings | None) -> ClickException | None:
    """The one line an operator needs for `error`, or None if it is not one of ours.
    `settings`: the command's (None when they could not be read: only that is told)."""
    if isinstance(error, ValidationError) and error.title == Settings.__name__:
        return ClickException(f"bad settings: {settings_problems(error)}")
    if isinstance(error, ModerationError):
        # Typed, with a message a person can act on (`moderation.errors`).
        return ClickException(str(error))
    if settings is None:
        return None
    if isinstance(error, DBAPIError):
        return _database(error, settings.database_url)
    if isinstance(
        error,
        kombu.exceptions.OperationalError
        | redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError,
    ):
        return ServiceUnavailable(
            f"cannot reach Redis at {redacted(settings.redis_url)} ({_first_line(error)}); "
            f"start it or set MODERATION_REDIS_URL; {_sweeper_note('Redis')}"
        )
    return None


def _database(error: DBAPIError, url: str) -> ClickException | None:
    shown = redacted(url)
    name = make_url(url).database
    reason = _first_line(error.orig) if error.orig is not None else _first_line(error)
    code = getattr(error.orig, "pgcode", None)
    if code in (_UNDEFINED_TABLE, _UNDEFINED_COLUMN):
        state = _migration_state(url)
        if state is None:
            return None  # migrated to the latest after all: not a schema problem
        return ServiceUnavailable(
            f"database {name!r} at {shown} {state}: run `moderation db upgrade`"
        )
    if code is not None:
        return None  # the server answered with an error: not the infrastructure
    if f'database "{name}" does not exist' in reason:
        return ServiceUnavailable(
            f"database {name!r} does not exist at {shown}: run `moderation db upgrade`"
        )
    return ServiceUnavailable(
        f"cannot reach PostgreSQL at {shown} ({reason}); start it or set "
        f"MODERATION_DATABASE_URL; {_sweeper_note('PostgreSQL')}"
    )


def _migration_state(url: str) -> str | None:
    """How far behind the latest migration the database is; None if it is not behind."""
    from alembic.script import ScriptDirectory

    from moderation.schema import alembic_config

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except SQLAlchemyError:
        return "has no schema"
    finally:
        engine.dispose()
    if current == head:
        return None
    return f"is at migration {current}, not the latest ({head})"


def settings_problems(error: ValidationError) -> str:
    """Each invalid setting by its environment variable, with what is wrong; never the value
    (it may be a secret)."""
    prefix = Settings.model_config.get("env_prefix", "")
    return "; ".join(
        f"{prefix}{'_'.join(str(part) for part in problem['loc']).upper()}: {problem['msg']}"
        for problem in error.errors(include_input=False, include_url=False)
    )


def _first_line(error: BaseException) -> str:
    message = str(error).strip()
    return message.splitlines()[0].strip() if message else type(error).__name__
