"""The API's key cache (`moderation.auth.key_cache`) against real PostgreSQL: a key checked
once is answered from memory, and a key revoked elsewhere (another process, another
connection) is refused by the very next request, whether the cache hears of it through
NOTIFY or has lost its listener and reads the table again."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import closing

import psycopg2
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.engine import make_url

from moderation.auth import service as auth
from moderation.auth.key_cache import APPLICATION_NAME, KeyCache, authenticate_key, key_cache
from moderation.auth.models import ApiKey, Role
from moderation.config import get_settings
from moderation.db import session_scope
from tests.api_fixtures import api, bearer, keys

__all__ = ["api", "keys"]


def _connect() -> psycopg2.extensions.connection:
    """A connection of this test's own, as another process would have: each statement
    commits at once (not used as a context manager, which would hold one transaction)."""
    url = make_url(get_settings().database_url)
    connection = psycopg2.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database
    )
    connection.autocommit = True
    return connection


def _listening_cache(timeout_s: float = 30) -> KeyCache:
    """This process's key cache, once its listener is connected (it connects in its own
    thread)."""
    cache = key_cache()
    assert cache is not None
    deadline = time.monotonic() + timeout_s
    while not cache.listening:
        assert time.monotonic() < deadline, "the key cache never listened"
        time.sleep(0.01)
    return cache


def _key_id(secret: str) -> int:
    with session_scope() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == auth.hash_key(secret)))
    assert key_id is not None
    return key_id


def _cached(secret: str) -> bool:
    cache = key_cache()
    assert cache is not None
    principal, _ = cache.lookup(auth.hash_key(secret))
    return principal is not None


def test_a_key_revoked_by_another_process_is_refused_by_the_next_request(
    api: TestClient, keys: dict[Role, str]
) -> None:
    _listening_cache()
    submitter = keys[Role.SUBMITTER]
    assert api.get("/v1/uploads/1", headers=bearer(submitter)).status_code == 404
    assert _cached(submitter)
    # Answered from memory now: the same principal, without the table.
    assert api.get("/v1/uploads/1", headers=bearer(submitter)).status_code == 404
    revoked = subprocess.run(
        [sys.executable, "-m", "moderation", "apikey", "revoke", str(_key_id(submitter))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert revoked.returncode == 0, revoked.stderr
    refused = api.get("/v1/uploads/1", headers=bearer(submitter))
    assert refused.status_code == 401
    # Other keys are read again, and still good.
    assert api.get("/v1/uploads/1", headers=bearer(keys[Role.ADMIN])).status_code == 404


def test_a_key_revoked_on_another_connection_is_refused_at_once(keys: dict[Role, str]) -> None:
    """Revoked, then asked for at once, many times over: the notification is never behind
    (without the cache's round trip before each lookup, about one try in ten lost the race
    on the loaded 2-core machine)."""
    _listening_cache()
    with session_scope() as session:
        made = [
            auth.create_key(session, role=Role.REVIEWER, name=f"r{i}", actor="test")
            for i in range(30)
        ]
    with closing(_connect()) as other:
        cursor = other.cursor()
        for key, secret in made:
            assert authenticate_key(secret) is not None
            assert _cached(secret)
            cursor.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key.id,))
            assert authenticate_key(secret) is None, key.id
    assert authenticate_key(keys[Role.REVIEWER]) is not None


def test_an_answer_read_before_a_revocation_is_not_kept(keys: dict[Role, str]) -> None:
    """The race a cache must not lose: a request reads the key (valid), the key is revoked,
    then the request stores what it read."""
    cache = _listening_cache()
    secret = keys[Role.ANALYST]
    key_hash = auth.hash_key(secret)
    missed, generation = cache.lookup(key_hash)
    assert missed is None
    with session_scope() as session:
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
    assert authenticate_key(secret) is None


def test_a_lost_listener_serves_no_cached_key_until_it_listens_again(
    api: TestClient, keys: dict[Role, str]
) -> None:
    _listening_cache()
    secret = keys[Role.SUBMITTER]
    assert api.get("/v1/uploads/1", headers=bearer(secret)).status_code == 404
    assert _cached(secret)
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
    _listening_cache()
    admin = keys[Role.ADMIN]
    assert api.get("/v1/uploads/1", headers=bearer(admin)).status_code == 404
    assert _cached(admin)
    assert not _cached(secret)
