"""A live worker as `/readyz` sees one: a `workers` row with a fresh heartbeat."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import delete

from moderation.screening.models import Worker
from tests.conftest import TEST_RUNTIME


@pytest.fixture
def live_worker(database: str) -> Iterator[str]:
    """A worker row with a fresh heartbeat, as `moderation worker` keeps one; its name."""
    name = f"test-worker-{uuid.uuid4().hex[:8]}"
    with TEST_RUNTIME.session() as session:
        session.add(Worker(name=name, hostname="test", pid=1))
    yield name
    with TEST_RUNTIME.session() as session:
        session.execute(delete(Worker).where(Worker.name == name))
