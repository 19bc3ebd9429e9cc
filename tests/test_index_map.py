"""`moderation index map`: a sample of the stored embeddings in two dimensions, coloured
by bank hit, read from the real PostgreSQL."""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from moderation.auth.models import Role
from moderation.banks import service as banks
from moderation.banks.models import BankEntry
from moderation.embedding.models import Embedding, EmbeddingModel, ModelState
from moderation.embedding.service import get_or_create_model, vector_to_bytes
from moderation.images.signals import SignalType
from moderation.main.cli import main
from moderation.review.models import Hit, ReviewStatus
from moderation.screening.models import Upload, UploadStatus
from moderation.search.map_cli import index_map
from moderation.search.projection import (
    HEIGHT_PX,
    NO_HIT,
    WIDTH_PX,
    NothingToMap,
    project,
    render_map,
    sample_corpus,
)
from tests.api_fixtures import bearer, keys
from tests.conftest import TEST_RUNTIME
from tests.web_fixtures import log_in, site

__all__ = ["keys", "site"]

MODEL = "map-test-model"
DIM = 64


def two_clusters(per_cluster: int, seed: int = 0) -> tuple[npt.NDArray[np.float32], ...]:
    """Unit vectors around two orthogonal directions (cosine 0 between the centres), each
    point at cosine about 0.9 from its own centre: far apart, as a cluster of known-bad
    content and ordinary uploads are."""
    rng = np.random.default_rng(seed)
    clusters = []
    for axis in (0, 1):
        centre = np.zeros(DIM, np.float32)
        centre[axis] = 1.0
        points = centre + 0.5 * rng.standard_normal((per_cluster, DIM)).astype(np.float32) / 8
        clusters.append(points / np.linalg.norm(points, axis=1, keepdims=True))
    return tuple(clusters)


def store(
    session: Session,
    vectors: npt.NDArray[np.float32],
    bank_entry: BankEntry | None,
    model_name: str = MODEL,
) -> None:
    """Screened uploads with their embeddings, each with a CLIP hit on `bank_entry` if given."""
    model = get_or_create_model(session, model_name, DIM)
    for vector in vectors:
        upload = Upload(uri="file:///tmp/map-test.jpg", status=UploadStatus.SCREENED)
        session.add(upload)
        session.flush()
        session.add(
            Embedding(upload_id=upload.id, model_id=model.id, vector=vector_to_bytes(vector))
        )
        if bank_entry is not None:
            session.add(
                Hit(
                    upload_id=upload.id,
                    bank_entry_id=bank_entry.id,
                    signal=SignalType.CLIP,
                    distance=0.01,
                    model_id=model.id,
                )
            )
    session.flush()


def bank_entry(session: Session, bank_name: str) -> BankEntry:
    bank = banks.create_bank(session, bank_name)
    entry = BankEntry(bank_id=bank.id, added_by="test")
    session.add(entry)
    session.flush()
    return entry


def separated_along_first_axis(
    points: npt.NDArray[np.float32], in_a: npt.NDArray[np.bool_]
) -> bool:
    """The two groups' ranges along PC1 do not overlap, with a gap wider than either."""
    a, b = points[in_a, 0], points[~in_a, 0]
    low, high = (a, b) if a.mean() < b.mean() else (b, a)
    gap = float(high.min() - low.max())
    return gap > max(float(np.ptp(a)), float(np.ptp(b)))


def test_the_sample_labels_every_hit_and_its_projection_separates_the_clusters(
    clean_db: None, session: Session
) -> None:
    # clean_db: other tests commit uploads under MODEL and a bank of this name.
    bad, ordinary = two_clusters(40)
    store(session, bad, bank_entry(session, "known-bad"))
    store(session, ordinary, None)

    sample = sample_corpus(session, MODEL, sample=1000)

    assert sample.corpus_size == 80
    assert Counter(sample.labels) == {NO_HIT: 40, "known-bad": 40}
    in_bad = np.asarray([label == "known-bad" for label in sample.labels])
    # The vectors read back are the stored ones, each with its own upload's label.
    stored = {tuple(v) for v in np.round(bad, 5)}
    assert all(
        (tuple(v) in stored) == hit
        for v, hit in zip(np.round(sample.vectors, 5), in_bad, strict=True)
    )
    assert separated_along_first_axis(project(sample.vectors).points, in_bad)


