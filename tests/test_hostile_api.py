"""No 500 from input (issue 27, item 5): each input below once answered 500; each is now a
4xx that says what is wrong, and the same request done right still works.

JSON bodies are sent as raw text, since a lone surrogate ("\\ud800") or an overflowing
float (1e400) is something a client's JSON encoder would not write but an attacker does.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import httpx
import pytest
from fastapi.testclient import TestClient

from moderation.auth.models import Role
from moderation.main.app import create_app
from tests.api_fixtures import bearer, keys
from tests.conftest import TEST_RUNTIME
from tests.images import encode, textured, write
from tests.live_api import LiveApi, live_api
from tests.review_fixtures import make_bank, make_entry, make_hit, make_upload

__all__ = ["keys"]

JSON = {"Content-Type": "application/json"}


@pytest.fixture
def api(clean_db: None) -> Iterator[TestClient]:
    """In process over real PostgreSQL; a server error is answered 500, as a client sees
    it, not raised into the test."""
    with TestClient(create_app(TEST_RUNTIME), raise_server_exceptions=False) as client:
        yield client


class Answer(Protocol):
    """A response, from httpx or from the test client's own copy of it."""

    @property
    def status_code(self) -> int: ...
    @property
    def text(self) -> str: ...


def _refused(response: Answer, status: int = 422) -> str:
    assert response.status_code == status, response.text[:500]
    return response.text


def _cursor(created_at: str, hit_id: object) -> str:
    raw = json.dumps([created_at, hit_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param(_cursor("0001-01-01T00:00:00+01:00", 5), id="before year 1 in UTC"),
        pytest.param(_cursor("9999-12-31T23:59:59-01:00", 5), id="after year 9999 in UTC"),
        pytest.param(_cursor("2026-01-01T00:00:00+00:00", True), id="boolean id"),
        pytest.param(_cursor("2026-01-01T00:00:00+00:00", 5.0), id="float id"),
    ],
)
def test_odd_cursors_are_refused(api: TestClient, keys: dict[Role, str], cursor: str) -> None:
    reviewer = bearer(keys[Role.REVIEWER])
    response = api.get("/v1/hits", params={"cursor": cursor}, headers=reviewer)
    assert "cursor" in _refused(response)
    page = api.get("/review", params={"cursor": cursor}, headers=reviewer)
    assert page.status_code == 422


@pytest.mark.parametrize(
    "created_at",
    [
        pytest.param("2026-01-01T00:00:00+23:59", id="offset beyond PostgreSQL's"),
        pytest.param("2026-01-01T00:00:00+05:30:15.5", id="offset with seconds"),
    ],
)
def test_a_cursor_with_an_odd_but_valid_offset_pages_as_in_utc(
    api: TestClient, keys: dict[Role, str], created_at: str
) -> None:
    """Python parses offsets PostgreSQL refuses; the time is the same one in UTC."""
    response = api.get(
        "/v1/hits", params={"cursor": _cursor(created_at, 7)}, headers=bearer(keys[Role.ADMIN])
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:00:00+00:01",
        "9999-12-31T23:59:59-14:00",
        "0001-01-01T00:00:00+23:59",
    ],
)
@pytest.mark.parametrize(
    ("path", "names", "role"),
    [
        ("/v1/hits", ("since", "until"), Role.REVIEWER),
        ("/v1/search", ("screened_from", "screened_until"), Role.ANALYST),
    ],
)
def test_times_past_the_calendars_ends_are_refused(
    api: TestClient,
    keys: dict[Role, str],
    value: str,
    path: str,
    names: tuple[str, str],
    role: Role,
) -> None:
    for name in names:
        params = {name: value, "text": "a cat"} if path == "/v1/search" else {name: value}
        response = api.get(path, params=params, headers=bearer(keys[role]))
        assert name in _refused(response)


def test_times_at_the_calendars_ends_are_fine(api: TestClient, keys: dict[Role, str]) -> None:
    response = api.get(
        "/v1/hits",
        params={"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59Z"},
        headers=bearer(keys[Role.REVIEWER]),
    )
    assert response.status_code == 200, response.text


LONE = "\\ud800"  # as JSON text: a lone surrogate, which UTF-8 and PostgreSQL cannot hold


