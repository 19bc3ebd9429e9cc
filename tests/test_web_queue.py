"""The review queue page and its decisions, through the application over real PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.service import events_for
from moderation.auth import service as auth
from moderation.auth.models import Role
from moderation.db import session_scope
from moderation.review.models import Hit, ReviewStatus
from moderation.review.tasks import CHORES as REVIEW_CHORES
from moderation.web import service as web
from moderation.web.service import COOKIE_NAME
from tests.api_fixtures import bearer, keys
from tests.web_fixtures import SAME_ORIGIN, Seeded, add_hit, log_in, seed_hit, site

__all__ = ["keys", "site"]
(CAPTURE,) = REVIEW_CHORES


def _seed(tmp_path: Path, count: int) -> list[Seeded]:
    return [seed_hit(tmp_path / str(i), bank_name=f"bank-{i}", seed=i + 1) for i in range(count)]


def _key_id(session: Session, role: Role) -> int:
    return next(key.id for key in auth.list_keys(session) if key.role is role)


def _cards(html: str) -> list[int]:
    return [int(found) for found in re.findall(r'<article class="hit" id="upload-(\d+)"', html)]


# The TestClient's response is httpx's or httpx2's, whichever Starlette found installed.
def _decide(client: TestClient, hit_id: int, outcome: str, **fields: str) -> Any:
    data = {"outcome": outcome, "csrf": web.csrf_token(client.cookies[COOKIE_NAME]), **fields}
    return client.post(f"/review/hits/{hit_id}/decision", data=data, headers=SAME_ORIGIN)


def test_the_queue_shows_the_pending_count_and_each_hits_evidence(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = _seed(tmp_path, 2)
    CAPTURE.run(complete=True)
    log_in(site, keys[Role.REVIEWER])
    page = site.get("/review")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "private, no-store"
    html = page.text
    assert '<strong id="pending-count">2</strong> pending' in html
    assert sorted(_cards(html)) == sorted(s.upload_id for s in seeded)
    assert "7 bits ≤ 31" in html
    for s in seeded:
        assert f'src="/review/uploads/{s.upload_id}/frames/0"' in html
        assert f'action="/review/hits/{s.hit_id}/decision"' in html
    # Every form carries the session's anti-forgery token; the keys are listed.
    assert html.count(f'value="{web.csrf_token(site.cookies[COOKIE_NAME])}"') == 3
    assert "<kbd>c</kbd> confirm" in html


def test_the_queue_pages_by_cursor_and_shows_each_hit_once(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = _seed(tmp_path, 5)
    reviewer = bearer(keys[Role.REVIEWER])
    seen: list[int] = []
    url = "/review?limit=2"
    while url:
        html = site.get(url, headers=reviewer).text
        assert "5 matching in all" in html
        seen += _cards(html)
        found = re.search(r'<a rel="next" href="([^"]+)"', html)
        url = found.group(1).replace("&amp;", "&") if found else ""
    assert sorted(seen) == sorted(s.upload_id for s in seeded)
    assert len(seen) == 5


def test_the_queue_filters(site: TestClient, keys: dict[Role, str], tmp_path: Path) -> None:
    seeded = _seed(tmp_path, 2)
    reviewer = bearer(keys[Role.REVIEWER])
    html = site.get("/review", params={"bank": "bank-1"}, headers=reviewer).text
    assert _cards(html) == [seeded[1].upload_id]
    assert "1 match these filters" in html
    assert _cards(site.get("/review?signal=clip", headers=reviewer).text) == []
    assert _cards(site.get("/review?found=retroactive", headers=reviewer).text) == []
    assert _cards(site.get("/review?since=2999-01-01T00:00", headers=reviewer).text) == []
    for bad in ("status=maybe", "since=yesterday", "cursor=nonsense"):
        response = site.get(f"/review?{bad}", headers=reviewer)
        assert response.status_code == 422, bad
        assert "text/html" in response.headers["content-type"]


def test_a_decision_leaves_the_queue_and_is_audited(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    first, second = _seed(tmp_path, 2)
    log_in(site, keys[Role.REVIEWER])
    response = _decide(site, first.hit_id, "confirm", note="matches", back="/review?limit=10")
    assert response.status_code == 303
    assert response.headers["location"] == "/review?limit=10"
    html = site.get("/review").text
    assert _cards(html) == [second.upload_id]
    assert '<strong id="pending-count">1</strong>' in html
    with session_scope() as session:
        hit = session.get(Hit, first.hit_id)
        assert hit is not None
        assert (hit.review_status, hit.review_note) == (ReviewStatus.CONFIRMED, "matches")
        assert hit.reviewed_by == f"key:{_key_id(session, Role.REVIEWER)}:test reviewer"
        (event,) = events_for(session, "upload", first.upload_id)
        assert event.action == "review.decide"
    # The decided hit shows under its status, without buttons.
    decided = site.get("/review?status=confirmed").text
    assert _cards(decided) == [first.upload_id]
    assert "/decision" not in decided
    # Contradicting a final decision is refused, with who made it.
    refused = _decide(site, first.hit_id, "dismiss")
    assert refused.status_code == 409
    assert "already confirmed" in refused.text
    # Off-site `back` targets are not followed.
    escalated = _decide(site, second.hit_id, "escalate", back="https://evil.example/")
    assert escalated.headers["location"] == "/review"


def test_decisions_need_a_reviewer_and_the_forms_token(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    (seeded,) = _seed(tmp_path, 1)
    analyst = bearer(keys[Role.ANALYST])
    assert site.get("/review", headers=analyst).status_code == 403
    refused = site.post(
        f"/review/hits/{seeded.hit_id}/decision", data={"outcome": "confirm"}, headers=analyst
    )
    assert refused.status_code == 403
    log_in(site, keys[Role.REVIEWER])
    forged = site.post(
        f"/review/hits/{seeded.hit_id}/decision",
        data={"outcome": "confirm", "csrf": "f" * 64},
        headers=SAME_ORIGIN,
    )
    assert forged.status_code == 403
    cross_site = site.post(
        f"/review/hits/{seeded.hit_id}/decision",
        data={"outcome": "confirm", "csrf": web.csrf_token(site.cookies[COOKIE_NAME])},
        headers={"Origin": "https://evil.example"},
    )
    assert cross_site.status_code == 403
    # The cookie, sent cross-site, opens the JSON API no more than the pages.
    api = site.post(
        f"/v1/hits/{seeded.hit_id}/decision",
        json={"outcome": "confirm"},
        headers={"Origin": "https://evil.example"},
    )
    assert api.status_code == 403
    with session_scope() as session:
        statuses = set(session.scalars(select(Hit.review_status)))
    assert statuses == {ReviewStatus.PENDING}


def _status(hit_id: int) -> ReviewStatus:
    with session_scope() as session:
        hit = session.get(Hit, hit_id)
        assert hit is not None
        return hit.review_status


def _seen_field(html: str, upload_id: int) -> str:
    card = html[html.index(f'id="upload-{upload_id}"') :]
    found = re.search(r'name="seen" value="([0-9,]*)"', card)
    assert found is not None
    return found.group(1)


def test_a_card_shows_every_open_hit_its_decision_covers(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    # The upload's older hit falls on the next page with one hit a page, and outside a
    # filter by the newer hit's bank: either way its card shows it, since one decision on
    # the card decides both.
    seeded = seed_hit(tmp_path, bank_name="older-bank")
    newer = add_hit(seeded.upload_id, bank_name="newer-bank")
    log_in(site, keys[Role.REVIEWER])
    for url in ("/review?limit=1", "/review?bank=newer-bank"):
        html = site.get(url).text
        assert _cards(html) == [seeded.upload_id]
        assert "older-bank" in html, url
        assert "newer-bank" in html, url
        assert _seen_field(html, seeded.upload_id) == f"{seeded.hit_id},{newer}"
    response = _decide(site, newer, "dismiss", seen=_seen_field(html, seeded.upload_id))
    assert response.status_code == 303
    assert _status(seeded.hit_id) is _status(newer) is ReviewStatus.DISMISSED


def test_a_hit_found_after_the_page_was_drawn_stays_open(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = seed_hit(tmp_path)
    log_in(site, keys[Role.REVIEWER])
    seen = _seen_field(site.get("/review").text, seeded.upload_id)
    # Found while the reviewer looked at the page (a retro-hunt on a new bank, say).
    unseen = add_hit(seeded.upload_id, bank_name="added-since")
    assert _decide(site, seeded.hit_id, "dismiss", seen=seen).status_code == 303
    assert _status(seeded.hit_id) is ReviewStatus.DISMISSED
    assert _status(unseen) is ReviewStatus.PENDING
    html = site.get("/review").text
    assert _cards(html) == [seeded.upload_id]
    assert "added-since" in html