def test_projection_does_not_separate_one_cluster_split_at_random() -> None:
    # The check above can fail: one cluster split into two labels is not separated.
    bad, _ = two_clusters(40)
    in_a = np.arange(40) % 2 == 0
    assert not separated_along_first_axis(project(bad).points, in_a)


def test_a_small_sample_keeps_the_hits_and_fills_up_with_the_rest(session: Session) -> None:
    bad, ordinary = two_clusters(30)
    store(session, bad[:5], bank_entry(session, "bank-a"))
    store(session, bad[5:8], bank_entry(session, "bank-b"))
    store(session, ordinary, None)

    sample = sample_corpus(session, MODEL, sample=20)

    assert len(sample.labels) == 20
    # Every hit is taken (8 <= half the sample); the rest is drawn from the others.
    assert sample.labels.count("bank-a") == 5
    assert sample.labels.count("bank-b") == 3
    assert sample.labels.count(NO_HIT) == 12
    assert len(set(sample.upload_ids.tolist())) == 20


def test_an_upload_hit_by_two_banks_is_labelled_with_both(session: Session) -> None:
    bad, ordinary = two_clusters(3)
    store(session, bad[:1], bank_entry(session, "bank-b"))
    model_id = get_or_create_model(session, MODEL, DIM).id
    upload_id = session.query(Embedding.upload_id).filter(Embedding.model_id == model_id).scalar()
    session.add(
        Hit(
            upload_id=upload_id,
            bank_entry_id=bank_entry(session, "bank-a").id,
            signal=SignalType.PDQ,
            distance=3,
            model_id=None,
        )
    )
    store(session, ordinary, None)

    sample = sample_corpus(session, MODEL, sample=10)

    assert Counter(sample.labels) == {"bank-a + bank-b": 1, NO_HIT: 3}


def test_an_unknown_model_says_which_models_there_are(session: Session) -> None:
    store(session, two_clusters(2)[0], None)
    with pytest.raises(NothingToMap, match=f"no embeddings for model 'nope'.*{MODEL}"):
        sample_corpus(session, "nope", sample=10)


def test_render_map_writes_a_png_of_the_stated_size_with_the_hits_drawn(tmp_path: Path) -> None:
    bad, ordinary = two_clusters(50)
    out = tmp_path / "map.png"
    render_map(np.concatenate([bad, ordinary]), ["bank-a"] * 50 + [NO_HIT] * 50, out)

    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (WIDTH_PX, HEIGHT_PX)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    # The first bank's colour, tab10's blue (31, 119, 180), is on the map: the hits are drawn.
    blue = np.abs(pixels - np.array([31, 119, 180])).sum(axis=1) < 12
    assert blue.sum() > 500


def test_map_command_renders_the_stored_corpus(clean_db: None, tmp_path: Path) -> None:
    bad, ordinary = two_clusters(30)
    with TEST_RUNTIME.session() as session:
        store(session, bad, bank_entry(session, "known-bad"))
        store(session, ordinary, None)
    out = tmp_path / "maps" / "map.png"

    result = CliRunner().invoke(
        index_map,
        ["--out", str(out), "--sample", "40", "--model", MODEL],
        obj=TEST_RUNTIME,
        catch_exceptions=False,
    )

    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 40 uploads of 60 (20 with a bank hit)" in result.output
    with Image.open(out) as image:
        assert image.size == (WIDTH_PX, HEIGHT_PX)


def test_map_command_for_a_model_without_embeddings_fails_cleanly(
    clean_db: None, tmp_path: Path
) -> None:
    out = str(tmp_path / "m.png")
    result = CliRunner().invoke(
        main, ["index", "map", "--out", out, "--model", "absent"], obj=TEST_RUNTIME
    )

    assert result.exit_code == 1
    assert "no embeddings for model 'absent'" in result.output
    assert not (tmp_path / "m.png").exists()


