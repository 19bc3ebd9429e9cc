"""The cross-encoder reranker: a tiny random BLIP loaded through `from_pretrained`, scoring a
text query against each top candidate's image, fetched again under the URI policy; and
`moderation eval compare` measuring it against the exact rerank on the golden set."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import select

from moderation.embedding.families import open_embedder
from moderation.evaluation import golden
from moderation.evaluation.models import EvaluationRun
from moderation.http.limits import ApiLimits
from moderation.main.cli import main
from moderation.runtime import Runtime
from moderation.search.blip import ImageTextMatcher
from moderation.search.rerankers import upload_images
from moderation.search.runtime import SearchRuntime
from moderation.search.service import Filters
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS, TINY_MODEL_DIR
from tests.images import encode, write
from tests.search_fixtures import SEARCH_CHANGES, add_upload, tiny_model
from tests.servers import http_server, image_handler
from tests.vectors import at_cosine_distance

QUERY = "red sports car"
TOP = 6


@pytest.fixture
def blip_runtime(tiny_blip: Path, tmp_path: Path, make_runtime: Callable[..., Runtime]) -> Runtime:
    """Searches (as `search_fixtures.search_runtime`) whose cross-encoder is the tiny BLIP,
    reranking the top `TOP`."""
    return make_runtime(
        index_dir=tmp_path / "index",
        search_rerank_model=str(tiny_blip),
        search_rerank_top=TOP,
        **SEARCH_CHANGES,
    )


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _corpus(directory: Path, anchor: np.ndarray, count: int) -> list[tuple[int, Path]]:
    """Uploads of real image files, the i-th at cosine distance 0.01 * (i + 1) from
    `anchor`, so the exact order is the order made."""
    made = []
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        for i in range(count):
            path = write(directory / f"{i}.png", encode(_image(i), "PNG"))
            vector = at_cosine_distance(anchor, 0.01 * (i + 1), seed=i)
            made.append((add_upload(session, model, [vector], uri=path.as_uri()), path))
    return made


def _text_vector(text: str) -> np.ndarray:
    vector: np.ndarray = open_embedder(str(TINY_MODEL_DIR), "cpu").embed_texts([text])[0]
    return vector


def test_a_random_blip_loads_through_from_pretrained_and_tells_images_apart(
    tiny_blip: Path,
) -> None:
    matcher = ImageTextMatcher(str(tiny_blip))
    images = [_image(0), _image(1), _image(0)]
    scores = matcher.scores(QUERY, images)
    assert scores.shape == (3,)
    assert np.all((scores > 0) & (scores < 1))
    assert scores[0] == pytest.approx(scores[2], abs=1e-6)
    assert scores[0] != pytest.approx(scores[1], abs=1e-7)
    assert matcher.scores(QUERY, []).shape == (0,)


def test_the_cross_encoder_reorders_the_top_text_results_by_its_scores(
    clean_db: None, blip_runtime: Runtime, tiny_blip: Path, tmp_path: Path
) -> None:
    made = _corpus(tmp_path, _text_vector(QUERY), 10)
    runtime = SearchRuntime(blip_runtime, follow=False)
    query = runtime.text_query(QUERY)
    made[2][1].unlink()  # its uploader's file is gone: it cannot be scored again
    exact = [r.upload_id for r in runtime.search(query, 10, Filters(), reranker="exact")]
    assert exact == [upload_id for upload_id, _ in made]

    reranked = runtime.search(query, 10, Filters(), reranker="cross-encoder")

    # Independently: the top TOP uploads' images scored by the same checkpoint, directly.
    readable = [(u, p) for u, p in made[:TOP] if p.exists()]
    scores = ImageTextMatcher(str(tiny_blip)).scores(
        QUERY, [Image.open(p).convert("RGB") for _, p in readable]
    )
    by_score = [u for _, (u, _) in sorted(zip(-scores, readable, strict=True))]
    assert by_score != [u for u, _ in readable]  # the test would prove nothing otherwise
    expected = by_score + [made[2][0]] + [u for u, _ in made[TOP:]]
    assert [r.upload_id for r in reranked] == expected
    assert [r.score for r in reranked[: len(readable)]] == pytest.approx(
        sorted(scores.tolist(), reverse=True), abs=1e-6
    )
    # A query without text is ranked exactly, whatever the setting.
    by_upload = runtime.upload_query(made[0][0])
    assert [r.upload_id for r in runtime.search(by_upload, 10, Filters())] == [
        r.upload_id for r in runtime.search(by_upload, 10, Filters(), reranker="cross-encoder")
    ]
    runtime.close()


def test_eval_compare_measures_the_cross_encoder_against_the_exact_rerank(
    clean_db: None, blip_runtime: Runtime, tmp_path: Path
) -> None:
    made = [upload_id for upload_id, _ in _corpus(tmp_path, _text_vector(QUERY), 12)]
    with TEST_RUNTIME.session() as session:
        # Relevant: the 1st and the 5th by cosine. k = 3 finds one of them exactly; what
        # the cross-encoder finds depends on its scores, measured all the same.
        golden.add_query(session, golden.QuerySubject(text=QUERY), [made[0], made[4]], actor="test")
        golden.add_query(session, golden.QuerySubject(upload_id=made[1]), [made[0]], actor="test")

    result = CliRunner().invoke(main, ["eval", "compare", "-k", "3", "--json"], obj=blip_runtime)
    assert result.exit_code == 0, result.output
    compared = json.loads(result.stdout)

    assert (compared["a"]["reranker"], compared["b"]["reranker"]) == ("exact", "cross-encoder")
    assert compared["a"]["figures"]["text"]["recall"] == pytest.approx(0.5)
    rows = {(row["modality"], row["measure"]): row for row in compared["figures"]}
    assert set(rows) == {
        (modality, measure)
        for modality in ("text", "image")
        for measure in ("recall", "precision", "mrr")
    }
    # Image queries never reach the cross-encoder: their figures agree to the last bit.
    for measure in ("recall", "precision", "mrr"):
        assert rows[("image", measure)]["change"] == 0.0
    with TEST_RUNTIME.session() as session:
        assert list(session.scalars(select(EvaluationRun.reranker).order_by(EvaluationRun.id))) == [
            "exact",
            "cross-encoder",
        ]

    table = CliRunner().invoke(
        main, ["eval", "compare", "--reranker", "exact", "--reranker", "exact"], obj=blip_runtime
    )
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].startswith("A: run ")
    assert lines[1].startswith("B: run ")
    assert lines[2].split() == ["MODALITY", "MEASURE", "A", "B", "CHANGE"]


def test_the_cross_encoders_fetches_hold_the_api_processes_fetch_slots(
    clean_db: None, tmp_path: Path
) -> None:
    """A rerank fetches its candidates under the slots it is given (in the API, the
    application's, which every fetch it makes shares): while the candidates' host has none
    free, nothing is fetched; once they free, every candidate is read."""
    requests: list[str] = []
    serve = image_handler(encode(_image(0), "PNG"))

    class Counting(serve):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            requests.append(self.path)
            super().do_GET()

    limits = ApiLimits.from_settings(TEST_SETTINGS)
    slots = limits.fetches
    with http_server(Counting) as server, ExitStack() as holding:
        with TEST_RUNTIME.session() as session:
            model = tiny_model(session)
            ids = [
                add_upload(
                    session, model, [np.eye(1, 32, i, dtype=np.float32)[0]], uri=f"{server}/{i}.png"
                )
                for i in range(3)
            ]
        for holder in range(slots.per_host):
            holding.enter_context(
                slots.taken(f"{server}/held", setting="TEST", party=f"holder-{holder}")
            )
        with TEST_RUNTIME.session() as session:
            read = upload_images(session, TEST_SETTINGS, limits)
            with ThreadPoolExecutor(1) as pool:
                reading = pool.submit(read, ids)
                time.sleep(0.5)
                assert requests == []  # every candidate waits for the host's slots
                holding.close()
                images = reading.result(timeout=30)
    assert sorted(images) == sorted(ids)
    assert len(requests) == 3
