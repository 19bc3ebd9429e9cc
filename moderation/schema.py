"""Alembic, configured in code: `moderation db upgrade` and the models/migrations drift check."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from moderation.db import ensure_database

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Date-first names sort in the order they were written.
    config.set_main_option("file_template", "%%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s")
    config.set_main_option("sqlalchemy.url", url)
    return config


def upgrade(url: str) -> str:
    """Create the database at `url` if needed and apply every migration; the revision it is
    at."""
    ensure_database(url)
    config = alembic_config(url)
    command.upgrade(config, "head")
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def drift(url: str) -> list[object]:
    """Differences between the ORM models and the database migrated at `url`; empty when
    they agree."""
    from moderation.models import Base

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()
