"""The review queue page and its decisions, through the application over real PostgreSQL."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from moderation.audit.service import events_for
from moderation.auth import service as auth
from moderation.auth.models import Role
from moderation.images.signals import SignalType
from moderation.review import claims
from moderation.review.cards import Order
from moderation.review.models import Hit, ReviewStatus
from moderation.review.tasks import CHORES as REVIEW_CHORES
from moderation.runtime import Runtime
from moderation.screening.models import Upload
from moderation.web import service as web
from moderation.web.models import PendingForm, WebSession
from moderation.web.service import COOKIE_NAME
from moderation.webhooks import service as webhooks
from moderation.webhooks.models import WebhookEvent
from tests.api_fixtures import bearer, keys
from tests.conftest import TEST_RUNTIME
from tests.web_fixtures import SAME_ORIGIN, Seeded, add_hit, browser, log_in, seed_hit, site

__all__ = ["keys", "site"]
(CAPTURE,) = REVIEW_CHORES


def _seed(tmp_path: Path, count: int) -> list[Seeded]:
    return [seed_hit(tmp_path / str(i), bank_name=f"bank-{i}", seed=i + 1) for i in range(count)]


def _key_id(session: Session, role: Role) -> int:
    return next(key.id for key in auth.list_keys(session) if key.role is role)


def _cards(html: str) -> list[int]:
    return [
        int(found) for found in re.findall(r'<article class="hit[^"]*" id="upload-(\d+)"', html)
    ]


# The TestClient's response is httpx's or httpx2's, whichever Starlette found installed.
def _decide(client: TestClient, hit_id: int, outcome: str, **fields: str) -> Any:
    data = {"outcome": outcome, "csrf": web.csrf_token(client.cookies[COOKIE_NAME]), **fields}
    return client.post(f"/review/hits/{hit_id}/decision", data=data, headers=SAME_ORIGIN)


def test_the_queue_shows_the_pending_count_and_each_hits_evidence(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = _seed(tmp_path, 2)
    CAPTURE.run(TEST_RUNTIME, complete=True)
    log_in(site, keys[Role.REVIEWER])
    page = site.get("/review")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "private, no-store"
    html = page.text
    assert '<strong id="pending-count">2</strong> uploads pending' in html
    assert sorted(_cards(html)) == sorted(s.upload_id for s in seeded)
    assert "7 bits ≤ 31" in html
    for s in seeded:
        assert f'src="/review/uploads/{s.upload_id}/frames/0"' in html
        assert f'action="/review/hits/{s.hit_id}/decision"' in html
    # Every form carries the session's anti-forgery token (log out, claim, two decisions).
    assert html.count(f'value="{web.csrf_token(site.cookies[COOKIE_NAME])}"') == 4
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
    assert '<span id="matching-count">1</span> match these filters' in html
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
    assert '<strong id="pending-count">1</strong> upload pending' in html
    with TEST_RUNTIME.session() as session:
        hit = session.get(Hit, first.hit_id)
        assert hit is not None
        assert (hit.review_status, hit.review_note) == (ReviewStatus.CONFIRMED, "matches")
        assert hit.reviewed_by == f"key:{_key_id(session, Role.REVIEWER)}:test reviewer"
        (event,) = events_for(session, "upload", first.upload_id)
        assert event.action == "review.decide"
    # The decided hit shows under its status, without buttons.
    decided = site.get("/review?status=confirmed").text
    assert _cards(decided) == [first.upload_id]
    assert 'class="decision"' not in decided
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
    with TEST_RUNTIME.session() as session:
        statuses = set(session.scalars(select(Hit.review_status)))
    assert statuses == {ReviewStatus.PENDING}


def _status(hit_id: int) -> ReviewStatus:
    with TEST_RUNTIME.session() as session:
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


# The queue for a team (issue 24, item 4): cards by upload, order, age, claims, stale
# decisions, undo, and decisions that outlive their session.


# Batches of two cards; an age target of one hour.
QUEUE_SETTINGS: dict[str, Any] = {"review_claim_batch": 2, "review_age_target_hours": 1}


@pytest.fixture
def queue_runtime(make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime(**QUEUE_SETTINGS)


@pytest.fixture
def queue_site(clean_db: None, queue_runtime: Runtime) -> Iterator[TestClient]:
    """`site` on `queue_runtime`."""
    with browser(queue_runtime) as client:
        yield client


def _age(hit_id: int, hours: float) -> None:
    """Make a hit as old as `hours` (found then)."""
    with TEST_RUNTIME.session() as session:
        session.execute(
            update(Hit)
            .where(Hit.id == hit_id)
            .values(created_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 0, hours * 3600))
        )


def _client(runtime: Runtime, keys: dict[Role, str], name: str) -> TestClient:
    """Another reviewer's browser, on `runtime`: their own key and session."""
    with TEST_RUNTIME.session() as session:
        _, secret = auth.create_key(session, role=Role.REVIEWER, name=name, actor="test")
    client = browser(runtime)
    log_in(client, secret)
    return client


