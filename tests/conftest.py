"""Test fixtures: a migrated test database, Redis, the tiny CLIP and a real worker process.

The tests never set the environment: they build their settings (`settings_for_tests`,
never read from MODERATION_* variables) and run the service's code on a runtime of their
own (`TEST_RUNTIME`, `make_runtime`), as an entry point would. A process they start (a
worker, a `moderation` command) is given `TEST_ENV` explicitly.
"""

from __future__ import annotations

import base64
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url

_RUN_DIR = Path(tempfile.mkdtemp(prefix="moderation-tests-"))
TINY_MODEL_DIR = _RUN_DIR / "tiny-clip"
TINY_SIGLIP_DIR = _RUN_DIR / "tiny-siglip"
TINY_BLIP_DIR = _RUN_DIR / "tiny-blip"
# Tests write their images under the temporary directory (pytest's tmp_path included).
TEST_FILES_DIR = Path(tempfile.gettempdir()).resolve()
# Test HTTP servers listen on 127.0.0.1, which production never fetches from; 127.0.0.2
# stays forbidden, for the tests that prove refused addresses are never connected to.
TEST_FETCH_NETWORK = "127.0.0.1/32"
BASE_DATABASE_URL = os.environ.get(
    "MODERATION_TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/moderation_test"
)
BASE_REDIS_URL = os.environ.get("MODERATION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# pytest-xdist's processes (`.ci/test` runs two; PYTEST_XDIST_WORKER is "gw0", "gw1", ...,
# unset in a plain `pytest`) each have a database and a Redis db of their own: one's
# TRUNCATE or FLUSHDB never reaches another's tests, and no Celery worker restores another
# process's unacknowledged messages. Process N takes Redis db N below the given one (15, 14
# by default); the benchmark's test takes the next one down (`bench_redis_url`).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def _redis_db_below(url: str, below: int) -> str:
    if below == 0:
        return url
    prefix, _, db = url.rpartition("/")
    if not db.isdigit() or int(db) < below:
        raise RuntimeError(
            f"MODERATION_TEST_REDIS_URL {url}: {XDIST_WORKERS} test process(es) need Redis dbs "
            f"down to {below} below its own; give a db number of at least {below}, or run "
            "fewer processes (pytest -n)"
        )
    return f"{prefix}/{int(db) - below}"


def _database_suffixed(url: str, suffix: str) -> str:
    parsed = make_url(url)
    return parsed.set(database=f"{parsed.database}{suffix}").render_as_string(hide_password=False)


TEST_DATABASE_URL = (
    _database_suffixed(BASE_DATABASE_URL, f"_{XDIST_WORKER}") if XDIST_WORKER else BASE_DATABASE_URL
)
TEST_REDIS_URL = _redis_db_below(BASE_REDIS_URL, int(XDIST_WORKER.removeprefix("gw") or 0))

TEST_ENV = {
    "MODERATION_DATABASE_URL": TEST_DATABASE_URL,
    "MODERATION_REDIS_URL": TEST_REDIS_URL,
    "MODERATION_QUEUE": f"screening-test-{os.getpid()}",
    "MODERATION_MODEL": str(TINY_MODEL_DIR),
    "MODERATION_DEVICE": "cpu",
    # Tests add bank entries and submit at once: check the banks before every match.
    "MODERATION_BANK_REFRESH_S": "0",
    # Tests that prune the bank change log age its rows by days and prune them with a
    # retention of their own; a worker process's sweeper must leave them alone meanwhile.
    "MODERATION_BANK_CHANGES_RETENTION_S": str(365 * 24 * 3600),
    "MODERATION_RETRY_BACKOFF_S": "0.2",
    "MODERATION_MAX_ATTEMPTS": "3",
    # The whole fetch: the slow test servers take 1.5 s, and two cores may be loaded.
    "MODERATION_FETCH_TIMEOUT_S": "5",
    "MODERATION_BATCH_SIZE": "8",
    "MODERATION_ALLOWED_URI_PREFIXES": f"{TEST_FILES_DIR.as_uri()}/,http://,https://",
    "MODERATION_FETCH_ALLOWED_NETWORKS": TEST_FETCH_NETWORK,
    # One CLIP match method, unmeasured: a worker that measures them takes 5 s more to
    # start on a busy machine (and measures again at every start while the machine is
    # busy). Measuring is tested in test_clip_plan.py; every method in test_clip_search.py.
    "MODERATION_CLIP_MATCH_METHODS": "torch-float32",
    # Evidence kept by the workers under the run's directory, sealed with a key of the run's.
    "MODERATION_EVIDENCE_URI": str(_RUN_DIR / f"evidence{XDIST_WORKER}"),
    "MODERATION_EVIDENCE_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
}

from moderation.local_services import LocalServices  # noqa: E402

# Where nothing answers at the default addresses (and no test URL is given), the tests
# start a PostgreSQL and a Redis of the project's own, stopped when the session ends.
LOCAL_SERVICES = LocalServices(
    BASE_DATABASE_URL,
    BASE_REDIS_URL,
    database_configured="MODERATION_TEST_DATABASE_URL" in os.environ,
    redis_configured="MODERATION_TEST_REDIS_URL" in os.environ,
)
LOCAL_SERVICES.start()

import redis  # noqa: E402
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource  # noqa: E402
from sqlalchemy import Connection, create_engine, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from moderation import schema  # noqa: E402
from moderation.config import Settings, settings_fields  # noqa: E402
from moderation.embedding.tiny import write_tiny_clip, write_tiny_siglip  # noqa: E402
from moderation.runtime import Runtime  # noqa: E402
from moderation.search.blip import write_random_blip  # noqa: E402
from moderation.worker.child import WorkerProcess  # noqa: E402


class _GivenSettings(Settings):
    """Settings from the values given and the defaults, never from the environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def settings_for_tests(**changes: Any) -> Settings:
    """The tests' settings (`TEST_ENV`), with `changes` (by field name) on top."""
    validated = _GivenSettings(**{**settings_fields(TEST_ENV), **changes})
    # As a plain `Settings`: what child processes (the intake pool's) can unpickle without
    # importing the tests.
    return Settings.model_construct(**dict(validated))


# What the tests run the service's code on, as an entry point would build it.
TEST_SETTINGS = settings_for_tests()
TEST_RUNTIME = Runtime(TEST_SETTINGS)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


WORKER_METRICS_PORT = _free_port()


def bench_redis_url() -> str:
    """For the benchmark, which empties its Redis db: the one below the test processes'
    (14 in one process, 13 in two, by default)."""
    return _redis_db_below(BASE_REDIS_URL, XDIST_WORKERS)


# Tables emptied between end-to-end tests. embedding_models stays: the worker keeps its id.
# retrohunt_jobs and reembed_jobs first: a worker's step locks its job row before any
# other table, so TRUNCATE waits for it holding nothing, instead of deadlocking with it.
_DATA_TABLES = ", ".join(
    [
        "retrohunt_jobs",
        "reembed_jobs",
        "reembed_failures",
        "evidence",
        "hits",
        "signals",
        "embeddings",
        "uploads",
        "bank_entry_embeddings",
        "bank_entries",
        "banks",
        "web_sessions",
        "web_pending_forms",
        "review_claims",
        "api_keys",
        "index_evaluations",
        "evaluation_runs",
        "webhook_events",
        "webhook_attempts",
        "search_changes",
        "milvus_sync_state",
    ]
)


def pytest_report_header() -> list[str]:
    return [f"started for the tests: {line}" for line in LOCAL_SERVICES.started]


def pytest_unconfigure() -> None:
    LOCAL_SERVICES.stop()


@pytest.fixture(scope="session", autouse=True)
def database() -> str:
    url = TEST_ENV["MODERATION_DATABASE_URL"]
    admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    name = url.rsplit("/", 1)[1]
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
    schema.upgrade(url)
    return url


@pytest.fixture(scope="session", autouse=True)
def tiny_model() -> Path:
    if not TINY_MODEL_DIR.exists():
        write_tiny_clip(TINY_MODEL_DIR)
    return TINY_MODEL_DIR


@pytest.fixture(scope="session")
def tiny_siglip() -> Path:
    if not TINY_SIGLIP_DIR.exists():
        write_tiny_siglip(TINY_SIGLIP_DIR)
    return TINY_SIGLIP_DIR


@pytest.fixture(scope="session")
def tiny_blip() -> Path:
    """A BLIP image-text matching checkpoint with random weights, for the cross-encoder."""
    if not TINY_BLIP_DIR.exists():
        write_random_blip(TINY_BLIP_DIR, "tiny")
    return TINY_BLIP_DIR


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_ENV["MODERATION_REDIS_URL"])
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(autouse=True)
def registry_as_it_was(database: str) -> Iterator[None]:
    """The model registry's states put back after each test. `embedding_models` outlives
    `clean_db` (a running worker keeps its model's id), so a test that activates a model
    (the tiny SigLIP, say) would otherwise leave it serving every later test of this
    process, whose searches and evaluations then ask the wrong model."""
    read = text("SELECT id, state FROM embedding_models ORDER BY id")
    with TEST_RUNTIME.engine.connect() as conn:
        before: dict[int, str] | None = (
            {row[0]: row[1] for row in conn.execute(read)} if _has_registry(conn) else None
        )
    yield
    if before is None:
        return
    with TEST_RUNTIME.engine.begin() as conn:
        if {row[0]: row[1] for row in conn.execute(read)} == before:
            return
        # Every row retired first: one active model at a time (a unique index).
        conn.execute(text("UPDATE embedding_models SET state = 'retired'"))
        for model_id, state in before.items():
            conn.execute(_RESTORE_STATE, {"state": state, "id": model_id})


