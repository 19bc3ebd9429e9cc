"""An API process's cache of API keys, invalidated by PostgreSQL `LISTEN/NOTIFY`.

Checking a key against the table cost 1-1.5 ms of every API request (a pooled session,
a query, its transaction), most of a single-event submit. Here a key checked once is
answered from memory until something changes `api_keys`:

    api_keys ──(trigger, migration 0015: revoked_at/role/name/key_hash updated, a row
    deleted, the table truncated)──▶ NOTIFY api_keys_changed ──▶ this process's listener
    connection ──▶ the whole cache is dropped

A revoked key is refused by the next request: the revoking transaction signals the
listener's backend before its COMMIT returns, and every lookup first makes one small round
trip on the listener connection (`_barrier`, shared by requests that arrive together), by
the end of which the backend has sent every notification it was signalled. A thread also
waits on the connection, to apply notifications and reconnect between requests. A lookup
that read the table while a notification arrived does not store its answer (a generation
number), so an answer older than a revocation is not kept.

When the listener connection is lost (the database restarted, the backend terminated),
the cache is emptied and stays off, every request reading the table as before, until a
new connection is listening again. Entries also expire after
`auth.service.LAST_USED_RESOLUTION_S`, so a key's `last_used_at` stays as fresh as it
was, and a silent network partition (no reset ever arrives) cannot keep a key alive longer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg2
from sqlalchemy.engine import make_url

from moderation.auth.service import (
    KEY_PREFIX,
    LAST_USED_RESOLUTION_S,
    Principal,
    authenticate,
    hash_key,
)
from moderation.runtime import Runtime

log = logging.getLogger(__name__)

CHANNEL = "api_keys_changed"
# The listener's name in pg_stat_activity (and how the tests find it).
APPLICATION_NAME = "moderation-key-cache"
# Keys held at most; beyond it the cache is emptied (a flood of distinct valid keys is not
# a workload anyone has, and a bound keeps memory bounded).
MAX_ENTRIES = 10_000
# How long the listener thread waits on its socket between looks at whether to stop.
WAIT_S = 5.0
# Reconnecting after a lost listener: first wait, doubling up to the last.
RECONNECT_S = (0.1, 5.0)


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    stored_at: float


class KeyCache:
    """Keys by hash, valid while this process listens to `CHANNEL`."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._entries: dict[bytes, _Entry] = {}
        # Guards the entries, the generation and the listener connection.
        self._lock = threading.Lock()
        self._generation = 0
        self._connection: Any = None  # psycopg2's connection while listening, else None
        self._stopped = threading.Event()
        # Barriers (`_barrier`): requests share one round trip when they arrive together.
        self._barriers = threading.Condition()
        self._barriers_started = 0
        self._barriers_finished = 0
        self._barrier_running = False
        self._thread = threading.Thread(target=self._listen_forever, name="key-cache", daemon=True)

    def start(self) -> KeyCache:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            self._drop_connection()
        self._thread.join(timeout=WAIT_S + 1)

    @property
    def listening(self) -> bool:
        return self._connection is not None

    # The request path.

    def lookup(self, key_hash: bytes) -> tuple[Principal | None, int]:
        """The cached principal of a key (None on a miss, or while not listening), and
        the generation to pass to `store` after reading the table on a miss. Every
        notification of a change committed before the call has been applied first."""
        self._barrier()
        with self._lock:
            entry = self._entries.get(key_hash) if self._connection is not None else None
            if entry is not None and time.monotonic() - entry.stored_at > LAST_USED_RESOLUTION_S:
                entry = None
            return (entry.principal if entry else None), self._generation

    def store(self, key_hash: bytes, principal: Principal, generation: int) -> None:
        """Keep a key read from the table, unless anything changed since `lookup`."""
        with self._lock:
            if self._connection is None or generation != self._generation:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key_hash] = _Entry(principal, time.monotonic())

    def _barrier(self) -> None:
        """Wait for a round trip on the listener connection that started after this call.

        The change's transaction signals every listening backend before its COMMIT returns,
        and a backend sends what it was signalled before it answers the next command on its
        connection. So once a `SELECT 1` sent after the revocation was answered, its
        notification is in hand: a key revoked before a request began is never served from
        memory. Requests arriving while a round trip is on its way share the next one. (A
        round trip on an idle connection: about 0.1 ms, against 1-1.5 ms for a pooled
        session's query of the table.)
        """
        with self._barriers:
            ticket = self._barriers_started + 1  # the first round trip to start from now
            while self._barriers_finished < ticket:
                if self._barrier_running:
                    self._barriers.wait()
                    continue
                self._barrier_running = True
                self._barriers_started += 1
                number = self._barriers_started
                self._barriers.release()
                try:
                    with self._lock:
                        self._round_trip()
                finally:
                    self._barriers.acquire()
                    self._barrier_running = False
                    self._barriers_finished = number
                    self._barriers.notify_all()

    def _round_trip(self) -> None:
        """`SELECT 1` on the listener connection, then what it brought. Holds the lock."""
        if self._connection is None:
            return
        try:
            with self._connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        except Exception:  # any failure of the connection: psycopg2's errors, OSError
            log.warning("key cache: the listener connection was lost; reading keys from the table")
            self._drop_connection()
            return
        self._drain()

    # The listener.

    def _invalidate(self) -> None:
        self._entries.clear()
        self._generation += 1

    def _drain(self) -> None:
        """Read what the listener connection has received; drop the cache on a
        notification, and on a lost connection (then stop caching). Holds the lock."""
        if self._connection is None:
            return
        try:
            self._connection.poll()
        except Exception:  # any failure of the connection: psycopg2's errors, OSError
            log.warning("key cache: the listener connection was lost; reading keys from the table")
            self._drop_connection()
            return
        if self._connection.notifies:
            self._connection.notifies.clear()
            self._invalidate()

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._invalidate()
        if connection is not None:
            try:
                connection.close()
            except Exception:
                log.debug("key cache: closing the lost listener failed", exc_info=True)

    def _connect(self) -> Any:
        url = make_url(self._url)
        if url.get_driver_name() != "psycopg2":
            raise RuntimeError(f"the key cache listens through psycopg2, not {url.drivername}")
        # The driver's own connection, outside any pool: it lives as long as it listens.
        args, kwargs = url.get_dialect()().create_connect_args(url)
        connection = psycopg2.connect(
            *args,
            **kwargs,
            application_name=APPLICATION_NAME,
            # A peer that vanishes without a reset is noticed within about 20 s.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=3,
            keepalives_count=3,
            # A round trip (`_barrier`) that gets no answer fails after 5 s, not minutes.
            tcp_user_timeout=5000,
        )
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"LISTEN {CHANNEL}")
        return connection

    def _listen_forever(self) -> None:
        delay = RECONNECT_S[0]
        while not self._stopped.is_set():
            if self._connection is None:
                try:
                    connection = self._connect()
                except Exception as error:
                    log.warning("key cache: cannot listen (%s); retrying in %.1f s", error, delay)
                    self._stopped.wait(delay)
                    delay = min(2 * delay, RECONNECT_S[1])
                    continue
                with self._lock:
                    # Anything read before this connection listened may predate a change
                    # that no one told us about: start afresh.
                    self._invalidate()
                    self._connection = connection
                delay = RECONNECT_S[0]
            connection = self._connection
            if connection is None:
                continue
            # A connection closed under us (by `stop` or `_drain`) fails here: look again.
            with contextlib.suppress(Exception):
                select.select([connection], [], [], WAIT_S)
            with self._lock:
                if self._connection is connection:
                    self._drain()