def _same_browser(site: TestClient, runtime: Runtime) -> TestClient:
    """The reviewer's browser of `site`, logged in as they are, on the service run on
    `runtime` (other settings)."""
    client = browser(runtime)
    client.cookies = site.cookies
    return client


def test_cards_count_uploads_and_show_age_and_submitter(
    queue_site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    first, second = _seed(tmp_path, 2)
    add_hit(first.upload_id, bank_name="second-bank")
    _age(first.hit_id, 3)
    with TEST_RUNTIME.session() as session:
        upload = session.get(Upload, second.upload_id)
        assert upload is not None
        upload.event_metadata = {"user": "u-1729", "surface": "<b>profile</b>"}
    log_in(queue_site, keys[Role.REVIEWER])
    html = queue_site.get("/review").text
    # Three hits, two uploads: the queue counts uploads.
    assert '<strong id="pending-count">2</strong> uploads pending' in html
    assert "2 cards on this page" in html
    assert sorted(_cards(html)) == sorted([first.upload_id, second.upload_id])
    assert re.search(r'class="age over"[^>]*>waiting 3 h 0\d min · over target', html)
    assert "1 over the 1 h target" in html
    # The submitter's metadata, as text.
    assert "<dt>user</dt><dd>u-1729</dd>" in html
    assert "&lt;b&gt;profile&lt;/b&gt;" in html
    upload_page = queue_site.get(f"/review/uploads/{second.upload_id}").text
    assert "<dt>user</dt><dd>u-1729</dd>" in upload_page


def test_priority_puts_exact_hashes_then_strength_first_and_oldest_orders_by_age(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    weak, strong, exact = _seed(tmp_path, 3)
    with TEST_RUNTIME.session() as session:
        for seeded, distance in ((weak, 30), (strong, 2)):
            session.execute(
                update(Hit).where(Hit.id == seeded.hit_id).values(distance=distance, threshold=31)
            )
        session.execute(
            update(Hit)
            .where(Hit.id == exact.hit_id)
            .values(signal=SignalType.SHA256, distance=0, threshold=0)
        )
    _age(weak.hit_id, 5)
    _age(strong.hit_id, 3)
    _age(exact.hit_id, 1)
    reviewer = bearer(keys[Role.REVIEWER])
    by_priority = _cards(site.get("/review", headers=reviewer).text)
    assert by_priority == [exact.upload_id, strong.upload_id, weak.upload_id]
    oldest = _cards(site.get("/review?order=oldest", headers=reviewer).text)
    assert oldest == [weak.upload_id, strong.upload_id, exact.upload_id]
    # Paging by upload follows the order: one card a page, each once.
    for order, expected in (("priority", by_priority), ("oldest", oldest)):
        seen: list[int] = []
        url = f"/review?order={order}&limit=1"
        while url:
            html = site.get(url, headers=reviewer).text
            seen += _cards(html)
            found = re.search(r'<a rel="next" href="([^"]+)"', html)
            url = found.group(1).replace("&amp;", "&") if found else ""
        assert seen == expected, order
    # A cursor of one order is refused by the other.
    html = site.get("/review?order=oldest&limit=1", headers=reviewer).text
    found = re.search(r'<a rel="next" href="([^"]+)"', html)
    assert found is not None
    cursor = found.group(1).split("cursor=")[1]
    assert site.get(f"/review?cursor={cursor}", headers=reviewer).status_code == 422


def _claim(client: TestClient) -> list[int]:
    response = client.post(
        "/review/claim",
        data={"csrf": web.csrf_token(client.cookies[COOKIE_NAME])},
        headers=SAME_ORIGIN,
    )
    assert response.status_code == 303, response.text
    html = client.get("/review").text
    mine = html[html.index('<section class="mine">') :] if 'section class="mine"' in html else ""
    return _cards(mine.split('<section class="unclaimed">')[0]) if mine else []


def test_two_reviewers_claim_disjoint_batches(
    keys: dict[Role, str], tmp_path: Path, queue_runtime: Runtime, clean_db: None
) -> None:
    seeded = _seed(tmp_path, 5)
    ada, bob = _client(queue_runtime, keys, "ada"), _client(queue_runtime, keys, "bob")
    with ada, bob:
        ada_cards = _claim(ada)
        bob_cards = _claim(bob)
        assert len(ada_cards) == len(bob_cards) == 2
        assert not set(ada_cards) & set(bob_cards)
        # Neither is shown the other's cards; each sees their own first, as theirs.
        ada_page = ada.get("/review").text
        assert not set(_cards(ada_page)) & set(bob_cards)
        assert "2 claimed by colleagues" in ada_page
        assert "yours until" in ada_page
        # A card Bob holds cannot be decided by Ada: a page says whose it is.
        taken = next(s for s in seeded if s.upload_id == bob_cards[0])
        refused = _decide(ada, taken.hit_id, "confirm", note="mine now")
        assert refused.status_code == 409
        assert "claimed by key:" in refused.text
        assert ":bob until" in refused.text
        assert "mine now" in refused.text
        assert _status(taken.hit_id) is ReviewStatus.PENDING
        # Bob decides his; the one card nobody holds goes to whoever claims next.
        assert _decide(bob, taken.hit_id, "dismiss").status_code == 303
        (last,) = {s.upload_id for s in seeded} - {*ada_cards, *bob_cards}
        assert sorted(_claim(ada)) == sorted([*ada_cards, last])
        assert _claim(bob) == [bob_cards[1]]


def test_a_stale_decision_shows_what_changed_and_lets_the_reviewer_go_on(
    site: TestClient, runtime: Runtime, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = seed_hit(tmp_path)
    log_in(site, keys[Role.REVIEWER])
    html = site.get("/review").text
    drawn = _field(html, seeded.upload_id, "state")
    assert drawn == f"{seeded.hit_id}:pending"
    # A colleague escalates it with a note while the page is open.
    with _client(runtime, keys, "carol") as carol:
        assert _decide(carol, seeded.hit_id, "escalate", note="needs a senior").status_code == 303
    stale = _decide(site, seeded.hit_id, "confirm", note="clear match", state=drawn)
    assert stale.status_code == 409
    page = stale.text
    assert "changed since you saw it" in page
    assert "needs a senior" in page
    assert ":carol" in page
    assert '<span class="status pending">pending</span>' in page  # when you looked
    assert '<span class="status escalated">escalated</span>' in page  # now
    assert ">clear match</textarea>" in page
    assert _status(seeded.hit_id) is ReviewStatus.ESCALATED
    # Going on from that page (the card as it is now) confirms it.
    state = re.search(r'name="state" value="([^"]*)"', page)
    assert state is not None
    assert state.group(1) == f"{seeded.hit_id}:escalated"
    went_on = _decide(site, seeded.hit_id, "confirm", note="clear match", state=state.group(1))
    assert went_on.status_code == 303
    assert _status(seeded.hit_id) is ReviewStatus.CONFIRMED
    # A card decided for good by a colleague: the page says so and offers nothing to send.
    other = seed_hit(tmp_path / "other", bank_name="other-bank", seed=9)
    drawn = _field(site.get("/review").text, other.upload_id, "state")
    with _client(runtime, keys, "dan") as dan:
        assert _decide(dan, other.hit_id, "dismiss").status_code == 303
    stale = _decide(site, other.hit_id, "confirm", state=drawn)
    assert stale.status_code == 409
    assert "Nothing is left to decide" in stale.text
    assert _status(other.hit_id) is ReviewStatus.DISMISSED


def _field(html: str, upload_id: int, name: str) -> str:
    card = html[html.index(f'id="upload-{upload_id}"') :]
    found = re.search(rf'name="{name}" value="([^"]*)"', card)
    assert found is not None
    return found.group(1)


def test_undo_restores_the_card_within_the_window_only(
    queue_site: TestClient,
    keys: dict[Role, str],
    tmp_path: Path,
    make_runtime: Callable[..., Runtime],
) -> None:
    site = queue_site
    first, second, third = _seed(tmp_path, 3)
    log_in(site, keys[Role.REVIEWER])
    assert _decide(site, first.hit_id, "confirm", note="oops").status_code == 303
    html = site.get("/review").text
    assert sorted(_cards(html)) == sorted([second.upload_id, third.upload_id])
    found = re.search(r'action="/review/decisions/(\d+)/undo"', html)
    assert found is not None
    event_id = int(found.group(1))
    csrf = web.csrf_token(site.cookies[COOKIE_NAME])
    undone = site.post(
        f"/review/decisions/{event_id}/undo", data={"csrf": csrf}, headers=SAME_ORIGIN
    )
    assert undone.status_code == 303
    assert _status(first.hit_id) is ReviewStatus.PENDING
    with TEST_RUNTIME.session() as session:
        hit = session.get(Hit, first.hit_id)
        assert hit is not None
        assert (hit.reviewed_by, hit.review_note) == (None, None)
        actions = [event.action for event in events_for(session, "upload", first.upload_id)]
        assert actions == ["review.decide", "review.undo"]
    html = site.get("/review").text
    assert sorted(_cards(html)) == sorted(s.upload_id for s in (first, second, third))
    # The card is back, and the undoer's own (claimed), so nobody took it meanwhile.
    assert _cards(html.split('<section class="unclaimed">')[0]) == [first.upload_id]
    assert "/undo" not in html
    # Twice is refused; so is an undo after the window.
    again = site.post(
        f"/review/decisions/{event_id}/undo", data={"csrf": csrf}, headers=SAME_ORIGIN
    )
    assert again.status_code == 409
    # The same reviewer on a service that offers no undo.
    with _same_browser(site, make_runtime(**QUEUE_SETTINGS, review_undo_seconds=0)) as no_undo:
        assert _decide(no_undo, second.hit_id, "dismiss").status_code == 303
        with TEST_RUNTIME.session() as session:
            late_id = max(e.id for e in events_for(session, "upload", second.upload_id))
        late = no_undo.post(
            f"/review/decisions/{late_id}/undo", data={"csrf": csrf}, headers=SAME_ORIGIN
        )
    assert late.status_code == 409
    assert "can no longer be undone" in late.text
    assert _status(second.hit_id) is ReviewStatus.DISMISSED
    # Nobody undoes a colleague's decision.
    long_undo = make_runtime(**QUEUE_SETTINGS, review_undo_seconds=60)
    with _client(long_undo, keys, "eve") as eve:
        assert _decide(eve, third.hit_id, "escalate").status_code == 303
    with TEST_RUNTIME.session() as session:
        eves = max(e.id for e in events_for(session, "upload", third.upload_id))
    with _same_browser(site, long_undo) as mine:
        theirs = mine.post(
            f"/review/decisions/{eves}/undo", data={"csrf": csrf}, headers=SAME_ORIGIN
        )
    assert theirs.status_code == 409
    assert _status(third.hit_id) is ReviewStatus.ESCALATED


def test_a_decision_and_its_note_survive_an_expired_session(
    site: TestClient, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = seed_hit(tmp_path)
    token = log_in(site, keys[Role.REVIEWER])
    html = site.get("/review").text
    state = _field(html, seeded.upload_id, "state")
    csrf = web.csrf_token(token)
    with TEST_RUNTIME.session() as session:  # the session runs out while the note is written
        session.execute(update(WebSession).values(expires_at=func.now()))
    sent = site.post(
        f"/review/hits/{seeded.hit_id}/decision",
        data={"outcome": "escalate", "note": "ask legal <first>", "state": state, "csrf": csrf},
        headers=SAME_ORIGIN,
    )
    assert sent.status_code == 303
    found = re.fullmatch(r"/login\?next=(/review/resume/[A-Za-z0-9_-]+)", sent.headers["location"])
    assert found is not None, sent.headers["location"]
    resume = found.group(1)
    assert _status(seeded.hit_id) is ReviewStatus.PENDING
    back = site.post(
        "/login", data={"api_key": keys[Role.REVIEWER], "next": resume}, headers=SAME_ORIGIN
    )
    assert back.headers["location"] == resume
    # Shown again (a reload, a browser's prefetch) it is still there.
    assert site.get(resume).status_code == 200
    page = site.get(resume)
    assert page.status_code == 200
    assert ">ask legal &lt;first&gt;</textarea>" in page.text
    assert 'class="escalate chosen"' in page.text
    assert f'name="state" value="{state}"' in page.text
    # Sent from the new session, it decides.
    new_csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert new_csrf is not None
    resumed = re.search(r'name="resumed" value="([A-Za-z0-9_-]+)"', page.text)
    assert resumed is not None
    sent = site.post(
        f"/review/hits/{seeded.hit_id}/decision",
        data={
            "outcome": "escalate",
            "note": "ask legal <first>",
            "state": state,
            "csrf": new_csrf.group(1),
            "resumed": resumed.group(1),
        },
        headers=SAME_ORIGIN,
    )
    assert sent.status_code == 303
    assert _status(seeded.hit_id) is ReviewStatus.ESCALATED
    # Once its decision is sent, the kept form is gone.
    assert site.get(resume).status_code == 404
    # A post from another site is refused, and nothing of it kept.
    with TEST_RUNTIME.session() as session:
        session.execute(update(WebSession).values(expires_at=func.now()))
    forged = site.post(
        f"/review/hits/{seeded.hit_id}/decision",
        data={"outcome": "dismiss", "note": "forged"},
        headers={"Origin": "https://evil.example"},
    )
    assert forged.status_code == 403
    with TEST_RUNTIME.session() as session:
        assert session.scalar(select(func.count()).select_from(PendingForm)) == 0


def test_an_undone_decision_is_never_announced(
    clean_db: None, keys: dict[Role, str], tmp_path: Path, make_runtime: Callable[..., Runtime]
) -> None:
    runtime = make_runtime(webhook_url="https://receiver.example/hooks", review_undo_seconds=30)
    with browser(runtime) as site:
        kept, undone = _seed(tmp_path, 2)
        log_in(site, keys[Role.REVIEWER])
        assert _decide(site, kept.hit_id, "confirm").status_code == 303
        assert _decide(site, undone.hit_id, "confirm").status_code == 303
        with TEST_RUNTIME.session() as session:
            # Both events wait out the undo window: no sender may take them yet.
            assert webhooks.claim_due(session, lease_s=60, give_up_after_s=3600, limit=10) == []
            waits = {
                upload: (due - now).total_seconds()
                for upload, due, now in session.execute(
                    select(WebhookEvent.upload_id, WebhookEvent.next_attempt_at, func.now())
                )
            }
            assert waits.keys() == {kept.upload_id, undone.upload_id}
            assert all(25 < wait <= 30 for wait in waits.values())
            event_id = max(e.id for e in events_for(session, "upload", undone.upload_id))
        csrf = web.csrf_token(site.cookies[COOKIE_NAME])
        response = site.post(
            f"/review/decisions/{event_id}/undo", data={"csrf": csrf}, headers=SAME_ORIGIN
        )
        assert response.status_code == 303
        with TEST_RUNTIME.session() as session:
            assert set(session.scalars(select(WebhookEvent.upload_id))) == {kept.upload_id}


def test_the_api_respects_a_colleagues_claim(
    queue_site: TestClient, queue_runtime: Runtime, keys: dict[Role, str], tmp_path: Path
) -> None:
    seeded = _seed(tmp_path, 1)
    with _client(queue_runtime, keys, "ada") as ada:
        assert _claim(ada) == [seeded[0].upload_id]
    refused = queue_site.post(
        f"/v1/hits/{seeded[0].hit_id}/decision",
        json={"outcome": "dismiss"},
        headers=bearer(keys[Role.REVIEWER]),
    )
    assert refused.status_code == 409
    assert refused.json()["code"] == "claimed_by_colleague"
    assert _status(seeded[0].hit_id) is ReviewStatus.PENDING


def test_reviewers_claiming_at_the_same_moment_get_disjoint_batches(
    clean_db: None, runtime: Runtime, tmp_path: Path
) -> None:
    """Claims taken in concurrent transactions, started together: each card goes to one."""
    seeded = _seed(tmp_path, 8)
    start = threading.Barrier(4)
    taken: dict[str, list[int]] = {}

    def claim_for(actor: str) -> None:
        with TEST_RUNTIME.session() as session:
            start.wait(timeout=30)
            taken[actor] = claims.claim_batch(
                session,
                runtime.settings,
                actor,
                size=2,
                lease=timedelta(minutes=5),
                order=Order.PRIORITY,
            )

    threads = [threading.Thread(target=claim_for, args=(f"r{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(len(batch) for batch in taken.values()) == [2, 2, 2, 2]
    everything = [upload for batch in taken.values() for upload in batch]
    assert sorted(everything) == sorted(s.upload_id for s in seeded)
