"""The embedding map in a real browser (Debian's Chromium through Playwright) against
`moderation api`: hovering a point shows its upload, clicking opens it, and a region
dragged across the map is selected and exported."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import select

from moderation.auth import service as auth
from moderation.auth.models import Role
from moderation.embedding.models import Embedding, EmbeddingModel
from moderation.review.models import Hit
from tests.conftest import TEST_RUNTIME
from tests.test_index_map import bank_entry, serving, store, two_clusters
from tests.test_web_browser import CHROMIUM, browser, receiver, server, webhook_env

__all__ = ["browser", "receiver", "server", "webhook_env"]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("clean_db"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium: .ci/setup installs it"),
]

MODEL = "map-browser-test-model"


def _analyst_page(browser: Browser, server: str) -> Page:
    with TEST_RUNTIME.session() as session:
        _, secret = auth.create_key(session, role=Role.ANALYST, name="ann", actor="test")
    # Tall enough for the whole map: the mouse reaches only what is on the screen.
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1200})
    page = context.new_page()
    page.goto(f"{server}/login?next=/search/map")
    page.fill("#api_key", secret)
    page.click("form[action='/login'] button[type=submit]")
    expect(page).to_have_url(f"{server}/search/map")
    return page


def _centres(page: Page, selector: str) -> dict[int, tuple[float, float]]:
    """Upload id -> the centre of its point on the screen."""
    found: dict[int, tuple[float, float]] = {}
    for point in page.locator(selector).all():
        box = point.locator("circle").bounding_box()
        assert box is not None
        upload = point.get_attribute("data-upload")
        assert upload is not None
        found[int(upload)] = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    return found


def test_an_analyst_hovers_clicks_and_exports_a_region_of_the_map(
    server: str, browser: Browser, tmp_path: Path
) -> None:
    bad, ordinary = two_clusters(12, seed=3)
    with TEST_RUNTIME.session() as session:
        store(session, bad, bank_entry(session, "map-bank"), MODEL)
        store(session, ordinary, None, MODEL)
        banked = set(
            session.scalars(
                select(Hit.upload_id)
                .join(Embedding, Embedding.upload_id == Hit.upload_id)
                .join(EmbeddingModel, EmbeddingModel.id == Embedding.model_id)
                .where(EmbeddingModel.name == MODEL)
            )
        )
    assert len(banked) == 12
    with serving(MODEL):
        page = _analyst_page(browser, server)
        hits = _centres(page, "a.point[data-label='map-bank']")
        others = _centres(page, "a.point[data-label='no hit']")
        assert set(hits) == banked
        assert len(others) == 12

        # Hover: the upload's id and its (server-blurred) thumbnail.
        first = min(hits)
        page.hover(f"a.point[data-upload='{first}']")
        expect(page.locator("#map-hover")).to_be_visible()
        expect(page.locator("#map-hover-text")).to_have_text(f"upload {first}: map-bank, pending")
        expect(page.locator("#map-hover-image")).to_have_attribute(
            "src", f"/review/uploads/{first}/thumbnail"
        )

        # A region around the bank's cluster: from a corner clear of every point.
        xs = [x for x, _ in hits.values()]
        ys = [y for _, y in hits.values()]
        left, right, top, bottom = min(xs) - 8, max(xs) + 8, min(ys) - 8, max(ys) + 8
        inside = [u for u, (x, y) in others.items() if left <= x <= right and top <= y <= bottom]
        assert inside == [], "the clusters overlap on the map"
        every = [*hits.values(), *others.values()]
        start = next(
            corner
            for corner in ((left, top), (right, bottom), (left, bottom), (right, top))
            if all(abs(corner[0] - x) > 7 or abs(corner[1] - y) > 7 for x, y in every)
        )
        end = (right + left - start[0], bottom + top - start[1])
        page.mouse.move(*start)
        page.mouse.down()
        page.mouse.move(*end, steps=8)
        page.mouse.up()
        expect(page.locator("#map-picked-count")).to_have_text("12")
        expect(page.locator("#map-picked-list li")).to_have_count(12)

        with page.expect_download() as waiting:
            page.click("#map-export-csv")
        exported = waiting.value.path().read_text()
        rows = list(csv.DictReader(io.StringIO(exported)))
        assert {int(row["upload_id"]) for row in rows} == banked
        assert {(row["banks"], row["review"]) for row in rows} == {("map-bank", "pending")}

        # Click: the upload's own page.
        page.click(f"a.point[data-upload='{first}']")
        expect(page).to_have_url(f"{server}/review/uploads/{first}")
