"""`POST /v1/uploads` and `GET /v1/uploads`: the producer's path, over real PostgreSQL and
Redis, and through a real worker at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from moderation.auth.models import Role
from moderation.banks import service as banks
from moderation.images.hashing import sha256
from moderation.screening.models import Upload
from moderation.worker.child import WorkerProcess
from tests.api_fixtures import announced, api, bearer, keys
from tests.conftest import TEST_ENV, TEST_RUNTIME
from tests.images import encode, textured, write
from tests.queues import queue, queue_runtime, queued_uploads
from tests.redis_server import RedisServer
from tests.servers import tcp_listener

__all__ = ["api", "keys", "queue", "queue_runtime"]


def _image(tmp_path: Path, seed: int) -> str:
    return write(tmp_path / f"{seed}.jpg", encode(textured(seed))).resolve().as_uri()


def _upload_count() -> int:
    with TEST_RUNTIME.session() as session:
        return session.scalar(select(func.count()).select_from(Upload)) or 0


def test_one_event_is_a_row_and_then_a_message(
    api: TestClient,
    keys: dict[Role, str],
    tmp_path: Path,
    queue: str,
    redis_client: redis.Redis,
) -> None:
    uri = _image(tmp_path, 1)
    response = api.post(
        "/v1/uploads",
        json={"uri": uri, "external_id": "evt-1", "metadata": {"user": 7, "surface": "chat"}},
        headers=bearer(keys[Role.SUBMITTER]),
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["external_id"] == "evt-1"
    assert accepted["created"] is True
    announced(api)
    assert queued_uploads(redis_client, queue) == [accepted["upload_id"]]

    shown = api.get(
        f"/v1/uploads/{accepted['upload_id']}", headers=bearer(keys[Role.SUBMITTER])
    ).json()
    assert shown["status"] == "queued"
    assert (shown["uri"], shown["external_id"], shown["error"]) == (uri, "evt-1", None)
    assert shown["metadata"] == {"user": 7, "surface": "chat"}
    assert (shown["signals"], shown["hits"]) == ([], [])


def test_the_same_external_id_twice_is_the_same_upload_and_one_message(
    api: TestClient,
    keys: dict[Role, str],
    tmp_path: Path,
    queue: str,
    redis_client: redis.Redis,
) -> None:
    uri = _image(tmp_path, 2)
    event = {"uri": uri, "external_id": "evt-2"}
    submitter = bearer(keys[Role.SUBMITTER])
    first = api.post("/v1/uploads", json=event, headers=submitter).json()
    again = api.post("/v1/uploads", json=event, headers=submitter).json()
    in_a_batch = api.post("/v1/uploads", json={"uploads": [event, event]}, headers=submitter).json()
    assert again == {**first, "created": False}
    assert [u["upload_id"] for u in in_a_batch["uploads"]] == [first["upload_id"]] * 2
    assert _upload_count() == 1
    announced(api)
    assert queued_uploads(redis_client, queue) == [first["upload_id"]]
    found = api.get(
        "/v1/uploads", params={"external_id": "evt-2"}, headers=bearer(keys[Role.ANALYST])
    ).json()
    assert [u["upload_id"] for u in found["uploads"]] == [first["upload_id"]]
    none = api.get("/v1/uploads", params={"external_id": "nope"}, headers=submitter).json()
    assert none == {"uploads": []}


def test_an_external_id_with_another_uri_is_a_conflict(
    api: TestClient, keys: dict[Role, str], tmp_path: Path, queue: str
) -> None:
    submitter = bearer(keys[Role.SUBMITTER])
    first = api.post(
        "/v1/uploads", json={"uri": _image(tmp_path, 3), "external_id": "evt-3"}, headers=submitter
    ).json()
    other = {"uri": _image(tmp_path, 4), "external_id": "evt-3"}
    response = api.post("/v1/uploads", json=other, headers=submitter)
    assert response.status_code == 409
    assert response.json()["upload_id"] == first["upload_id"]
    assert response.json()["code"] == "external_id_conflict"
    assert "use a new external id" in response.json()["detail"]
    # In a batch the conflict refuses the whole batch: the good event is not recorded either.
    batch = {"uploads": [{"uri": _image(tmp_path, 5), "external_id": "evt-4"}, other]}
    assert api.post("/v1/uploads", json=batch, headers=submitter).status_code == 409
    assert _upload_count() == 1


def test_declared_bytes_that_differ_are_a_conflict(
    api: TestClient, keys: dict[Role, str], tmp_path: Path, queue: str
) -> None:
    submitter = bearer(keys[Role.SUBMITTER])
    uri = _image(tmp_path, 6)
    digest = sha256(Path(uri.removeprefix("file://")).read_bytes()).hex()
    event = {"uri": uri, "external_id": "evt-5", "sha256": digest}
    assert api.post("/v1/uploads", json=event, headers=submitter).status_code == 202
    assert api.post("/v1/uploads", json=event, headers=submitter).json()["created"] is False
    changed = {**event, "sha256": "00" * 32}
    assert api.post("/v1/uploads", json=changed, headers=submitter).status_code == 409


def test_declared_bytes_added_before_screening_are_refused_alone_and_in_a_batch(
    api: TestClient, keys: dict[Role, str], tmp_path: Path, queue: str
) -> None:
    """A repeat that adds a SHA-256 to an upload not yet screened cannot bind its bytes
    (the worker screens what the first submit declared): refused, never accepted and
    ignored."""
    submitter = bearer(keys[Role.SUBMITTER])
    uri = _image(tmp_path, 7)
    digest = sha256(Path(uri.removeprefix("file://")).read_bytes()).hex()
    first = api.post("/v1/uploads", json={"uri": uri, "external_id": "evt-7"}, headers=submitter)
    assert first.status_code == 202
    added = {"uri": uri, "external_id": "evt-7", "sha256": digest}
    refused = api.post("/v1/uploads", json=added, headers=submitter)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "external_id_conflict"
    assert "cannot be bound" in refused.json()["detail"]
    with TEST_RUNTIME.session() as session:
        upload = session.get_one(Upload, first.json()["upload_id"])
        assert upload.declared_sha256 is None
    # The same within one batch: the first event declares nothing, its repeat adds bytes.
    batch = {
        "uploads": [
            {"uri": _image(tmp_path, 8), "external_id": "evt-8"},
            {"uri": _image(tmp_path, 8), "external_id": "evt-8", "sha256": "11" * 32},
        ]
    }
    assert api.post("/v1/uploads", json=batch, headers=submitter).status_code == 409
    with TEST_RUNTIME.session() as session:
        assert session.scalar(select(Upload).where(Upload.external_id == "evt-8")) is None


def test_a_batch_keeps_its_order(
    api: TestClient,
    keys: dict[Role, str],
    tmp_path: Path,
    queue: str,
    redis_client: redis.Redis,
) -> None:
    uris = [_image(tmp_path, 10 + i) for i in range(5)]
    events: list[dict[str, Any]] = [{"uri": uri} for uri in uris]
    events[1]["external_id"] = "batch-1"
    events[3]["external_id"] = "batch-3"
    response = api.post("/v1/uploads", json={"uploads": events}, headers=bearer(keys[Role.ADMIN]))
    assert response.status_code == 202, response.text
    accepted = response.json()["uploads"]
    assert [a["external_id"] for a in accepted] == [None, "batch-1", None, "batch-3", None]
    with TEST_RUNTIME.session() as session:
        rows = {u.id: u.uri for u in session.scalars(select(Upload))}
    assert [rows[a["upload_id"]] for a in accepted] == uris
    announced(api)
    assert sorted(queued_uploads(redis_client, queue)) == sorted(a["upload_id"] for a in accepted)


def test_a_refused_uri_is_422_naming_the_rule_and_nothing_is_fetched(
    api: TestClient,
    keys: dict[Role, str],
    tmp_path: Path,
    queue: str,
    redis_client: redis.Redis,
) -> None:
    submitter = bearer(keys[Role.SUBMITTER])
    # 127.0.0.2 is loopback and outside the tests' allowed network: never to be fetched.
    with tcp_listener("127.0.0.2") as listener:
        inside = f"{listener.url}/image.jpg"
        response = api.post("/v1/uploads", json={"uri": inside}, headers=submitter)
        assert response.status_code == 422
        answer = response.json()
        assert answer["code"] == "uri_refused"
        (refused,) = answer["refused"]
        assert refused["index"] == 0
        assert "non-public address (loopback)" in refused["rule"]

        # One refused URI refuses the batch; every refused item is named by its index.
        batch = {
            "uploads": [
                {"uri": _image(tmp_path, 20)},
                {"uri": inside},
                {"uri": "file:///etc/passwd"},
                {"uri": "gopher://example.com/x"},
            ]
        }
        response = api.post("/v1/uploads", json=batch, headers=submitter)
        assert response.status_code == 422
        refusals = {r["index"]: r for r in response.json()["refused"]}
        assert sorted(refusals) == [1, 2, 3]
        assert "MODERATION_ALLOWED_URI_PREFIXES" in refusals[2]["rule"]
        assert refusals[3]["code"] == "unsupported_uri"
        assert listener.connections_so_far() == 0
    assert _upload_count() == 0
    announced(api)
    assert redis_client.llen(queue) == 0


def test_malformed_events_are_422(api: TestClient, keys: dict[Role, str]) -> None:
    submitter = bearer(keys[Role.SUBMITTER])
    bodies: list[dict[str, Any]] = [
        {},
        {"uri": ""},
        {"uri": "https://example.com/a.jpg", "unknown": 1},
        {"uri": "https://example.com/a.jpg", "sha256": "zz"},
        {"uri": "https://example.com/a\x00.jpg"},
        {"uri": "https://example.com/a.jpg", "metadata": {"a": "\x00"}},
        {"uploads": []},
    ]
    for body in bodies:
        assert api.post("/v1/uploads", json=body, headers=submitter).status_code == 422, body
    assert _upload_count() == 0


def test_who_may_submit_and_read(api: TestClient, keys: dict[Role, str], tmp_path: Path) -> None:
    event = {"uri": _image(tmp_path, 30)}
    assert api.post("/v1/uploads", json=event).status_code == 401
    assert api.get("/v1/uploads/1").status_code == 401
    assert api.get("/v1/uploads", params={"external_id": "x"}).status_code == 401
    for role in (Role.REVIEWER, Role.ANALYST):
        assert api.post("/v1/uploads", json=event, headers=bearer(keys[role])).status_code == 403
    upload_id = api.post("/v1/uploads", json=event, headers=bearer(keys[Role.SUBMITTER])).json()[
        "upload_id"
    ]
    for role in Role:
        headers = bearer(keys[role])
        assert api.get(f"/v1/uploads/{upload_id}", headers=headers).status_code == 200, role
        found = api.get("/v1/uploads", params={"external_id": "x"}, headers=headers)
        assert found.status_code == 200, role
    missing = api.get("/v1/uploads/999999999", headers=bearer(keys[Role.REVIEWER]))
    assert missing.status_code == 404


@pytest.mark.e2e
def test_an_upload_through_the_api_is_screened_and_its_hits_shown(
    api: TestClient, keys: dict[Role, str], tmp_path: Path, worker: WorkerProcess
) -> None:
    # Stored sideways, as phones store photos: its signals include frame 0's PDQ as stored.
    sideways = Image.Exif()
    sideways[0x0112] = 6
    banked = encode(textured(40), exif=sideways)
    image = write(tmp_path / "bad.jpg", banked)
    with TEST_RUNTIME.session() as session:
        bank = banks.create_bank(session, "api-e2e")
        banks.add_entries(session, bank, [banks.NewEntry(sha256=sha256(banked))], added_by="test")
    submitter = bearer(keys[Role.SUBMITTER])
    upload_id = api.post(
        "/v1/uploads",
        json={"uri": image.resolve().as_uri(), "external_id": "e2e-1"},
        headers=submitter,
    ).json()["upload_id"]
    deadline = time.monotonic() + 60
    shown: dict[str, Any] = {}
    while time.monotonic() < deadline:
        shown = api.get(f"/v1/uploads/{upload_id}", headers=submitter).json()
        if shown["status"] in ("screened", "failed"):
            break
        time.sleep(0.2)
    assert shown["status"] == "screened", shown
    assert shown["error"] is None
    signals = {(s["signal"], s["frame_index"], s["as_stored"]) for s in shown["signals"]}
    assert signals == {("sha256", 0, False), ("pdq", 0, False), ("pdq", 0, True)}
    sha_signal = next(s for s in shown["signals"] if s["signal"] == "sha256")
    assert sha_signal["value"] == sha256(banked).hex()
    hits = {h["signal"]: h for h in shown["hits"]}
    assert hits["sha256"]["bank"] == "api-e2e"
    assert hits["sha256"]["distance"] == 0
    assert hits["sha256"]["review_status"] == "pending"


def test_with_redis_down_the_upload_is_accepted_and_announced_once_it_is_back(
    keys: dict[Role, str], tmp_path: Path
) -> None:
    """The API as production runs it, its broker down: the row commits, the producer gets
    its 202 (the upload is safe; delivering it is the service's job), and the process sends
    the message once Redis answers, without waiting for a sweeper."""
    broker = RedisServer(_free_port(), tmp_path)
    queue = f"api-redis-down-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    env = {**os.environ, **TEST_ENV, "MODERATION_REDIS_URL": broker.url, "MODERATION_QUEUE": queue}
    log = (tmp_path / "api.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moderation", "api", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{base}/healthz")
        response = httpx.post(
            f"{base}/v1/uploads",
            json={"uri": _image(tmp_path, 50), "external_id": "redis-down"},
            headers=bearer(keys[Role.SUBMITTER]),
            timeout=30,
        )
        ready = httpx.get(f"{base}/readyz", timeout=30)
        assert response.status_code == 202, response.text
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"].startswith("unreachable")
        with TEST_RUNTIME.session() as session:
            (upload,) = session.scalars(select(Upload)).all()
        assert (upload.external_id, upload.status.value) == ("redis-down", "queued")
        assert upload.id == response.json()["upload_id"]

        broker.start()
        client = redis.Redis(port=broker.port)
        deadline = time.monotonic() + 30  # retries back off 0.5, 1, 2, 4, 8 s
        while not queued_uploads(client, queue) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queued_uploads(client, queue) == [upload.id]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        broker.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_for(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)
