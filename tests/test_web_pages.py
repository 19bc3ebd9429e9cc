"""The web pages through the application, in-process over real PostgreSQL: login and the
session cookie, role checks, the login redirect, cross-site refusals, thumbnails, and the
upload and bank pages."""

from __future__ import annotations

import io
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import delete, select, update

from moderation.audit.service import events_for
from moderation.auth import service as auth
from moderation.auth.models import Role
from moderation.http.access import route_roles
from moderation.http.routes import app_routes
from moderation.main.app import create_app
from moderation.review.models import Hit
from moderation.review.tasks import CHORES as REVIEW_CHORES
from moderation.runtime import Runtime
from moderation.screening.models import Upload
from moderation.web import service as web
from moderation.web.models import WebSession
from moderation.web.service import COOKIE_NAME
from tests.api_fixtures import bearer, keys
from tests.conftest import TEST_RUNTIME
from tests.web_fixtures import SAME_ORIGIN, log_in, seed_hit, site

(CAPTURE,) = REVIEW_CHORES

__all__ = ["keys", "site"]


def test_every_page_names_who_may_see_it(runtime: Runtime) -> None:
    paths = {path: route_roles(route) for path, route in app_routes(create_app(runtime))}
    assert paths["/login"] is None  # public
    assert paths["/review/banks"] == frozenset({Role.REVIEWER, Role.ANALYST, Role.ADMIN})
    assert all(roles is None or roles for roles in paths.values())


def _csrf(client: TestClient) -> str:
    return web.csrf_token(client.cookies[COOKIE_NAME])


def test_login_sets_a_secure_httponly_strict_cookie(
    site: TestClient, keys: dict[Role, str]
) -> None:
    response = site.post("/login", data={"api_key": keys[Role.REVIEWER]}, headers=SAME_ORIGIN)
    assert response.status_code == 303
    assert response.headers["location"] == "/review"
    cookie = response.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"secure", "httponly", "path", "max-age"} <= attributes
    assert "samesite=strict" in cookie.lower()
    token = site.cookies[COOKIE_NAME]
    # The cookie holds a session token, never the key; the server keeps only its hash.
    assert keys[Role.REVIEWER] not in cookie
    with TEST_RUNTIME.session() as session:
        stored = session.scalars(select(WebSession)).one()
        assert token.encode() not in stored.token_hash
        assert stored.expires_at > datetime.now(UTC) + timedelta(hours=11)
    assert site.get("/review/banks").status_code == 200


def test_a_wrong_or_submitter_key_is_refused_at_login(
    site: TestClient, keys: dict[Role, str]
) -> None:
    for key in ("mod_not-a-key", keys[Role.SUBMITTER]):
        response = site.post("/login", data={"api_key": key}, headers=SAME_ORIGIN)
        assert response.status_code == 401
        assert "set-cookie" not in response.headers
        assert 'role="alert"' in response.text
    with TEST_RUNTIME.session() as session:
        assert session.scalars(select(WebSession)).all() == []


def test_pages_without_a_login_redirect_to_the_login_form(site: TestClient) -> None:
    response = site.get("/review/banks/3?x=1")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=/review/banks/3%3Fx%3D1"
    form = site.get(response.headers["location"])
    assert form.status_code == 200
    assert 'name="next" value="/review/banks/3?x=1"' in form.text
    # The JSON API still answers JSON.
    assert site.get("/v1/audit").json()["detail"].startswith("a valid API key is required")


def test_login_returns_to_the_page_asked_for_and_only_on_this_site(
    site: TestClient, keys: dict[Role, str]
) -> None:
    key = keys[Role.REVIEWER]
    for asked, landed in (("/review/banks", "/review/banks"), ("//evil.example/", "/review")):
        response = site.post("/login", data={"api_key": key, "next": asked}, headers=SAME_ORIGIN)
        assert response.headers["location"] == landed


def test_logout_ends_the_session(site: TestClient, keys: dict[Role, str]) -> None:
    token = log_in(site, keys[Role.REVIEWER])
    response = site.post("/logout", data={"csrf": _csrf(site)}, headers=SAME_ORIGIN)
    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    assert COOKIE_NAME not in site.cookies
    # The old token, replayed, opens nothing.
    site.cookies.set(COOKIE_NAME, token)
    assert site.get("/review/banks").status_code == 303
    with TEST_RUNTIME.session() as session:
        (stored,) = session.scalars(select(WebSession))
        assert stored.revoked_at is not None
        actions = [event.action for event in events_for(session, "web_session", stored.id)]
    assert actions == ["web.login", "web.logout"]


def test_a_revoked_keys_session_stops_working(site: TestClient, keys: dict[Role, str]) -> None:
    log_in(site, keys[Role.REVIEWER])
    assert site.get("/review/banks").status_code == 200
    with TEST_RUNTIME.session() as session:
        key = next(k for k in auth.list_keys(session) if k.role is Role.REVIEWER)
        auth.revoke_key(session, key.id, actor="test")
    response = site.get("/review/banks")
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login")


