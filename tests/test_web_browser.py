"""The review page in a real browser: Debian's Chromium driven by Playwright, against the
application served by `moderation api` (uvicorn) over PostgreSQL, with hits found by a real
worker. A reviewer logs in, reveals a blurred thumbnail, confirms a hit with the keyboard
and sees it leave the queue; `moderation webhooks send` delivers the verdict to a receiver."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import func, select, update

from moderation.auth import service as auth
from moderation.auth.models import Role
from moderation.banks.models import Bank, BankEntry
from moderation.review.models import Hit, ReviewStatus
from moderation.screening.cli import submit_uris, wait_until_final
from moderation.screening.models import UploadStatus
from moderation.web.models import WebSession
from tests.conftest import TEST_ENV, TEST_RUNTIME
from tests.search_fixtures import search_environment
from tests.web_fixtures import detailed_image
from tests.webhook_receiver import Receiver, running_receiver

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as the system installs it: nothing downloaded, nothing phoned home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("clean_db", "worker"),
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason="no chromium: .ci/setup installs Debian's"
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


SECRET = "browser-test-secret"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """The upload service's webhook endpoint: a real HTTP server on 127.0.0.1."""
    with running_receiver(Receiver()) as running:
        yield running


@pytest.fixture
def webhook_env(receiver: Receiver, tmp_path: Path) -> dict[str, str]:
    """Settings for the API (whose decisions write events for this URL) and the sender:
    the tests' own, with these."""
    return {
        **os.environ,
        **TEST_ENV,
        **search_environment(tmp_path / "index"),
        "MODERATION_WEBHOOK_URL": receiver.url,
        "MODERATION_WEBHOOK_SECRET": SECRET,
        "MODERATION_WEBHOOK_POLL_S": "0.1",
        # Claimed batches of two cards, for the claims' test; undo lasts 30 s, long enough
        # for a loaded machine to press the key.
        "MODERATION_REVIEW_CLAIM_BATCH": "2",
        "MODERATION_REVIEW_UNDO_SECONDS": "30",
    }


@contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m moderation ARGS` in a process of its own, stopped (SIGTERM) at the end."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "moderation", *args], env=env, stdout=output, stderr=output
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def server(webhook_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`moderation api` on a free port of 127.0.0.1; its base URL."""
    port = _free_port()
    log = tmp_path / "api.log"
    args = ["api", "--host", "127.0.0.1", "--port", str(port)]
    with _process(args, webhook_env, log) as process:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moderation api did not start: {log.read_text()}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield base


@pytest.fixture
def sender(webhook_env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    """`moderation webhooks send`, delivering the outbox to the receiver; its log."""
    log = tmp_path / "sender.log"
    with _process(["webhooks", "send"], webhook_env, log):
        yield log


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


def _screened_hits(tmp_path: Path, count: int) -> list[int]:
    """Uploads of `count` images, each banked by its SHA-256, screened by the real worker;
    their ids, oldest first."""
    images = [detailed_image(tmp_path / f"upload-{i}.jpg", seed=i + 10) for i in range(count)]
    with TEST_RUNTIME.session() as session:
        bank = Bank(name="known-bad")
        session.add(bank)
        session.flush()
        for image in images:
            digest = hashlib.sha256(image.read_bytes()).digest()
            session.add(BankEntry(bank_id=bank.id, sha256=digest, added_by="test"))
    ids = submit_uris(TEST_RUNTIME, [image.as_uri() for image in images])
    uploads = wait_until_final(TEST_RUNTIME, ids, timeout_s=60)
    assert [upload.status for upload in uploads] == [UploadStatus.SCREENED] * count
    return ids


def _detail(png: bytes) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    return float(np.abs(np.diff(pixels, axis=1)).mean())


def _wait_decoded(page: Page, selector: str) -> None:
    """Until the image's current source is loaded and decoded (`decode()` fails if not)."""
    page.evaluate("s => document.querySelector(s).decode()", selector)


def _verify(body: bytes, timestamp: str, signature: str) -> bool:
    """The signature check of docs/api.md, as a receiver would write it."""
    mac = hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    fresh = abs(time.time() - int(timestamp)) <= 300
    return fresh and hmac.compare_digest("v1=" + mac.hexdigest(), signature)


def test_a_reviewer_reveals_and_confirms_with_the_keyboard(
    server: str, sender: Path, receiver: Receiver, browser: Browser, tmp_path: Path
) -> None:
    uploads = _screened_hits(tmp_path, 2)
    with TEST_RUNTIME.session() as session:
        key, secret = auth.create_key(session, role=Role.REVIEWER, name="ada", actor="test")
        actor = f"key:{key.id}:ada"

    context = browser.new_context()
    page = context.new_page()
    # Not logged in: the queue sends the browser to the login form, which comes back.
    page.goto(f"{server}/review")
    expect(page).to_have_url(re.compile(r"/login\?next=/review$"))
    page.fill("#api_key", secret)
    page.click("form[action='/login'] button[type=submit]")
    expect(page).to_have_url(f"{server}/review")
    (cookie,) = context.cookies()
    assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (True, True, "Strict")
    assert secret not in cookie["value"]

    expect(page.locator("#pending-count")).to_have_text("2")
    page.wait_for_selector("body[data-shortcuts=ready]")
    # The first card (the newest hit) is the one the keys act on.
    first = page.locator("article.hit").first
    expect(first).to_have_class(re.compile(r"\bselected\b"))
    chosen = int(first.get_attribute("data-upload") or 0)
    (other,) = set(uploads) - {chosen}
    thumb = f"#upload-{chosen} figure.thumb img"
    _wait_decoded(page, thumb)
    assert "reveal" not in (page.get_attribute(thumb, "src") or "")
    blurred = page.locator(thumb).screenshot()

    page.keyboard.press("r")
    expect(page.locator(thumb)).to_have_attribute("src", re.compile(r"reveal=1$"))
    _wait_decoded(page, thumb)
    revealed = page.locator(thumb).screenshot()
    assert _detail(revealed) > 5 * _detail(blurred)

    page.keyboard.press("c")
    expect(page.locator(f"#upload-{chosen}")).to_have_count(0)
    expect(page.locator("#pending-count")).to_have_text("1")
    expect(page.locator(f"#upload-{other}")).to_have_count(1)
    with TEST_RUNTIME.session() as session:
        statuses = {
            upload: status
            for upload, status in session.execute(select(Hit.upload_id, Hit.review_status))
        }
        reviewers = set(session.scalars(select(Hit.reviewed_by).where(Hit.upload_id == chosen)))
    assert statuses == {chosen: ReviewStatus.CONFIRMED, other: ReviewStatus.PENDING}
    assert reviewers == {actor}
    # The verdict reaches the upload service: one signed event, about this upload only.
    deadline = time.monotonic() + 30
    while not receiver.effects and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(receiver.effects) == 1, sender.read_text()
    (request,) = receiver.requests
    headers = request.headers
    assert _verify(
        request.body, headers["x-moderation-timestamp"], headers["x-moderation-signature"]
    )
    event = json.loads(request.body)
    assert event["type"] == "upload.confirmed"
    assert event["data"]["upload"]["id"] == chosen
    assert {hit["review_status"] for hit in event["data"]["hits"]} == {"confirmed"}
    context.close()


# The queue for a team (issue 24, item 4).


def _reviewer(name: str) -> tuple[str, str]:
    """A reviewer's key: its secret and the actor name decisions are recorded under."""
    with TEST_RUNTIME.session() as session:
        key, secret = auth.create_key(session, role=Role.REVIEWER, name=name, actor="test")
        return secret, f"key:{key.id}:{name}"


def _logged_in(browser: Browser, server: str, secret: str, path: str = "/review") -> Page:
    page = browser.new_context().new_page()
    page.goto(f"{server}{path}")
    page.fill("#api_key", secret)
    page.click("form[action='/login'] button[type=submit]")
    expect(page).to_have_url(f"{server}{path}")
    page.wait_for_selector("body[data-shortcuts=ready]")
    return page


def _card_ids(page: Page, selector: str) -> list[int]:
    return [
        int(found)
        for found in page.locator(selector).evaluate_all(
            "cards => cards.map(card => card.dataset.upload)"
        )
    ]


def _statuses(upload_id: int) -> set[tuple[ReviewStatus, str | None, str | None]]:
    with TEST_RUNTIME.session() as session:
        rows = session.execute(
            select(Hit.review_status, Hit.reviewed_by, Hit.review_note).where(
                Hit.upload_id == upload_id
            )
        )
        return {(status, by, note) for status, by, note in rows}


def test_two_reviewers_claim_disjoint_cards(server: str, browser: Browser, tmp_path: Path) -> None:
    uploads = _screened_hits(tmp_path, 5)
    (ada_key, _), (bob_key, _) = _reviewer("ada"), _reviewer("bob")
    ada = _logged_in(browser, server, ada_key)
    bob = _logged_in(browser, server, bob_key)
    for page in (ada, bob):
        page.click("#claim")
        expect(page.locator("section.mine article.hit")).to_have_count(2)
    ada_cards = _card_ids(ada, "section.mine article.hit")
    bob_cards = _card_ids(bob, "section.mine article.hit")
    assert not set(ada_cards) & set(bob_cards)
    # Neither is shown the other's; the one card left is unclaimed, on both pages.
    (left,) = set(uploads) - {*ada_cards, *bob_cards}
    ada.reload()
    assert _card_ids(ada, "section.unclaimed article.hit") == [left]
    assert _card_ids(bob, "section.unclaimed article.hit") == [left]
    # Each works their own batch from the keyboard: the first card is theirs.
    ada.wait_for_selector("body[data-shortcuts=ready]")
    expect(ada.locator("article.hit").first).to_have_attribute("data-upload", str(ada_cards[0]))
    ada.keyboard.press("d")
    expect(ada.locator(f"#upload-{ada_cards[0]}")).to_have_count(0)
    assert {status for status, _, _ in _statuses(ada_cards[0])} == {ReviewStatus.DISMISSED}
    ada.context.close()
    bob.context.close()


def test_a_stale_decision_shows_what_changed_and_the_reviewer_goes_on(
    server: str, browser: Browser, tmp_path: Path
) -> None:
    (upload,) = _screened_hits(tmp_path, 1)
    ada_key, ada = _reviewer("ada")
    carol_key, _ = _reviewer("carol")
    page = _logged_in(browser, server, ada_key)
    expect(page.locator("article.hit")).to_have_count(1)
    # Carol escalates it through the API while Ada's page is open.
    with TEST_RUNTIME.session() as session:
        hit_id = session.scalar(select(Hit.id).where(Hit.upload_id == upload))
    escalated = httpx.post(
        f"{server}/v1/hits/{hit_id}/decision",
        json={"outcome": "escalate", "note": "ask legal"},
        headers={"Authorization": f"Bearer {carol_key}"},
    )
    assert escalated.status_code == 200, escalated.text
    page.keyboard.press("m")
    page.keyboard.type("same file as last week")
    page.keyboard.press("Escape")
    page.keyboard.press("c")
    expect(page.locator("#stale h1")).to_contain_text("changed since you saw it")
    expect(page.locator("table.changes")).to_contain_text("ask legal")
    expect(page.locator("table.changes")).to_contain_text("carol")
    expect(page.locator("form.decision textarea")).to_have_value("same file as last week")
    assert {status for status, _, _ in _statuses(upload)} == {ReviewStatus.ESCALATED}
    page.click("form.decision button.confirm")
    expect(page).to_have_url(f"{server}/review")
    expect(page.locator("#pending-count")).to_have_text("0")
    assert _statuses(upload) == {(ReviewStatus.CONFIRMED, ada, "same file as last week")}
    page.context.close()


def test_undo_brings_the_card_back(server: str, browser: Browser, tmp_path: Path) -> None:
    uploads = _screened_hits(tmp_path, 2)
    secret, _ = _reviewer("ada")
    page = _logged_in(browser, server, secret)
    chosen = int(page.locator("article.hit").first.get_attribute("data-upload") or 0)
    page.keyboard.press("c")
    expect(page.locator(f"#upload-{chosen}")).to_have_count(0)
    expect(page.locator("#undo")).to_contain_text(f"confirm for upload {chosen}")
    assert {status for status, _, _ in _statuses(chosen)} == {ReviewStatus.CONFIRMED}
    page.wait_for_selector("body[data-shortcuts=ready]")
    page.keyboard.press("u")
    expect(page.locator(f"#upload-{chosen}")).to_have_count(1)
    expect(page.locator("#undo")).to_have_count(0)
    expect(page.locator("#pending-count")).to_have_text(str(len(uploads)))
    assert _statuses(chosen) == {(ReviewStatus.PENDING, None, None)}
    page.context.close()


def test_a_decision_and_its_note_survive_an_expired_session(
    server: str, browser: Browser, tmp_path: Path
) -> None:
    (upload,) = _screened_hits(tmp_path, 1)
    secret, actor = _reviewer("ada")
    page = _logged_in(browser, server, secret)
    page.keyboard.press("m")
    page.keyboard.type("escalating: see ticket 4411")
    page.keyboard.press("Escape")
    # The session ends while the note is written (it expired, or was ended elsewhere).
    with TEST_RUNTIME.session() as session:
        session.execute(update(WebSession).values(expires_at=func.now()))
    page.keyboard.press("e")
    expect(page).to_have_url(re.compile(r"/login\?next=/review/resume/[A-Za-z0-9_-]+$"))
    assert {status for status, _, _ in _statuses(upload)} == {ReviewStatus.PENDING}
    page.fill("#api_key", secret)
    page.click("form[action='/login'] button[type=submit]")
    expect(page).to_have_url(re.compile(r"/review/resume/[A-Za-z0-9_-]+$"))
    expect(page.locator("form.decision textarea")).to_have_value("escalating: see ticket 4411")
    expect(page.locator("form.decision button.escalate")).to_have_class(re.compile(r"\bchosen\b"))
    page.click("form.decision button.escalate")
    expect(page).to_have_url(f"{server}/review")
    assert _statuses(upload) == {(ReviewStatus.ESCALATED, actor, "escalating: see ticket 4411")}
    page.context.close()
