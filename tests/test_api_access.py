"""The one access check: every route decided, 401 without a valid key, 403 for other roles."""

from __future__ import annotations

from fastapi.testclient import TestClient

from moderation.audit.service import events_for
from moderation.auth import service as auth
from moderation.auth.models import Role
from moderation.http.access import route_roles
from moderation.http.routes import app_routes
from moderation.main.app import create_app
from tests.api_fixtures import api, bearer, keys
from tests.conftest import TEST_RUNTIME

__all__ = ["api", "keys"]


def test_every_route_names_who_may_call_it() -> None:
    routes = list(app_routes(create_app(TEST_RUNTIME)))
    undecided = [
        f"{sorted(route.methods or ())} {path}"
        for path, route in routes
        if route_roles(route) is not None and not route_roles(route)
    ]
    assert undecided == []
    assert {"/healthz", "/v1/audit"} <= {path for path, _ in routes}  # the walk finds them


def test_roles_are_published_in_the_openapi_spec(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    assert spec["paths"]["/v1/audit"]["get"]["x-roles"] == ["admin"]
    assert spec["paths"]["/healthz"]["get"]["x-public"] is True


def test_health_needs_no_key(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}


def test_no_key_or_a_wrong_key_is_401(api: TestClient, keys: dict[Role, str]) -> None:
    assert api.get("/v1/audit").status_code == 401
    assert api.get("/v1/audit", headers=bearer("mod_not-a-key")).status_code == 401
    assert api.get("/v1/audit", headers={"Authorization": "Basic abc"}).status_code == 401
    response = api.get("/v1/audit", headers=bearer(keys[Role.ADMIN] + "x"))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_role_not_admitted_is_403(api: TestClient, keys: dict[Role, str]) -> None:
    for role in (Role.SUBMITTER, Role.REVIEWER, Role.ANALYST):
        response = api.get("/v1/audit", headers=bearer(keys[role]))
        assert response.status_code == 403, role
        assert "admin" in response.json()["detail"]
    assert api.get("/v1/audit", headers=bearer(keys[Role.ADMIN])).status_code == 200


def test_a_revoked_key_is_refused_at_once(api: TestClient, keys: dict[Role, str]) -> None:
    admin = bearer(keys[Role.ADMIN])
    assert api.get("/v1/audit", headers=admin).status_code == 200
    with TEST_RUNTIME.session() as session:
        key = next(k for k in auth.list_keys(session) if k.role is Role.ADMIN)
        auth.revoke_key(session, key.id, actor="test")
    assert api.get("/v1/audit", headers=admin).status_code == 401


def test_keys_are_stored_hashed_and_their_changes_audited(keys: dict[Role, str]) -> None:
    with TEST_RUNTIME.session() as session:
        stored = auth.list_keys(session)
        assert {key.role for key in stored} == set(Role)
        for key in stored:
            assert key.key_hash == auth.hash_key(keys[key.role])
            assert keys[key.role] not in repr(events_for(session, "api_key", key.id)[0].after)
            assert [event.action for event in events_for(session, "api_key", key.id)] == [
                "apikey.create"
            ]


def test_the_audit_log_pages_newest_first(api: TestClient, keys: dict[Role, str]) -> None:
    admin = bearer(keys[Role.ADMIN])
    # The four keys' creations are the newest `apikey.create` events.
    first = api.get("/v1/audit", params={"action": "apikey.create", "limit": 3}, headers=admin)
    page = first.json()
    assert [event["action"] for event in page["events"]] == ["apikey.create"] * 3
    ids = [event["id"] for event in page["events"]]
    assert ids == sorted(ids, reverse=True)
    rest = api.get(
        "/v1/audit",
        params={"action": "apikey.create", "limit": 3, "before_id": page["next_before_id"]},
        headers=admin,
    ).json()
    assert rest["events"][0]["id"] < ids[-1]
