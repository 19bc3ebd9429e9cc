"""The review queue over HTTP: who may call what, paging, decisions and their answers."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.testclient import TestClient
from sqlalchemy import select

from moderation.audit.models import AuditEvent
from moderation.auth.models import Role
from moderation.review import service
from tests.api_fixtures import api, bearer, keys
from tests.conftest import TEST_RUNTIME
from tests.review_fixtures import make_bank, make_entry, make_hit, make_upload

__all__ = ["api", "keys"]


def _hits(count: int, per_upload: int = 1) -> list[int]:
    with TEST_RUNTIME.session() as session:
        bank = make_bank(session, "b")
        ids = []
        for _ in range(count):
            upload = make_upload(session)
            ids += [
                make_hit(session, upload, make_entry(session, bank)).id for _ in range(per_upload)
            ]
    return ids


def test_each_route_refuses_without_a_key_and_to_other_roles(
    api: TestClient, keys: dict[Role, str]
) -> None:
    (hit_id,) = _hits(1)
    decision = {"outcome": "dismiss"}
    routes = [
        ("GET", "/v1/hits", None, {Role.REVIEWER, Role.ANALYST, Role.ADMIN}),
        ("GET", f"/v1/hits/{hit_id}", None, {Role.REVIEWER, Role.ANALYST, Role.ADMIN}),
        ("POST", f"/v1/hits/{hit_id}/decision", decision, {Role.REVIEWER, Role.ADMIN}),
    ]
    for method, path, body, admitted in routes:
        assert api.request(method, path, json=body).status_code == 401, path
        assert api.request(method, path, json=body, headers=bearer("mod_x")).status_code == 401
        for role in Role:
            response = api.request(method, path, json=body, headers=bearer(keys[role]))
            expected = 200 if role in admitted else 403
            assert response.status_code == expected, (method, path, role, response.text)


def test_the_queue_pages_over_http_and_counts_what_is_pending(
    api: TestClient, keys: dict[Role, str]
) -> None:
    made = _hits(7)
    reader = bearer(keys[Role.ANALYST])
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/v1/hits", params=params, headers=reader).json()
        assert page["pending"] == 7
        seen += [hit["id"] for hit in page["hits"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(made, reverse=True)
    hit = api.get(f"/v1/hits/{made[0]}", headers=reader).json()
    assert hit["bank"] == "b"
    assert hit["signal"] == "sha256"
    assert (hit["threshold"], hit["threshold_source"]) == (0.0, "exact")
    assert hit["review_status"] == "pending"


def test_bad_queries_are_422_and_unknown_hits_404(api: TestClient, keys: dict[Role, str]) -> None:
    reviewer = bearer(keys[Role.REVIEWER])
    assert api.get("/v1/hits", params={"cursor": "garbage"}, headers=reviewer).status_code == 422
    assert api.get("/v1/hits", params={"status": "nope"}, headers=reviewer).status_code == 422
    naive = {"since": "2026-01-01T00:00:00"}
    assert api.get("/v1/hits", params=naive, headers=reviewer).status_code == 422
    assert api.get(f"/v1/hits/{2**63}", headers=reviewer).status_code == 422
    # PostgreSQL text holds no NUL: a bad request, not a driver error.
    assert api.get("/v1/hits", params={"bank": "a\x00b"}, headers=reviewer).status_code == 422
    huge = service.encode_cursor(datetime.now(UTC), 2**63)
    assert api.get("/v1/hits", params={"cursor": huge}, headers=reviewer).status_code == 422
    assert api.get("/v1/hits/999999", headers=reviewer).status_code == 404
    response = api.post("/v1/hits/999999/decision", json={"outcome": "confirm"}, headers=reviewer)
    assert response.status_code == 404
    response = api.post("/v1/hits/1/decision", json={"outcome": "maybe"}, headers=reviewer)
    assert response.status_code == 422
    (hit_id,) = _hits(1)
    nul = {"outcome": "confirm", "note": "a\x00b"}
    assert api.post(f"/v1/hits/{hit_id}/decision", json=nul, headers=reviewer).status_code == 422


def test_a_decision_over_http(api: TestClient, keys: dict[Role, str]) -> None:
    first, second = _hits(1, per_upload=2)
    reviewer = bearer(keys[Role.REVIEWER])
    body = {"outcome": "confirm", "note": "known image"}
    answer = api.post(f"/v1/hits/{second}/decision", json=body, headers=reviewer).json()
    assert answer["changed"] is True
    assert answer["decided_hit_ids"] == [first, second]
    assert {hit["review_status"] for hit in answer["hits"]} == {"confirmed"}
    assert {hit["reviewed_by"] for hit in answer["hits"]} == {f"key:{_key_id(api)}:test reviewer"}
    # The same decision again: nothing changes. Another: a conflict naming the first.
    again = api.post(f"/v1/hits/{first}/decision", json=body, headers=reviewer)
    assert again.status_code == 200
    assert again.json()["changed"] is False
    other = api.post(f"/v1/hits/{first}/decision", json={"outcome": "dismiss"}, headers=reviewer)
    assert other.status_code == 409
    assert "already confirmed by key:" in other.json()["detail"]
    # Out of the pending queue.
    assert api.get("/v1/hits", headers=reviewer).json()["hits"] == []
    with TEST_RUNTIME.session() as session:
        (event,) = session.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "review.decide",
                AuditEvent.subject_id == str(answer["upload_id"]),
            )
        )
        assert event.actor.endswith(":test reviewer")
        assert event.after is not None
        assert event.after["note"] == "known image"


def test_a_decision_covers_only_the_hits_the_reviewer_saw(
    api: TestClient, keys: dict[Role, str]
) -> None:
    shown, also_shown, found_since = _hits(1, per_upload=3)
    reviewer = bearer(keys[Role.REVIEWER])
    body = {"outcome": "dismiss", "seen_hit_ids": [also_shown]}
    answer = api.post(f"/v1/hits/{shown}/decision", json=body, headers=reviewer).json()
    assert answer["decided_hit_ids"] == [shown, also_shown]
    statuses = {hit["id"]: hit["review_status"] for hit in answer["hits"]}
    assert statuses == {shown: "dismissed", also_shown: "dismissed", found_since: "pending"}
    pending = api.get("/v1/hits", headers=reviewer).json()["hits"]
    assert [hit["id"] for hit in pending] == [found_since]


def _key_id(api: TestClient) -> int:
    from moderation.auth import service as auth

    with TEST_RUNTIME.session() as session:
        return next(k.id for k in auth.list_keys(session) if k.role is Role.REVIEWER)


def test_times_with_offsets_postgresql_refuses_are_taken_in_utc(
    api: TestClient, keys: dict[Role, str]
) -> None:
    # ISO 8601 allows offsets up to ±23:59; PostgreSQL refuses beyond ±15:59 (found by
    # schemathesis as a server error).
    headers = bearer(keys[Role.REVIEWER])
    response = api.get("/v1/hits", params={"since": "3412-08-30T18:56:36-18:36"}, headers=headers)
    assert response.status_code == 200, response.text
