"""The review pages' flows in a real browser (Debian's Chromium through Playwright),
against `moderation api` served by uvicorn, as `test_web_browser` runs it."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Browser, Page, expect

from moderation.auth import service as auth
from moderation.auth.models import Role
from moderation.embedding.clip import ClipEmbedder
from moderation.embedding.service import embed_first_frame
from moderation.images.decode import DecodeLimits
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS
from tests.search_fixtures import add_upload, index_dir, tiny_model, unit
from tests.test_web_browser import CHROMIUM, browser, receiver, server, webhook_env

__all__ = ["browser", "index_dir", "receiver", "server", "webhook_env"]
PHOTO = Path(__file__).parent / "data" / "photos" / "coffee.jpg"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("clean_db"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium: .ci/setup installs it"),
]


def _key(role: Role, name: str) -> str:
    with TEST_RUNTIME.session() as session:
        _, secret = auth.create_key(session, role=role, name=name, actor="test")
    return secret


def test_fifty_logins_in_a_row_never_bounce(server: str, browser: Browser) -> None:
    """Each login lands on the page it was sent to, logged in: the session row is committed
    before the redirect is answered, not after the browser has asked for the next page."""
    secret = _key(Role.REVIEWER, "ada")
    analyst = _key(Role.ANALYST, "ann")
    for attempt in range(50):
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{server}/review")
        expect(page).to_have_url(re.compile(r"/login\?next=/review$"))
        # Every tenth login is an analyst's, from the same link: it lands on its own home,
        # not on a 403.
        is_analyst = attempt % 10 == 9
        page.fill("#api_key", analyst if is_analyst else secret)
        page.click("form[action='/login'] button[type=submit]")
        if is_analyst:
            expect(page).to_have_url(f"{server}/search")
            expect(page.locator("h1")).to_have_text("Search")
        else:
            expect(page).to_have_url(f"{server}/review")
            expect(page.locator("h1")).to_have_text("Review queue")
        expect(page.locator(".who")).to_contain_text("ann" if is_analyst else "ada")
        context.close()


def _log_in(browser: Browser, server: str, secret: str) -> Page:
    page = browser.new_context(accept_downloads=True).new_page()
    page.goto(f"{server}/login")
    page.fill("#api_key", secret)
    page.click("form[action='/login'] button[type=submit]")
    expect(page.locator(".who")).to_be_visible()
    return page


def _result_ids(page: Page) -> list[int]:
    return [
        int(x)
        for x in page.locator("figure.result").evaluate_all(
            "figures => figures.map(f => f.dataset.upload)"
        )
    ]


def test_an_analyst_searches_by_text_image_and_upload_pages_and_exports(
    index_dir: Path, server: str, browser: Browser
) -> None:
    settings = TEST_SETTINGS
    embedder = ClipEmbedder(settings.resolved_model(), "cpu")
    _, photo_vector = embed_first_frame(
        PHOTO.read_bytes(), embedder, DecodeLimits.from_settings(settings)
    )
    text_vector = embedder.embed_texts(["a cup of coffee"])[0]
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        corpus = [add_upload(session, model, [v]) for v in unit(np.random.default_rng(0), 30)]
        photo_upload = add_upload(session, model, [photo_vector])
        text_upload = add_upload(session, model, [text_vector])
    page = _log_in(browser, server, _key(Role.ANALYST, "ann"))
    expect(page).to_have_url(f"{server}/search")
    expect(page.locator("a[href='/search/map']").first).to_be_visible()

    page.fill("input[name=text]", "a cup of coffee")
    page.click("form.search button[type=submit]")
    expect(page.locator("figure.result").first).to_have_attribute("data-upload", str(text_upload))
    first_page = _result_ids(page)
    assert len(first_page) == 24
    # Blurred thumbnails, with the distance and the status of each.
    expect(page.locator("figure.result img.blurred")).to_have_count(24)
    expect(page.locator("figure.result .distance").first).to_have_text(re.compile(r"^0\.0000$"))
    expect(page.locator("figure.result .status").first).to_have_text("screened")

    # Past the first page: the rest of the corpus, none of the first page again.
    page.click("a[rel=next]")
    expect(page).to_have_url(re.compile(r"page=1"))
    second_page = _result_ids(page)
    assert len(second_page) == 8
    assert set(first_page) | set(second_page) == {*corpus, photo_upload, text_upload}
    expect(page.locator("a[rel=next]")).to_have_count(0)

    # Both exports hold the whole result set, best first.
    with page.expect_download() as csv_download:
        page.click("a.export:text('CSV')")
    rows = list(csv.DictReader(io.StringIO(Path(csv_download.value.path()).read_text())))
    assert [int(row["upload_id"]) for row in rows] == first_page + second_page
    assert float(rows[0]["distance"]) < 1e-4
    with page.expect_download() as json_download:
        page.click("a.export:text('JSON')")
    exported = json.loads(Path(json_download.value.path()).read_text())
    assert [r["upload_id"] for r in exported["results"]] == first_page + second_page
    assert exported["query"]["text"] == "a cup of coffee"

    # More like this, from any result.
    page.locator(f"figure.result[data-upload='{corpus[3]}'] a.more-like").click()
    expect(page).to_have_url(re.compile(rf"upload_id={corpus[3]}"))
    expect(page.locator("figure.result").first).to_have_attribute("data-upload", str(corpus[3]))

    # By example image: the image is embedded once, paging repeats the query without it.
    page.goto(f"{server}/search")
    page.set_input_files("form.image-search input[name=image]", str(PHOTO))
    page.click("form.image-search button[type=submit]")
    expect(page).to_have_url(re.compile(r"/search\?vector="))
    expect(page.locator("figure.result").first).to_have_attribute("data-upload", str(photo_upload))
    page.click("a[rel=next]")
    assert len(_result_ids(page)) == 8

    # A bad value in the page's address is a page that says which, not JSON.
    response = page.goto(f"{server}/search?text=x&size=7")
    assert response is not None
    assert response.status == 422
    expect(page.locator("p.error")).to_contain_text("size must be one of")
    response = page.goto(f"{server}/search?text=x&bank=no-such-bank")
    assert response is not None
    assert response.status == 422
    expect(page.locator("p.error")).to_contain_text("no bank named 'no-such-bank'")
    response = page.goto(f"{server}/review/uploads/not-a-number")
    assert response is not None
    assert response.status == 422
    expect(page.locator("h1")).to_have_text("422")
    page.context.close()


def test_the_api_docs_render_offline_from_local_assets(server: str, browser: Browser) -> None:
    """Swagger UI and ReDoc from the package's own files: the browser asks this server for
    everything, and the spec declares the bearer scheme on every operation with a key."""
    page = browser.new_context().new_page()
    elsewhere: list[str] = []
    # What was loaded from elsewhere: ReDoc's bundle asks for a logo on its CDN, which the
    # page's Content-Security-Policy stops before it is sent.
    page.on(
        "requestfinished",
        lambda request: None if request.url.startswith(server) else elsewhere.append(request.url),
    )
    page.goto(f"{server}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("moderation")
    expect(page.locator(".swagger-ui .btn.authorize")).to_be_visible()
    answer = page.goto(f"{server}/redoc")
    assert answer is not None
    assert "img-src 'self' data: blob:" in answer.headers["content-security-policy"]
    expect(page.locator("h1").first).to_contain_text("moderation")
    assert [url for url in elsewhere if not url.startswith(("data:", "blob:"))] == []
    spec = page.request.get(f"{server}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearer"]["description"],
    }
    submit = spec["paths"]["/v1/uploads"]["post"]
    assert submit["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    page.context.close()