_RESTORE_STATE = text("UPDATE embedding_models SET state = :state WHERE id = :id")


def _has_registry(conn: Connection) -> bool:
    return conn.scalar(text("SELECT to_regclass('embedding_models') IS NOT NULL")) is True


@pytest.fixture
def runtime(database: str) -> Runtime:
    """The tests' runtime: their database, their Redis db, the tiny model."""
    return TEST_RUNTIME


@pytest.fixture
def make_runtime(database: str) -> Iterator[Callable[..., Runtime]]:
    """Runtimes on the tests' settings with some changed (by field name), closed after
    the test."""
    made: list[Runtime] = []

    def make(**changes: Any) -> Runtime:
        made.append(Runtime(settings_for_tests(**changes)))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture
def session(database: str) -> Iterator[Session]:
    """A session whose every change is rolled back after the test."""
    connection = TEST_RUNTIME.engine.connect()
    transaction = connection.begin()
    with Session(bind=connection, join_transaction_mode="create_savepoint") as db_session:
        yield db_session
    transaction.rollback()
    connection.close()


@pytest.fixture
def clean_db(database: str) -> None:
    """For tests whose data must be committed (a worker process reads it)."""
    with TEST_RUNTIME.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {_DATA_TABLES} CASCADE"))


@pytest.fixture(scope="session")
def worker(database: str, tiny_model: Path, redis_client: redis.Redis) -> Iterator[WorkerProcess]:
    """A real `moderation worker` process, shared by the end-to-end tests. It serves its
    metrics on a free port, `WORKER_METRICS_PORT`."""
    env = {**TEST_ENV, "MODERATION_WORKER_METRICS_PORT": str(WORKER_METRICS_PORT)}
    with WorkerProcess(_RUN_DIR / "worker.log", env) as process:
        yield process.wait_ready()


# Session fixtures shared by several modules are defined once, here: imported into each test
# module instead, each module would get a session fixture (and a Milvus server) of its own.
from tests.milvus_fixtures import milvus_env, milvus_server  # noqa: E402

__all__ = ["milvus_env", "milvus_server"]
