"""Fixtures for the Milvus backend: the real server from PyPI's `milvus` wheel, started once
per test session (`tests/milvus_server.py`), and per test a collection prefix of its own
and the settings that point the service at it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from moderation.config import get_settings
from moderation.db import get_engine
from moderation.search import milvus_sync
from moderation.search.milvus_index import Milvus, MilvusSettings
from tests.conftest import TEST_ENV
from tests.milvus_server import MilvusProcess, MilvusUnavailable, port_base_for


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusProcess]:
    """Skipped, with the reason, only where the wheel cannot run here."""
    # Ports by this test process's own Redis db: two pytest-xdist processes run two servers.
    db = TEST_ENV["MODERATION_REDIS_URL"].rsplit("/", 1)[-1]
    server = MilvusProcess(
        Path(tmp_path_factory.mktemp("milvus")), port_base_for(int(db) if db.isdigit() else 0)
    )
    try:
        server.start()
    except MilvusUnavailable as error:
        pytest.skip(f"the Milvus server from the `milvus` wheel cannot run here: {error}")
    yield server
    server.stop(crash=True)  # its data is the session's temporary directory


@dataclass
class MilvusEnv:
    server: MilvusProcess
    milvus: Milvus

    def loop(self, model: str | None = None) -> milvus_sync.SyncLoop:
        settings = get_settings()
        return milvus_sync.SyncLoop(
            get_engine(),
            self.milvus,
            milvus_sync.SyncSettings.from_settings(settings),
            milvus_sync.synced_models(settings, model),
        )


@pytest.fixture
def milvus_env(
    milvus_server: MilvusProcess, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MilvusEnv]:
    """MODERATION_SEARCH_BACKEND=milvus against the test server, Strong consistency (a test
    reads its writes at once), and collections under a prefix no other test uses."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    for name, value in {
        "MODERATION_SEARCH_BACKEND": "milvus",
        "MODERATION_MILVUS_URI": milvus_server.uri,
        "MODERATION_MILVUS_CONSISTENCY": "Strong",
        "MODERATION_MILVUS_COLLECTION_PREFIX": prefix,
        "MODERATION_MILVUS_TIMEOUT_S": "5",
        "MODERATION_SEARCH_COMMIT_LAG_S": "0.2",
        "MODERATION_SEARCH_TUNING_QUERIES": "50",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    milvus = Milvus(MilvusSettings.from_settings(get_settings()))
    yield MilvusEnv(milvus_server, milvus)
    monkeypatch.undo()
    get_settings.cache_clear()
    if milvus_server.process is not None:

        def drop(client: object) -> None:
            for name in client.list_collections():  # type: ignore[attr-defined]
                if name.startswith(prefix):
                    for alias in client.list_aliases(collection_name=name).get("aliases", []):  # type: ignore[attr-defined]
                        client.drop_alias(alias)  # type: ignore[attr-defined]
                    client.drop_collection(name)  # type: ignore[attr-defined]

        milvus.call("drop the test's collections", drop)


def sync_until_caught_up(loop: milvus_sync.SyncLoop, timeout_s: float = 60.0) -> None:
    """Passes until every collection's checkpoints reach the sequences' values as they are
    now: everything committed before the call is then in Milvus."""
    import time

    from moderation.commit_horizon import sequence_value

    with get_engine().connect() as conn:
        embeddings = sequence_value(conn, "embeddings")[0]
        changes = sequence_value(conn, "search_changes")[0]
    deadline = time.monotonic() + timeout_s
    while True:
        loop.run_once()
        if all(s.caught_up_to(embeddings, changes) for s in loop._syncs.values()):
            return
        assert time.monotonic() < deadline, "the sync did not catch up"
        time.sleep(0.1)
