"""Authenticate before reading (issue 27, item 2), against a real uvicorn server: a request
without a valid key, or with a body over its route's limit, is answered before its body is
sent at all; a body longer than it declared is cut off at the limit; a refused input is
never echoed back beyond a short excerpt.

"Before the body is read" is observed directly: the client sends the request's head only,
declaring a large body, and waits for the answer. A server that reads first waits forever
for bytes that never come (here: until the socket's timeout).
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from moderation.auth.models import Role
from tests.api_fixtures import bearer, keys
from tests.conftest import TEST_SETTINGS
from tests.live_api import LiveApi, live_api

__all__ = ["keys"]

ANSWER_WITHIN_S = 10.0
MIB = 1024 * 1024


@pytest.fixture
def server(clean_db: None) -> Iterator[LiveApi]:
    with live_api() as live:
        yield live


def _head_only(
    server: LiveApi, method: str, path: str, length: int, headers: dict[str, str]
) -> tuple[int, dict[str, str]]:
    """Send a request's head declaring `length` bytes of body, send none of them, and read
    the answer's status and headers."""
    address = urlsplit(server.url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {address.netloc}", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((address.hostname, address.port), ANSWER_WITHIN_S) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        try:
            while b"\r\n\r\n" not in received:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            pytest.fail(f"{method} {path}: no answer in {ANSWER_WITHIN_S} s without the body")
    head = received.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    answer_headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in head[1:])
    }
    return status, answer_headers


JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "multipart/form-data; boundary=b0undary"}


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/v1/uploads", JSON),
        ("POST", "/v1/banks", JSON),
        ("POST", "/v1/banks/any/entries/image", FORM),
        ("POST", "/v1/search/image", FORM),
        ("POST", "/v1/banks/any/import", FORM),
    ],
)
def test_no_key_is_refused_before_the_body(
    server: LiveApi, method: str, path: str, headers: dict[str, str]
) -> None:
    status, answer = _head_only(server, method, path, 300 * MIB, headers)
    assert status == 401
    assert answer["www-authenticate"] == "Bearer"
    status, _ = _head_only(
        server, method, path, 300 * MIB, {**headers, "Authorization": "Bearer mod_not-a-key"}
    )
    assert status == 401


def test_a_role_the_route_does_not_admit_is_refused_before_the_body(
    server: LiveApi, keys: dict[Role, str]
) -> None:
    status, _ = _head_only(
        server, "POST", "/v1/banks", 30 * MIB, {**JSON, **bearer(keys[Role.SUBMITTER])}
    )
    assert status == 403


def test_the_pages_send_a_missing_login_to_the_login_form_before_the_body(
    server: LiveApi,
) -> None:
    status, answer = _head_only(
        server,
        "POST",
        "/review/hits/1/decision",
        30 * MIB,
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 303
    assert answer["location"].startswith("/login?next=")


def test_a_declared_length_over_the_routes_limit_is_refused_before_the_body(
    server: LiveApi, keys: dict[Role, str]
) -> None:
    settings = TEST_SETTINGS
    admin = bearer(keys[Role.ADMIN])
    over_json = settings.max_body_bytes + 1
    status, _ = _head_only(server, "POST", "/v1/banks", over_json, {**JSON, **admin})
    assert status == 413
    over_image = settings.max_bytes + 64 * 1024 + 1
    status, _ = _head_only(
        server, "POST", "/v1/banks/any/entries/image", over_image, {**FORM, **admin}
    )
    assert status == 413


def test_a_body_longer_than_the_limit_is_cut_off_as_it_streams(
    server: LiveApi, keys: dict[Role, str]
) -> None:
    """Chunked, so nothing is declared: the server counts what arrives."""
    limit = TEST_SETTINGS.max_body_bytes

    def chunks() -> Iterator[bytes]:
        yield b'{"uploads": ['
        piece = b'{"uri": "https://img.example/a.jpg"},' * 1000
        sent = 0
        while sent <= limit:
            yield piece
            sent += len(piece)
        yield b'{"uri": "https://img.example/a.jpg"}]}'

    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post(
            "/v1/uploads", content=chunks(), headers={**JSON, **bearer(keys[Role.SUBMITTER])}
        )
    assert response.status_code == 413, response.text[:300]
    assert "MODERATION_MAX_BODY_BYTES" in response.json()["detail"]


def test_an_image_route_takes_an_image_over_the_json_limit(
    server: LiveApi, keys: dict[Role, str]
) -> None:
    """The limit is the route's: 9 MiB of (not an) image reaches the handler, which says
    what is wrong with it, where a 9 MiB JSON body would be a 413."""
    junk = b"\x00" * (TEST_SETTINGS.max_body_bytes + MIB)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        created = client.post("/v1/banks", json={"name": "big"}, headers=bearer(keys[Role.ADMIN]))
        assert created.status_code == 201
        response = client.post(
            "/v1/banks/big/entries/image",
            files={"image": ("junk.png", io.BytesIO(junk), "image/png")},
            headers=bearer(keys[Role.ADMIN]),
        )
    assert response.status_code == 422, response.text[:300]


def test_an_invalid_batch_is_answered_with_a_bounded_excerpt(
    server: LiveApi, keys: dict[Role, str]
) -> None:
    """5 MB of invalid events: the 422 names the first errors with short excerpts
    (it was 14 MB, echoing every input)."""
    event = {"uri": "https://img.example/" + "a" * 4000, "not_a_field": "b" * 1000}
    body = json.dumps({"uploads": [event] * 1000}).encode()
    assert len(body) > 5_000_000
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post(
            "/v1/uploads", content=body, headers={**JSON, **bearer(keys[Role.SUBMITTER])}
        )
    assert response.status_code == 422
    assert len(response.content) < 20_000
    answer = response.json()
    assert answer["errors_not_shown"] > 0
    first = answer["detail"][0]
    assert len(first["input"]) < 200
    assert first["loc"][:2] == ["body", "UploadIn"] or "uploads" in first["loc"]


def test_refused_uris_are_named_by_index_and_quoted_short(
    server: LiveApi, keys: dict[Role, str]
) -> None:
    """Each refused URI is named (its index), its text cut to an excerpt: 1000 refused
    8 KB URIs were echoed back whole."""
    event = {"uri": "ftp://refused.example/" + "a" * 8000}
    body = json.dumps({"uploads": [event] * 1000}).encode()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post(
            "/v1/uploads", content=body, headers={**JSON, **bearer(keys[Role.SUBMITTER])}
        )
    assert response.status_code == 422, response.text[:300]
    refused = response.json()["refused"]
    assert [item["index"] for item in refused] == list(range(1000))
    assert all(len(item["uri"]) <= 201 for item in refused)
    assert len(response.content) < len(body) / 10


def test_a_decision_form_too_long_to_keep_is_not_read_past_its_cap(server: LiveApi) -> None:
    """Without a login a decision form is read to be kept for after the next login (the
    pages' lapsed-session rescue), but never past its small cap: a longer body, chunked so
    that no length is declared, gets the same login redirect, with nothing kept."""
    base = urlsplit(server.url)

    def chunks() -> Iterator[bytes]:
        yield b"outcome=confirm&note="
        for _ in range(64):
            yield b"x" * (16 * 1024)  # 1 MiB in all, over the form's 256 KiB

    answer = httpx.post(
        f"{server.url}/review/hits/1/decision",
        content=chunks(),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Origin": f"{base.scheme}://{base.netloc}",
        },
        timeout=ANSWER_WITHIN_S,
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?next=/review"