def test_a_lone_surrogate_in_an_upload_is_refused(
    api: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    submitter = {**JSON, **bearer(keys[Role.SUBMITTER])}
    uri = write(tmp_path / "a.png", encode(textured(1, (32, 32)), "PNG")).resolve().as_uri()
    bodies = {
        "external_id": f'{{"uri": "{uri}", "external_id": "evt-{LONE}"}}',
        "uri": f'{{"uri": "{uri}{LONE}"}}',
        "metadata": f'{{"uri": "{uri}", "metadata": {{"note": "a{LONE}"}}}}',
        "metadata key": f'{{"uri": "{uri}", "metadata": {{"k{LONE}": 1}}}}',
        "batch": f'{{"uploads": [{{"uri": "{uri}", "external_id": "{LONE}"}}]}}',
    }
    for where, body in bodies.items():
        answer = _refused(api.post("/v1/uploads", content=body, headers=submitter))
        assert "surrogate" in answer, where
    fine = api.post("/v1/uploads", json={"uri": uri, "external_id": "evt-1"}, headers=submitter)
    assert fine.status_code == 202, fine.text


def test_a_lone_surrogate_in_a_note_or_a_source_is_refused(
    api: TestClient, keys: dict[Role, str]
) -> None:

    with TEST_RUNTIME.session() as session:
        bank = make_bank(session, "notes")
        hit_id = make_hit(session, make_upload(session), make_entry(session, bank)).id
    reviewer = {**JSON, **bearer(keys[Role.REVIEWER])}
    decision = f'{{"outcome": "confirm", "note": "seen {LONE}"}}'
    _refused(api.post(f"/v1/hits/{hit_id}/decision", content=decision, headers=reviewer))
    # The page's form, percent-encoded: the surrogate's would-be UTF-8 bytes.
    form = "outcome=confirm&note=seen+%ED%A0%80"
    page = api.post(
        f"/review/hits/{hit_id}/decision",
        content=form,
        headers={
            **bearer(keys[Role.REVIEWER]),
            "Content-Type": "application/x-www-form-urlencoded",
        },
        follow_redirects=False,
    )
    assert page.status_code in (303, 422), page.text[:300]
    admin = {**JSON, **bearer(keys[Role.ADMIN])}
    entry = f'{{"entries": [{{"sha256": "{"ab" * 32}", "source_ref": "vault/{LONE}"}}]}}'
    _refused(api.post("/v1/banks/notes/entries", content=entry, headers=admin))
    model = f'{{"name": "m{LONE}"}}'
    _refused(api.post("/v1/models", content=model, headers=admin))


def test_a_float_that_overflows_is_refused_with_its_reason(
    api: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    uri = write(tmp_path / "a.png", encode(textured(1, (32, 32)), "PNG")).resolve().as_uri()
    body = f'{{"uri": "{uri}", "metadata": {{"score": 1e400}}}}'
    answer = _refused(
        api.post("/v1/uploads", content=body, headers={**JSON, **bearer(keys[Role.SUBMITTER])})
    )
    assert "NaN or Infinity" in answer
    with_bank = api.post("/v1/banks", json={"name": "floats"}, headers=bearer(keys[Role.ADMIN]))
    assert with_bank.status_code == 201
    entry = '{"entries": [{"embedding": [1e400, 0.5]}]}'
    _refused(
        api.post(
            "/v1/banks/floats/entries",
            content=entry,
            headers={**JSON, **bearer(keys[Role.ADMIN])},
        )
    )


@pytest.mark.parametrize(
    ("path", "params", "role"),
    [
        ("/v1/uploads", {"external_id": "a\x00b"}, Role.REVIEWER),
        ("/v1/hits", {"bank": "a\x00b"}, Role.REVIEWER),
        ("/v1/audit", {"action": "a\x00b"}, Role.ADMIN),
        ("/v1/audit", {"subject_id": "\x00"}, Role.ADMIN),
        ("/v1/search", {"text": "a\x00cat"}, Role.ANALYST),
        ("/v1/banks/a%00b", {}, Role.ADMIN),
        ("/review", {"bank": "a\x00b"}, Role.REVIEWER),
    ],
)
def test_a_nul_in_a_query_parameter_or_path_is_refused(
    api: TestClient, keys: dict[Role, str], path: str, params: dict[str, str], role: Role
) -> None:
    response = api.get(path, params=params, headers=bearer(keys[role]))
    assert "NUL" in _refused(response)


def test_ids_beyond_a_bigint_are_refused(api: TestClient, keys: dict[Role, str]) -> None:
    response = api.get("/v1/audit", params={"before_id": 2**64}, headers=bearer(keys[Role.ADMIN]))
    _refused(response)


@pytest.fixture
def server(clean_db: None) -> Iterator[LiveApi]:
    with live_api() as live:
        yield live


def test_concurrent_creation_of_one_bank_is_one_201_and_the_rest_409(
    server: LiveApi, keys: dict[Role, str]
) -> None:
    contenders = 12
    start = threading.Barrier(contenders)
    statuses: list[int] = []

    def create() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            start.wait()
            response = client.post(
                "/v1/banks", json={"name": "contested"}, headers=bearer(keys[Role.ADMIN])
            )
            statuses.append(response.status_code)

    threads = [threading.Thread(target=create) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [201] + [409] * (contenders - 1)
