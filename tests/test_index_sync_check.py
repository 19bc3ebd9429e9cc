"""`moderation index sync --check`, the sync's health check (the compose file's): healthy
only while every Milvus collection's last completed pass is recent; read from PostgreSQL
alone, so it answers while Milvus is away."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from click.testing import CliRunner
from sqlalchemy import delete

from moderation.main.cli import main
from moderation.search.models import MilvusSyncState
from tests.conftest import TEST_RUNTIME
from tests.search_fixtures import tiny_model


def _check() -> tuple[int, str]:
    result = CliRunner().invoke(main, ["index", "sync", "--check"], obj=TEST_RUNTIME)
    return result.exit_code, result.output


def test_the_check_fails_until_a_pass_completes_and_when_the_last_is_old(clean_db: None) -> None:
    with TEST_RUNTIME.session() as session:
        session.execute(delete(MilvusSyncState))
    code, output = _check()
    assert (code, "no collection is synced yet" in output) == (1, True)

    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        state = MilvusSyncState(collection="check_m1_1", model_id=model.id, synced_through=None)
        session.add(state)
    code, output = _check()
    assert code == 1
    assert "check_m1_1" in output
    assert "no pass completed" in output

    with TEST_RUNTIME.session() as session:
        row = session.get(MilvusSyncState, "check_m1_1")
        assert row is not None
        row.synced_through = datetime.now(UTC) - timedelta(seconds=5)
    code, output = _check()
    assert code == 0, output

    with TEST_RUNTIME.session() as session:
        row = session.get(MilvusSyncState, "check_m1_1")
        assert row is not None
        row.synced_through = datetime.now(UTC) - timedelta(hours=1)
    code, output = _check()
    assert code == 1
    assert "behind by more than 60 s (MODERATION_MILVUS_MAX_LAG_S)" in output
    with TEST_RUNTIME.session() as session:
        session.execute(delete(MilvusSyncState))