class ApiKeys:
    """How an API application checks API keys: through a `KeyCache` of its own, started on
    the first key checked, unless its settings turn the cache off
    (`MODERATION_API_KEY_CACHE=false`: every key read from the table)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        self._cache: KeyCache | None = None
        self._cache_pid = 0

    def cache(self) -> KeyCache | None:
        """The cache, started on first use; None when turned off."""
        settings = self._runtime.settings
        if not settings.api_key_cache:
            return None
        with self._lock:
            # A forked child must not share its parent's listener connection.
            if self._cache is None or self._cache_pid != os.getpid():
                self._cache = KeyCache(settings.database_url).start()
                self._cache_pid = os.getpid()
            return self._cache

    def authenticate(self, secret: str) -> Principal | None:
        """The principal of an API key: from the cache, or from the table (then cached)."""
        cache = self.cache() if secret.startswith(KEY_PREFIX) else None
        if cache is None:
            with self._runtime.session() as session:
                return authenticate(session, secret)
        key_hash = hash_key(secret)
        principal, generation = cache.lookup(key_hash)
        if principal is not None:
            return principal
        with self._runtime.session() as session:
            principal = authenticate(session, secret)
        if principal is not None:
            cache.store(key_hash, principal, generation)
        return principal

    def close(self) -> None:
        """Stops the cache's listener (this process's own; a forked parent's is its own)."""
        with self._lock:
            cache, self._cache = self._cache, None
            ours = self._cache_pid == os.getpid()
        if cache is not None and ours:
            cache.stop()
