"""Durable before answered (issue 27, item 6): every route that writes commits before its
response goes out, and a commit that fails is an error, never a 2xx.

Against a real uvicorn server (`tests.live_api`): over a socket the client can receive an
answer while the server is still to commit, which `TestClient` hides.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.orm import Session

from moderation.auth.models import Role
from moderation.banks.models import Bank
from moderation.review.models import Hit, ReviewStatus
from moderation.web.models import WebSession
from tests.api_fixtures import bearer, keys
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS
from tests.images import encode, textured, write
from tests.live_api import LiveApi, live_api
from tests.review_fixtures import make_bank, make_entry, make_hit, make_upload

__all__ = ["keys"]

PDQ = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"


@pytest.fixture
def server(clean_db: None) -> Iterator[LiveApi]:
    with live_api() as live:
        yield live


def _answered_after_commit(live: LiveApi, response: httpx.Response) -> None:
    """Every transaction of the request committed before its response's head went out."""
    name = f"{response.request.method} {response.request.url.path}"
    events = live.timeline.request_done(name)
    answered = events.index(f"response {name}")
    late = [e for e in events[answered:] if e.startswith("commit ")]
    assert not late, (
        f"{response.request.method} {response.request.url.path} answered "
        f"{response.status_code} before committing: {events}"
    )


def _hit(bank_name: str) -> int:
    with TEST_RUNTIME.session() as session:
        bank = make_bank(session, bank_name)
        hit = make_hit(session, make_upload(session), make_entry(session, bank))
        return hit.id


def test_every_writing_route_commits_before_it_answers_and_the_write_reads_back(
    server: LiveApi, keys: dict[Role, str], tmp_path: Path, tiny_siglip: Path
) -> None:
    admin = bearer(keys[Role.ADMIN])
    reviewer = bearer(keys[Role.REVIEWER])
    api_hit = _hit("for-the-api")
    page_hit = _hit("for-the-page")
    image = encode(textured(3, (64, 64)), "PNG")

    with httpx.Client(base_url=server.url, timeout=60) as client:

        def wrote(
            method: str, path: str, expected: int, read: Callable[[], bool], **kwargs: Any
        ) -> httpx.Response:
            response = client.request(method, path, **kwargs)
            assert response.status_code == expected, response.text
            # Straight after the answer, on another request: the write is there.
            assert read(), f"{method} {path} answered {expected}, then its write was missing"
            _answered_after_commit(server, response)
            return response

        def bank() -> dict[str, Any]:
            got = client.get("/v1/banks/durable", headers=admin)
            return got.json() if got.status_code == 200 else {}

        def entries() -> list[dict[str, Any]]:
            listed: list[dict[str, Any]] = client.get(
                "/v1/banks/durable/entries", headers=admin
            ).json()["entries"]
            return listed

        wrote(
            "POST", "/v1/banks", 201, lambda: bank() != {}, json={"name": "durable"}, headers=admin
        )
        wrote(
            "PATCH",
            "/v1/banks/durable",
            200,
            lambda: bank()["enabled"] is False,
            json={"enabled": False},
            headers=admin,
        )
        added = wrote(
            "POST",
            "/v1/banks/durable/entries",
            201,
            lambda: len(entries()) == 1,
            json={"entries": [{"sha256": "ab" * 32}]},
            headers=admin,
        )
        wrote(
            "POST",
            "/v1/banks/durable/import",
            200,
            lambda: len(entries()) == 2,
            files={"hashes": ("list.txt", io.BytesIO(f"{PDQ}\n".encode()), "text/plain")},
            headers=admin,
        )
        wrote(
            "POST",
            "/v1/banks/durable/entries/image",
            201,
            lambda: len(entries()) == 3,
            files={"image": ("known.png", io.BytesIO(image), "image/png")},
            headers=admin,
        )
        entry_id = added.json()["entries"][0]["id"]
        wrote(
            "DELETE",
            f"/v1/banks/durable/entries/{entry_id}",
            200,
            lambda: entry_id not in {e["id"] for e in entries()},
            headers=admin,
        )
        wrote(
            "POST",
            f"/v1/hits/{api_hit}/decision",
            200,
            lambda: (
                client.get(f"/v1/hits/{api_hit}", headers=reviewer).json()["review_status"]
                == "confirmed"
            ),
            json={"outcome": "confirm"},
            headers=reviewer,
        )
        wrote(
            "POST",
            f"/review/hits/{page_hit}/decision",
            303,
            lambda: (
                client.get(f"/v1/hits/{page_hit}", headers=reviewer).json()["review_status"]
                == "dismissed"
            ),
            data={"outcome": "dismiss"},
            headers=reviewer,
        )
        wrote(
            "POST",
            "/v1/uploads",
            202,
            lambda: (
                client.get(
                    "/v1/uploads", params={"external_id": "durable-1"}, headers=admin
                ).status_code
                == 200
            ),
            json={
                "uri": write(tmp_path / "up.png", image).resolve().as_uri(),
                "external_id": "durable-1",
            },
            headers=bearer(keys[Role.SUBMITTER]),
        )

        def model_state(name: str) -> str | None:
            listed = client.get("/v1/models", headers=admin).json()
            return next((m["state"] for m in listed if m["name"] == name), None)

        added_model = wrote(
            "POST",
            "/v1/models",
            201,
            lambda: model_state(str(tiny_siglip)) is not None,
            json={"name": str(tiny_siglip)},
            headers=admin,
        )
        wrote(
            "POST",
            f"/v1/models/{added_model.json()['id']}/activate",
            200,
            lambda: model_state(str(tiny_siglip)) == "active",
            headers=admin,
        )

        # The login page's "bounce": the next page, asked for at once, knows the session.
        login = client.post(
            "/login", data={"api_key": keys[Role.REVIEWER]}, headers={"Origin": server.url}
        )
        assert login.status_code == 303, login.text
        cookie = login.cookies["moderation_session"]
        queue = client.get("/review", headers={"Cookie": f"moderation_session={cookie}"})
        assert queue.status_code == 200
        _answered_after_commit(server, login)


