"""Fixtures for HTTP API tests: the application in-process, and committed keys per role."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from moderation.auth import service as auth
from moderation.auth.models import Role
from moderation.main.app import create_app
from moderation.runtime import Runtime
from tests.conftest import TEST_RUNTIME


@contextmanager
def api_on(runtime: Runtime, **client: Any) -> Iterator[TestClient]:
    """The application on `runtime`, called in-process (started and stopped as uvicorn
    would: its lifespan runs)."""
    with TestClient(create_app(runtime), **client) as started:
        yield started


@pytest.fixture
def api(clean_db: None, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """The application, called in-process over real PostgreSQL (keys and data committed),
    on the tests' runtime; on `queue_runtime` (`tests.queues`) when the test takes `queue`,
    so that what it sends stays on a queue of its own."""
    runtime: Runtime = request.getfixturevalue(
        "queue_runtime" if "queue" in request.fixturenames else "runtime"
    )
    with api_on(runtime) as client:
        yield client


@pytest.fixture
def keys(clean_db: None) -> dict[Role, str]:
    """One key per role, committed."""
    made = {}
    with TEST_RUNTIME.session() as session:
        for role in Role:
            _, secret = auth.create_key(session, role=role, name=f"test {role}", actor="test")
            made[role] = secret
    return made


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def announced(api: TestClient) -> None:
    """Wait until the application has sent the screening messages of what it accepted:
    `POST /v1/uploads` answers once the rows commit and sends them from a thread."""
    announcer = getattr(api.app.state, "announcer", None)  # type: ignore[attr-defined]
    if announcer is not None:
        assert announcer.flush(10), "screening messages still unsent after 10 s"
