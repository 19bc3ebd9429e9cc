"""An API application's key cache (`moderation.auth.key_cache`) against real PostgreSQL: a
key checked once is answered from memory, and a key revoked elsewhere (another process,
another connection) is refused by the very next request, whether the cache hears of it
through NOTIFY or has lost its listener and reads the table again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing

import psycopg2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.engine import make_url

from moderation.auth import service as auth
from moderation.auth.key_cache import APPLICATION_NAME, ApiKeys, KeyCache
from moderation.auth.models import ApiKey, Role
from moderation.runtime import Runtime
from tests.api_fixtures import api, bearer, keys
from tests.conftest import TEST_ENV, TEST_RUNTIME, TEST_SETTINGS

__all__ = ["api", "keys"]


def _connect() -> psycopg2.extensions.connection:
    """A connection of this test's own, as another process would have: each statement
    commits at once (not used as a context manager, which would hold one transaction)."""
    url = make_url(TEST_SETTINGS.database_url)
    connection = psycopg2.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database
    )
    connection.autocommit = True
    return connection


@pytest.fixture
def api_keys(runtime: Runtime) -> Iterator[ApiKeys]:
    """Keys checked as an application checks them, outside one."""
    checked = ApiKeys(runtime)
    yield checked
    checked.close()


def _app_keys(api: TestClient, secret: str) -> ApiKeys:
    """The application's keys, once it has checked one (`secret`) and so made them."""
    api.get("/v1/uploads/1", headers=bearer(secret))
    checked: ApiKeys = api.app.state.api_keys  # type: ignore[attr-defined]
    return checked


def _listening_cache(api_keys: ApiKeys, timeout_s: float = 30) -> KeyCache:
    """The key cache, once its listener is connected (it connects in its own thread)."""
    cache = api_keys.cache()
    assert cache is not None
    deadline = time.monotonic() + timeout_s
    while not cache.listening:
        assert time.monotonic() < deadline, "the key cache never listened"
        time.sleep(0.01)
    return cache


def _key_id(secret: str) -> int:
    with TEST_RUNTIME.session() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == auth.hash_key(secret)))
    assert key_id is not None
    return key_id


def _cached(api_keys: ApiKeys, secret: str) -> bool:
    cache = api_keys.cache()
    assert cache is not None
    principal, _ = cache.lookup(auth.hash_key(secret))
    return principal is not None


def test_a_key_revoked_by_another_process_is_refused_by_the_next_request(
    api: TestClient, keys: dict[Role, str]
) -> None:
    submitter = keys[Role.SUBMITTER]
    app_keys = _app_keys(api, submitter)
    _listening_cache(app_keys)
    assert api.get("/v1/uploads/1", headers=bearer(submitter)).status_code == 404
    assert _cached(app_keys, submitter)
    # Answered from memory now: the same principal, without the table.
    assert api.get("/v1/uploads/1", headers=bearer(submitter)).status_code == 404
    revoked = subprocess.run(
        [sys.executable, "-m", "moderation", "apikey", "revoke", str(_key_id(submitter))],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **TEST_ENV},
    )
    assert revoked.returncode == 0, revoked.stderr
    refused = api.get("/v1/uploads/1", headers=bearer(submitter))
    assert refused.status_code == 401
    # Other keys are read again, and still good.
    assert api.get("/v1/uploads/1", headers=bearer(keys[Role.ADMIN])).status_code == 404


def test_a_key_revoked_on_another_connection_is_refused_at_once(
    api_keys: ApiKeys, keys: dict[Role, str]
) -> None:
    """Revoked, then asked for at once, many times over: the notification is never behind
    (without the cache's round trip before each lookup, about one try in ten lost the race
    on the loaded 2-core machine)."""
    _listening_cache(api_keys)
    with TEST_RUNTIME.session() as session:
        made = [
            auth.create_key(session, role=Role.REVIEWER, name=f"r{i}", actor="test")
            for i in range(30)
        ]
    with closing(_connect()) as other:
        cursor = other.cursor()
        for key, secret in made:
            assert api_keys.authenticate(secret) is not None
            assert _cached(api_keys, secret)
            cursor.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key.id,))
            assert api_keys.authenticate(secret) is None, key.id
    assert api_keys.authenticate(keys[Role.REVIEWER]) is not None


def test_an_answer_read_before_a_revocation_is_not_kept(
    api_keys: ApiKeys, keys: dict[Role, str]
) -> None:
    """The race a cache must not lose: a request reads the key (valid), the key is revoked,
    then the request stores what it read."""
    cache = _listening_cache(api_keys)
    secret = keys[Role.ANALYST]
    key_hash = auth.hash_key(secret)
    missed, generation = cache.lookup(key_hash)
    assert missed is None
    with TEST_RUNTIME.session() as session:
        read = auth.authenticate(session, secret)
    assert read is not None
    with closing(_connect()) as other:
        other.cursor().execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = %s", (read.key_id,)
        )
    # Once the notification is in, the stale answer is not stored.
    deadline = time.monotonic() + 30
    while cache.lookup(key_hash)[1] == generation:
        assert time.monotonic() < deadline, "no notification arrived"
        time.sleep(0.01)
    cache.store(key_hash, read, generation)
    assert cache.lookup(key_hash)[0] is None
    assert api_keys.authenticate(secret) is None


def test_a_lost_listener_serves_no_cached_key_until_it_listens_again(
    api: TestClient, keys: dict[Role, str]
) -> None:
    secret = keys[Role.SUBMITTER]
    app_keys = _app_keys(api, secret)
    _listening_cache(app_keys)
    assert api.get("/v1/uploads/1", headers=bearer(secret)).status_code == 404
    assert _cached(app_keys, secret)
    with closing(_connect()) as other:
        cursor = other.cursor()
        # The listener's backend ends (a restart, an operator, a failover), and the key is
        # revoked while nobody listens: that notification is lost.
        cursor.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            (APPLICATION_NAME,),
        )
        assert [row[0] for row in cursor.fetchall()] == [True]
        cursor.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (_key_id(secret),))
    assert api.get("/v1/uploads/1", headers=bearer(secret)).status_code == 401
    # Listening again, it caches again (from an empty cache).
    _listening_cache(app_keys)
    admin = keys[Role.ADMIN]
    assert api.get("/v1/uploads/1", headers=bearer(admin)).status_code == 404
    assert _cached(app_keys, admin)
    assert not _cached(app_keys, secret)