@contextmanager
def terminated_before_commit(statement: str) -> Iterator[None]:
    """While the block runs, the transaction that runs a statement starting `statement`
    ("INSERT INTO banks") has its PostgreSQL backend ended, from another connection, just
    before it commits: the commit meets a dropped connection, as in a failover."""
    admin = create_engine(TEST_SETTINGS.database_url, isolation_level="AUTOCOMMIT")

    def note(conn: Connection, cursor: Any, sql: str, *_: Any) -> None:
        if sql.lstrip().upper().startswith(statement.upper()):
            conn.info["doomed"] = True

    def terminate(session: Session) -> None:
        conn = session.connection()
        if not conn.info.pop("doomed", False):
            return
        raw = conn.connection.dbapi_connection
        assert raw is not None
        pid = raw.info.backend_pid
        with admin.connect() as killer:
            assert killer.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    event.listen(Engine, "after_cursor_execute", note)
    event.listen(Session, "before_commit", terminate)
    try:
        yield
    finally:
        event.remove(Session, "before_commit", terminate)
        event.remove(Engine, "after_cursor_execute", note)
        admin.dispose()


@pytest.mark.parametrize(
    ("statement", "request_", "absent"),
    [
        pytest.param(
            "INSERT INTO banks",
            lambda client, keys, _: client.post(
                "/v1/banks", json={"name": "doomed"}, headers=bearer(keys[Role.ADMIN])
            ),
            lambda session, _: session.scalar(select(Bank).where(Bank.name == "doomed")) is None,
            id="bank creation",
        ),
        pytest.param(
            "UPDATE hits",
            lambda client, keys, hit_id: client.post(
                f"/v1/hits/{hit_id}/decision",
                json={"outcome": "dismiss"},
                headers=bearer(keys[Role.REVIEWER]),
            ),
            lambda session, hit_id: session.get(Hit, hit_id).review_status is ReviewStatus.PENDING,
            id="decision",
        ),
        pytest.param(
            "INSERT INTO web_sessions",
            lambda client, keys, _: client.post(
                "/login",
                data={"api_key": keys[Role.REVIEWER]},
                headers={"Origin": str(client.base_url).rstrip("/")},
            ),
            lambda session, _: session.scalar(select(WebSession)) is None,
            id="login",
        ),
    ],
)
def test_a_commit_that_fails_is_an_error_and_nothing_is_kept(
    server: LiveApi,
    keys: dict[Role, str],
    statement: str,
    request_: Callable[[httpx.Client, dict[Role, str], int], httpx.Response],
    absent: Callable[[Session, int], bool],
) -> None:
    hit_id = _hit("some-bank")
    with (
        terminated_before_commit(statement),
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        response = request_(client, keys, hit_id)
    assert response.status_code == 503, response.text
    assert "nothing was kept" in response.text
    with TEST_RUNTIME.session() as session:
        assert absent(session, hit_id)


def test_connections_the_database_dropped_answer_503_then_the_pool_recovers(
    server: LiveApi, keys: dict[Role, str]
) -> None:
    """A failover: every pooled connection of the server is ended while idle. The next
    requests meet them dead (no pre-ping, by design) at the key check or in the handler:
    each is a 503 that says to retry, never a 500, and the pool replaces what it found dead."""
    admin = bearer(keys[Role.ADMIN])
    database = TEST_SETTINGS.database_url.rsplit("/", 1)[1]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/v1/banks", headers=admin).status_code == 200
        with create_engine(TEST_SETTINGS.database_url).connect() as conn:
            ended = conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": database},
            )
        assert ended
        statuses = []
        try:
            for _ in range(TEST_SETTINGS.db_pool_size + 2):
                response = client.get("/v1/banks", headers=admin)
                statuses.append(response.status_code)
                if response.status_code == 503:
                    assert "retry" in response.json()["detail"]
        finally:
            TEST_RUNTIME.engine.dispose()  # the test's own connections were ended too
        assert set(statuses) <= {200, 503}, statuses
        assert 503 in statuses
        assert statuses[-1] == 200