def test_an_expired_session_stops_working(site: TestClient, keys: dict[Role, str]) -> None:
    log_in(site, keys[Role.ANALYST])
    assert site.get("/review/banks").status_code == 200
    with TEST_RUNTIME.session() as session:
        session.execute(update(WebSession).values(expires_at=datetime.now(UTC)))
    assert site.get("/review/banks").status_code == 303


def test_pages_apply_the_role_policy(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = seed_hit(tmp_path)
    readable = [
        "/review/banks",
        f"/review/banks/{seeded.bank_id}",
        f"/review/uploads/{seeded.upload_id}",
    ]
    for role, status in ((Role.ANALYST, 200), (Role.REVIEWER, 200), (Role.ADMIN, 200)):
        for path in readable:
            assert site.get(path, headers=bearer(keys[role])).status_code == status, (role, path)
    for path in readable:
        response = site.get(path, headers=bearer(keys[Role.SUBMITTER]))
        assert response.status_code == 403
        assert "text/html" in response.headers["content-type"]
        assert "role submitter may not do this" in response.text
    # The same through the cookie.
    log_in(site, keys[Role.ANALYST])
    assert site.get(readable[0]).status_code == 200


def test_cross_site_forms_are_refused(site: TestClient, keys: dict[Role, str]) -> None:
    log_in(site, keys[Role.REVIEWER])
    evil = {"Origin": "https://evil.example"}
    # The cookie alone never changes state from another site, nor without an Origin.
    for headers in (evil, {}):
        response = site.post("/logout", data={"csrf": _csrf(site)}, headers=headers)
        assert response.status_code == 403
        assert "cross-site request refused" in response.text
    # From this site but without the form's token: refused too.
    response = site.post("/logout", data={"csrf": "0" * 64}, headers=SAME_ORIGIN)
    assert response.status_code == 403
    assert "anti-forgery token" in response.text
    assert site.get("/review/banks").status_code == 200  # the session still stands
    # Logging a person in from another site is refused as well.
    login = site.post("/login", data={"api_key": keys[Role.ADMIN]}, headers=evil)
    assert login.status_code == 403


def test_pages_are_never_cached(site: TestClient, keys: dict[Role, str], tmp_path: Path) -> None:
    seeded = seed_hit(tmp_path)
    log_in(site, keys[Role.REVIEWER])
    response = site.get(f"/review/uploads/{seeded.upload_id}")
    assert response.headers["cache-control"] == "private, no-store"
    assert "script-src 'self'" in response.headers["content-security-policy"]


def _jpeg(content: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(content))
    assert image.format == "JPEG"
    return image.convert("RGB")


def _detail(image: Image.Image) -> float:
    """Mean difference between neighbouring pixels: high for detail, low once blurred."""
    pixels = np.asarray(image, dtype=np.float32)
    return float(np.abs(np.diff(pixels, axis=1)).mean())


def test_kept_frames_are_blurred_until_revealed_and_every_read_is_audited(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = seed_hit(tmp_path)
    original_bytes = seeded.image.read_bytes()
    CAPTURE.run(TEST_RUNTIME, complete=True)  # a worker's sweeper keeps the hit's evidence
    # Kept: the URI may serve anything now, the page shows what was kept.
    seeded.image.write_bytes(b"not the screened bytes")
    log_in(site, keys[Role.REVIEWER])
    path = f"/review/uploads/{seeded.upload_id}/frames/0"
    blurred = site.get(path)
    revealed = site.get(path, params={"reveal": "1"})
    for response in (blurred, revealed):
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/jpeg"
        assert response.headers["cache-control"] == "private, no-store"
    clear, fuzzy = _jpeg(revealed.content), _jpeg(blurred.content)
    assert clear.size == fuzzy.size == (256, 192)
    # The clear frame is the upload, smaller; the blurred one has lost its detail.
    original = np.asarray(
        Image.open(io.BytesIO(original_bytes)).convert("RGB").resize((256, 192)),
        np.float32,
    )
    clear_error = np.abs(np.asarray(clear, np.float32) - original).mean()
    fuzzy_error = np.abs(np.asarray(fuzzy, np.float32) - original).mean()
    assert clear_error < 20
    assert fuzzy_error > 3 * clear_error
    assert _detail(fuzzy) < _detail(clear) / 10
    # The thumbnail route serves the same kept frame.
    assert site.get(f"/review/uploads/{seeded.upload_id}/thumbnail").status_code == 200
    # The page shows the blurred one, with its frame number, and links the clear one.
    page = site.get(f"/review/uploads/{seeded.upload_id}").text
    assert f'<img class="blurred" src="{path}"' in page
    assert f'href="{path}?reveal=1"' in page
    assert "frame 0 of 1" in page
    # Every read of the content is on record, blurred or not.
    with TEST_RUNTIME.session() as session:
        reads = [e for e in events_for(session, "upload", seeded.upload_id)]
    actor = f"key:{_key_id(keys[Role.REVIEWER])}:test reviewer"
    assert [(e.action, e.actor, (e.after or {})["purpose"]) for e in reads] == [
        ("evidence.read", actor, "blurred"),
        ("evidence.read", actor, "revealed"),
        ("evidence.read", actor, "blurred"),
    ]


def test_an_upload_with_hits_and_no_evidence_is_never_fetched_from_a_view(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = seed_hit(tmp_path)
    original_bytes = seeded.image.read_bytes()
    log_in(site, keys[Role.REVIEWER])
    response = site.get(f"/review/uploads/{seeded.upload_id}/thumbnail", params={"reveal": "1"})
    assert response.status_code == 404
    assert "Evidence not kept yet" in response.text
    # Its content changes; the sweeper finds the bytes are not the screened ones.
    seeded.image.write_bytes(original_bytes[:-200] + b"\xff\xd9")
    CAPTURE.run(TEST_RUNTIME, complete=True)
    page = site.get(f"/review/uploads/{seeded.upload_id}").text
    assert "Content changed since screening" in page
    assert f"/review/uploads/{seeded.upload_id}/frames/" not in page
    assert site.get(f"/review/uploads/{seeded.upload_id}/frames/0").status_code == 404


def _key_id(secret: str) -> int:
    with TEST_RUNTIME.session() as session:
        principal = auth.authenticate(session, secret)
    assert principal is not None
    return principal.key_id


def test_an_upload_without_hits_is_shown_only_while_its_uri_serves_the_screened_bytes(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    """An analyst's search result with no hit has no evidence: fetched again, its
    SHA-256 checked against the screened one."""
    seeded = seed_hit(tmp_path)
    original_bytes = seeded.image.read_bytes()
    with TEST_RUNTIME.session() as session:
        session.execute(delete(Hit).where(Hit.upload_id == seeded.upload_id))
    path = f"/review/uploads/{seeded.upload_id}/thumbnail"
    analyst = bearer(keys[Role.ANALYST])
    assert site.get(path, headers=analyst).headers["content-type"] == "image/jpeg"
    seeded.image.write_bytes(original_bytes + b"trailing")
    changed = site.get(path, headers=analyst)
    assert changed.status_code == 409
    assert changed.text.startswith("content changed since screening")


def test_a_thumbnail_follows_the_uri_policy(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = seed_hit(tmp_path)
    with TEST_RUNTIME.session() as session:
        session.execute(delete(Hit).where(Hit.upload_id == seeded.upload_id))
        upload = session.get(Upload, seeded.upload_id)
        assert upload is not None
        upload.uri = "file:///etc/passwd"
    response = site.get(
        f"/review/uploads/{seeded.upload_id}/thumbnail", headers=bearer(keys[Role.REVIEWER])
    )
    assert response.status_code == 422
    assert response.text.startswith("uri_refused:")
    assert "root:" not in response.text


def test_the_upload_page_shows_signals_and_evidence(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = seed_hit(tmp_path)
    page = site.get(f"/review/uploads/{seeded.upload_id}", headers=bearer(keys[Role.ANALYST]))
    assert page.status_code == 200
    text = page.text
    assert "7 bits ≤ 31" in text  # the PDQ distance against the threshold
    assert f'href="/review/banks/{seeded.bank_id}">known-bad</a>' in text
    assert f"#{seeded.entry_id}" in text
    assert bytes(range(1, 33)).hex() in text  # the PDQ signal
    assert "pending" in text
    assert site.get("/review/uploads/999999", headers=bearer(keys[Role.ANALYST])).status_code == (
        404
    )


def test_the_bank_page_shows_settings_counts_and_hashes_only(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = seed_hit(tmp_path)
    page = site.get(f"/review/banks/{seeded.bank_id}", headers=bearer(keys[Role.REVIEWER]))
    text = page.text
    assert "0.0500 cosine distance (the global setting)" in text
    assert bytes(range(32)).hex() in text
    assert "<dt>pending hits</dt><dd>1</dd>" in text
    assert seeded.source_ref not in text
    assert "restricted-source" not in text


def test_no_route_serves_bank_content(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    """Every GET route of the application, pages and API, called by an admin with every id
    and name the data has in every path parameter: neither a bank entry's source reference
    nor its source's bytes ever come back."""
    seeded = seed_hit(tmp_path)
    ids = {seeded.upload_id, seeded.hit_id, seeded.bank_id, seeded.entry_id}
    values: list[object] = [*sorted(ids), "known-bad"]
    admin = bearer(keys[Role.ADMIN])
    app = site.app
    assert isinstance(app, FastAPI)
    called = found = 0
    for template, route in app_routes(app):
        if "GET" not in (route.methods or ()):
            continue
        names = list(route.param_convertors)
        for combination in itertools.product(values, repeat=len(names)):
            path = template.format(**dict(zip(names, combination, strict=True)))
            for params in ({}, {"reveal": "1"}):
                response = site.get(path, params=params, headers=admin)
                # /readyz answers a documented 503 while no worker runs.
                server_error = response.status_code >= 500 and path != "/readyz"
                assert not server_error, (path, response.text)
                assert seeded.source_ref.encode() not in response.content, path
                assert b"restricted-source" not in response.content, path
                assert seeded.source_bytes not in response.content, path
                called += 1
                found += response.status_code == 200
    assert called >= 10
    assert found >= 8  # the ids and names reached real rows
