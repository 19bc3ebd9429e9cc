"""GET /v1/search and POST /v1/search/image: analysts' searches over HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from moderation.auth.models import Role
from moderation.embedding.clip import ClipEmbedder
from moderation.embedding.service import embed_first_frame
from moderation.images.decode import DecodeLimits
from moderation.main.app import create_app
from moderation.runtime import Runtime
from moderation.search.snapshot import read_snapshot
from tests.api_fixtures import bearer, keys
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS
from tests.search_fixtures import (
    add_hit,
    add_upload,
    search_api,
    search_runtime,
    tiny_model,
    unit,
)

__all__ = ["keys", "search_api", "search_runtime"]

PHOTO = Path(__file__).parent / "data" / "photos" / "coffee.jpg"


def _corpus(count: int) -> list[int]:
    rng = np.random.default_rng(0)
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        return [add_upload(session, model, [v]) for v in unit(rng, count)]


def test_only_analysts_and_admins_may_search(search_api: TestClient, keys: dict[Role, str]) -> None:
    ids = _corpus(10)
    params = {"upload_id": ids[0], "k": 3}
    assert search_api.get("/v1/search", params=params).status_code == 401
    assert search_api.post("/v1/search/image", files={"image": b"x"}).status_code == 401
    for role in (Role.SUBMITTER, Role.REVIEWER):
        assert (
            search_api.get("/v1/search", params=params, headers=bearer(keys[role])).status_code
            == 403
        )
        response = search_api.post(
            "/v1/search/image", files={"image": b"x"}, headers=bearer(keys[role])
        )
        assert response.status_code == 403
    for role in (Role.ANALYST, Role.ADMIN):
        response = search_api.get("/v1/search", params=params, headers=bearer(keys[role]))
        assert response.status_code == 200, response.text
        assert [r["upload_id"] for r in response.json()["results"]][:1] == [ids[0]]


def test_search_by_upload_with_filters(search_api: TestClient, keys: dict[Role, str]) -> None:
    ids = _corpus(40)
    with TEST_RUNTIME.session() as session:
        for upload in ids[10:14]:
            add_hit(session, upload, "known-bad")
    analyst = bearer(keys[Role.ANALYST])
    body = search_api.get(
        "/v1/search",
        params={"upload_id": ids[0], "k": 3, "bank": "known-bad"},
        headers=analyst,
    ).json()
    assert body["model"]
    assert body["index_size"] == 40
    results = body["results"]
    assert len(results) == 3
    assert {r["upload_id"] for r in results} <= set(ids[10:14])
    assert all(r["hits"][0]["bank"] == "known-bad" for r in results)
    assert {"upload_id", "uri", "score", "screened_at", "hits"} <= results[0].keys()
    assert search_api.get("/v1/search", params={"k": 3}, headers=analyst).status_code == 422
    both: dict[str, int | str] = {"upload_id": ids[0], "text": "x"}
    assert search_api.get("/v1/search", params=both, headers=analyst).status_code == 422
    missing = search_api.get("/v1/search", params={"upload_id": max(ids) + 99}, headers=analyst)
    assert missing.status_code == 404
    assert "has no embedding" in missing.json()["detail"]
    too_many = {"upload_id": ids[0], "k": 5000}
    assert search_api.get("/v1/search", params=too_many, headers=analyst).status_code == 422
    # An unknown bank or an empty time range is a 422 with the reason, not "no results".
    unknown = search_api.get(
        "/v1/search", params={"upload_id": ids[0], "bank": "nope"}, headers=analyst
    )
    assert unknown.status_code == 422
    assert unknown.json()["code"] == "unknown_bank"
    assert "no bank named 'nope'" in unknown.json()["detail"]
    empty: dict[str, int | str] = {
        "upload_id": ids[0],
        "screened_from": "2026-02-01T00:00:00Z",
        "screened_until": "2026-01-01T00:00:00Z",
    }
    assert (
        search_api.get("/v1/search", params=empty, headers=analyst).json()["code"] == "bad_filter"
    )
    # Paging past the first k: offset, then the next k.
    everything = search_api.get(
        "/v1/search", params={"upload_id": ids[0], "k": 40}, headers=analyst
    )
    ranked = [r["upload_id"] for r in everything.json()["results"]]
    second = search_api.get(
        "/v1/search", params={"upload_id": ids[0], "k": 15, "offset": 15}, headers=analyst
    )
    assert [r["upload_id"] for r in second.json()["results"]] == ranked[15:30]


def test_search_by_text_and_by_image_upload(search_api: TestClient, keys: dict[Role, str]) -> None:
    _corpus(30)
    settings = TEST_SETTINGS
    embedder = ClipEmbedder(settings.resolved_model(), "cpu")
    _, photo_vector = embed_first_frame(
        PHOTO.read_bytes(), embedder, DecodeLimits.from_settings(settings)
    )
    text_vector = embedder.embed_texts(["a cup of coffee"])[0]
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        photo_upload = add_upload(session, model, [photo_vector])
        text_upload = add_upload(session, model, [text_vector])
    analyst = bearer(keys[Role.ANALYST])
    response = search_api.post(
        "/v1/search/image",
        params={"k": 2},
        files={"image": ("coffee.jpg", PHOTO.read_bytes(), "image/jpeg")},
        headers=analyst,
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["upload_id"] == photo_upload
    assert response.json()["results"][0]["score"] > 0.9999
    by_text = search_api.get(
        "/v1/search", params={"text": "a cup of coffee", "k": 1}, headers=analyst
    )
    assert [r["upload_id"] for r in by_text.json()["results"]] == [text_upload]
    broken = search_api.post(
        "/v1/search/image",
        files={"image": ("x.jpg", b"not an image", "image/jpeg")},
        headers=analyst,
    )
    assert broken.status_code == 422


def test_an_upload_screened_while_the_api_runs_is_found_within_seconds(
    search_api: TestClient, keys: dict[Role, str]
) -> None:
    ids = _corpus(20)
    analyst = bearer(keys[Role.ANALYST])
    assert (
        search_api.get("/v1/search", params={"upload_id": ids[0]}, headers=analyst).status_code
        == 200
    )
    vector = unit(np.random.default_rng(77))[0]
    with TEST_RUNTIME.session() as session:
        new = add_upload(session, tiny_model(session), [vector])
    screened_at = time.monotonic()
    # The index is followed by the API's own thread: no rebuild, no restart.
    while True:
        body = search_api.get(
            "/v1/search", params={"upload_id": new, "k": 1}, headers=analyst
        ).json()
        if [r["upload_id"] for r in body["results"]] == [new]:
            break
        assert time.monotonic() - screened_at < 10, "not searchable within 10 s"
        time.sleep(0.1)
    assert body["index_size"] == 21


def test_stopping_the_api_saves_what_it_added(
    search_runtime: Runtime, keys: dict[Role, str], clean_db: None
) -> None:
    """A restart then re-reads nothing that the stopped process had already indexed."""
    ids = _corpus(15)
    analyst = bearer(keys[Role.ANALYST])
    with TestClient(create_app(search_runtime)) as client:
        assert client.get("/v1/search", params={"upload_id": ids[0]}, headers=analyst).is_success
        with TEST_RUNTIME.session() as session:
            new = add_upload(session, tiny_model(session), list(unit(np.random.default_rng(5))))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            body = client.get("/v1/search", params={"upload_id": new, "k": 1}, headers=analyst)
            if body.json()["results"][0]["upload_id"] == new:
                break
            time.sleep(0.1)
    with TEST_RUNTIME.session() as session:
        model_id = tiny_model(session).id
    snapshot = read_snapshot(search_runtime.settings.index_dir, model_id)
    assert snapshot is not None
    assert sorted(snapshot.upload_ids.tolist()) == sorted([*ids, new])