@contextmanager
def serving(name: str) -> Iterator[None]:
    """`name` as the registry's active model for the block (the map draws the active
    model, whatever MODERATION_MODEL says once the registry has one); the states before
    are restored after."""
    with TEST_RUNTIME.session() as session:
        rows = session.execute(select(EmbeddingModel.name, EmbeddingModel.state))
        states = {name: state for name, state in rows}
        session.execute(
            update(EmbeddingModel)
            .where(EmbeddingModel.state == ModelState.ACTIVE)
            .values(state=ModelState.CANDIDATE)
        )
        session.execute(
            update(EmbeddingModel)
            .where(EmbeddingModel.name == name)
            .values(state=ModelState.ACTIVE)
        )
    try:
        yield
    finally:
        with TEST_RUNTIME.session() as session:
            session.execute(
                update(EmbeddingModel)
                .where(EmbeddingModel.name == name)
                .values(state=states.get(name, ModelState.RETIRED))
            )
            session.flush()  # before the one it replaced: one active row at a time
            for other, state in states.items():
                if state is ModelState.ACTIVE and other != name:
                    session.execute(
                        update(EmbeddingModel)
                        .where(EmbeddingModel.name == other)
                        .values(state=state)
                    )


def test_the_review_app_draws_the_map_for_analysts_and_reviewers(
    site: TestClient, keys: dict[Role, str]
) -> None:
    # Committed, so under a model of its own: the other tests here count one model's uploads.
    page_model = "map-page-test-model"
    bad, ordinary = two_clusters(30, seed=5)
    with TEST_RUNTIME.session() as session:
        store(session, bad, bank_entry(session, "page-bank"), page_model)
        store(session, ordinary, None, page_model)
    with serving(page_model):
        for role in (Role.ANALYST, Role.REVIEWER):
            site.cookies.clear()
            log_in(site, keys[role])
            page = site.get("/search/map")
            assert page.status_code == 200
            assert 'href="/search/map.png"' in page.text
            assert page_model in page.text
            picture = site.get("/search/map.png")
            assert picture.status_code == 200
            assert picture.headers["cache-control"] == "private, no-store"
            image = Image.open(io.BytesIO(picture.content))
            assert image.size == (1200, 900)
        # A submitter may not see it, and nobody without a login.
        site.cookies.clear()
        assert site.get("/search/map.png", headers=bearer(keys[Role.SUBMITTER])).status_code == 403
        assert site.get("/search/map.png").status_code in (303, 401)


def test_the_map_page_draws_each_upload_as_a_link_coloured_by_bank_and_review(
    site: TestClient, keys: dict[Role, str]
) -> None:
    page_model = "map-points-test-model"
    bad, ordinary = two_clusters(12, seed=7)
    with TEST_RUNTIME.session() as session:
        store(session, bad, bank_entry(session, "points-bank"), page_model)
        store(session, ordinary, None, page_model)
        hit_uploads = session.scalars(
            select(Hit.upload_id)
            .join(Embedding, Embedding.upload_id == Hit.upload_id)
            .join(EmbeddingModel, EmbeddingModel.id == Embedding.model_id)
            .where(EmbeddingModel.name == page_model)
            .order_by(Hit.upload_id)
        ).all()
        confirmed = hit_uploads[0]
        session.execute(
            update(Hit)
            .where(Hit.upload_id == confirmed)
            .values(review_status=ReviewStatus.CONFIRMED)
        )
    with serving(page_model):
        log_in(site, keys[Role.ANALYST])
        page = site.get("/search/map")
    assert page.status_code == 200
    points = re.findall(
        r'<a class="point" href="/review/uploads/(\d+)" data-upload="\1"\s+'
        r'data-label="([^"]*)" data-status="([^"]*)">\s*<circle [^>]*fill="(#[0-9a-f]{6})" '
        r'class="status-([\w-]+)"',
        page.text,
    )
    assert len(points) == 24
    by_upload = {
        int(upload): (label, status, colour) for upload, label, status, colour, _ in points
    }
    assert set(hit_uploads) <= set(by_upload)
    # One colour for the bank's uploads, another for the rest; hits drawn last (on top).
    bank_colours = {by_upload[u][2] for u in hit_uploads}
    other_colours = {c for u, (_, _, c) in by_upload.items() if u not in hit_uploads}
    assert len(bank_colours) == 1
    assert other_colours == {"#b0b0b0"}
    assert bank_colours != other_colours
    assert [int(p[0]) in hit_uploads for p in points] == [False] * 12 + [True] * 12
    # Each upload's place in review: its hits' status, or no hit.
    assert by_upload[confirmed][:2] == ("points-bank", "confirmed")
    assert {by_upload[u][1] for u in hit_uploads if u != confirmed} == {"pending"}
    assert {status for u, (_, status, _) in by_upload.items() if u not in hit_uploads} == {NO_HIT}
