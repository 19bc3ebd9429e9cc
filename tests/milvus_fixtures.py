"""Fixtures for the Milvus backend: the real server from PyPI's `milvus` wheel, started once
per test session (`tests/milvus_server.py`), and per test a collection prefix of its own
and the settings that point the service at it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from moderation.main.app import create_app
from moderation.runtime import Runtime
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
    # The service's settings on the Milvus backend, against `server`: `changes` (by field
    # name) to the tests' own.
    runtime: Runtime
    changes: dict[str, object]

    def loop(self, model: str | None = None) -> milvus_sync.SyncLoop:
        settings = self.runtime.settings
        return milvus_sync.SyncLoop(
            self.runtime.engine,
            self.milvus,
            milvus_sync.SyncSettings.from_settings(settings),
            milvus_sync.synced_models(settings, model),
        )


def milvus_changes(server: MilvusProcess, prefix: str) -> dict[str, object]:
    """The settings (by field name) of the Milvus backend against `server`, with
    collections under `prefix`."""
    return {
        "search_backend": "milvus",
        "milvus_uri": server.uri,
        "milvus_consistency": "Strong",
        "milvus_collection_prefix": prefix,
        "milvus_timeout_s": 5,
        "search_commit_lag_s": 0.2,
        "search_tuning_queries": 50,
    }


@pytest.fixture
def milvus_env(
    milvus_server: MilvusProcess, make_runtime: Callable[..., Runtime]
) -> Iterator[MilvusEnv]:
    """MODERATION_SEARCH_BACKEND=milvus against the test server, Strong consistency (a test
    reads its writes at once), and collections under a prefix no other test uses."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    changes = milvus_changes(milvus_server, prefix)
    runtime = make_runtime(**changes)
    milvus = Milvus(MilvusSettings.from_settings(runtime.settings))
    yield MilvusEnv(milvus_server, milvus, runtime, changes)
    if milvus_server.process is not None:

        def drop(client: object) -> None:
            for name in client.list_collections():  # type: ignore[attr-defined]
                if name.startswith(prefix):
                    for alias in client.list_aliases(collection_name=name).get("aliases", []):  # type: ignore[attr-defined]
                        client.drop_alias(alias)  # type: ignore[attr-defined]
                    client.drop_collection(name)  # type: ignore[attr-defined]

        milvus.call("drop the test's collections", drop)


@pytest.fixture
def milvus_api(clean_db: None, milvus_env: MilvusEnv) -> Iterator[TestClient]:
    """The application on the Milvus backend (`milvus_env`), called in-process."""
    with TestClient(create_app(milvus_env.runtime)) as client:
        yield client


def sync_until_caught_up(loop: milvus_sync.SyncLoop, timeout_s: float = 60.0) -> None:
    """Passes until every collection's checkpoints reach the sequences' values as they are
    now: everything committed before the call is then in Milvus."""
    import time

    from moderation.commit_horizon import sequence_value

    with loop.engine.connect() as conn:
        embeddings = sequence_value(conn, "embeddings")[0]
        changes = sequence_value(conn, "search_changes")[0]
    deadline = time.monotonic() + timeout_s
    while True:
        loop.run_once()
        if all(s.caught_up_to(embeddings, changes) for s in loop._syncs.values()):
            return
        assert time.monotonic() < deadline, "the sync did not catch up"
        time.sleep(0.1)
