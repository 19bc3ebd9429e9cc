"""Models and migrations must not drift: `upgrade head` must build exactly the models."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from moderation import schema
from moderation.banks import service as banks
from moderation.banks.models import BankEntry


def test_migrated_database_matches_the_models(database: str) -> None:
    assert schema.drift(database) == []


def test_migrations_downgrade_and_upgrade_cleanly(database: str) -> None:
    # Named after the test database, so that parallel runs (xdist, other checkouts) each
    # have their own.
    server, name = database.rsplit("/", 1)
    scratch = f"{name}_migrations"
    url = f"{server}/{scratch}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))
    try:
        schema.upgrade(url)
        command.downgrade(schema.alembic_config(url), "base")
        engine = create_engine(url)
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        engine.dispose()
        schema.upgrade(url)
        assert schema.drift(url) == []
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))
        admin.dispose()


def test_migration_files_are_named_by_date() -> None:
    names = sorted(p.name for p in (schema.MIGRATIONS_DIR / "versions").glob("*.py"))
    assert names
    for name in names:
        assert name[:8].isdigit(), name


@pytest.mark.parametrize("table", ["uploads", "hits", "bank_entries", "embeddings"])
def test_core_tables_exist(database: str, table: str) -> None:
    engine = create_engine(database)
    assert table in inspect(engine).get_table_names()
    engine.dispose()


@pytest.mark.parametrize(
    ("column", "value"),
    [("sha256", b"\x01" * 31), ("pdq", b"\x01" * 22), ("pdq_quality", 101)],
)
def test_malformed_bank_hashes_are_refused_by_the_database(
    session: Session, column: str, value: object
) -> None:
    bank = banks.create_bank(session, "strict")
    session.add(BankEntry(bank=bank, added_by="t", **{column: value}))
    with pytest.raises(IntegrityError, match="ck_bank_entries"):
        session.flush()
