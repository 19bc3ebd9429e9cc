"""The similarity index over real PostgreSQL: following the table, filters, queries, recall."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from sqlalchemy.orm import Session
from transformers import AutoTokenizer

from moderation.embedding.models import Embedding
from moderation.main.cli import main
from moderation.runtime import Runtime
from moderation.screening.models import UploadStatus
from moderation.search import milvus_sync, service
from moderation.search.follow import FollowedIndex
from moderation.search.indexes import IndexKind
from moderation.search.rerank import SearchQuery
from moderation.search.runtime import SearchRuntime
from moderation.search.store import build, open_index, save
from moderation.search.vector_index import IndexRows, VectorIndex
from moderation.worker.metrics import IndexRecall
from tests.conftest import TEST_RUNTIME, TINY_MODEL_DIR
from tests.milvus_fixtures import MilvusEnv, sync_until_caught_up
from tests.search_fixtures import (
    DIM,
    add_hit,
    add_upload,
    index_settings,
    search_runtime,
    tiny_model,
    unit,
)
from tests.vectors import at_cosine_distance

__all__ = ["search_runtime"]

PHOTOS = Path(__file__).parent / "data" / "photos"


def _open(directory: Path, **plan: object) -> FollowedIndex:
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
    return open_index(TEST_RUNTIME.engine, model, index_settings(directory, **plan))


@pytest.fixture(params=["faiss", "milvus"])
def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], VectorIndex]:
    """Opens the index of the tiny model's corpus as it stands, on each backend: Faiss in
    process, or the real Milvus server after a sync has caught up."""
    if request.param == "faiss":
        return lambda: _open(tmp_path)
    env: MilvusEnv = request.getfixturevalue("milvus_env")

    def open_milvus() -> VectorIndex:
        sync_until_caught_up(env.loop())
        with TEST_RUNTIME.session() as session:
            model = tiny_model(session)
            session.expunge(model)
        return milvus_sync.open_index(env.runtime.engine, env.milvus, model)

    return open_milvus


def _ids_in_table() -> list[int]:
    with TEST_RUNTIME.session() as session:
        return sorted(session.scalars(select(Embedding.id)))


def _random_corpus(count: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        return [add_upload(session, model, [v]) for v in unit(rng, count)]


def _search(index: VectorIndex, vector: np.ndarray, k: int, **options: object) -> list[int]:
    with TEST_RUNTIME.session() as session:
        results = service.search(session, index, SearchQuery(vector=vector), k, **options)  # type: ignore[arg-type]
    return [r.upload_id for r in results]


def cli(runtime: Runtime, *args: str) -> str:
    result = CliRunner().invoke(main, list(args), obj=runtime, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_an_exact_copy_of_an_image_ranks_first(clean_db: None, search_runtime: Runtime) -> None:
    """Through the command, by path: fetched, decoded and embedded as screening does."""
    searches = SearchRuntime(search_runtime, follow=False)
    _random_corpus(40)
    photos = sorted(PHOTOS.glob("*.jpg"))[:4]
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        uploads = {
            photo.name: add_upload(
                session,
                model,
                [searches.fetched_image_query(str(photo), operator_file=True).vector],
            )
            for photo in photos
        }
    for photo in photos:
        results = json.loads(
            cli(search_runtime, "search", "--image", str(photo), "-k", "3", "--json")
        )
        assert results[0]["upload_id"] == uploads[photo.name]
        assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert {"upload_id", "uri", "score", "screened_at", "hits"} <= results[0].keys()
        assert len(results) == 3


def test_results_are_per_upload_by_its_best_frame(
    clean_db: None, open_backend: Callable[[], VectorIndex]
) -> None:
    rng = np.random.default_rng(1)
    query = unit(rng)[0]
    _random_corpus(30, seed=2)
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        animation = add_upload(
            session,
            model,
            [at_cosine_distance(query, d, seed=i) for i, d in enumerate((0.3, 0.02, 0.01))],
        )
        still = add_upload(session, model, [at_cosine_distance(query, 0.05)])
    index = open_backend()
    with TEST_RUNTIME.session() as session:
        results = service.search(session, index, SearchQuery(vector=query), 2)
    assert [r.upload_id for r in results] == [animation, still]
    assert results[0].frame_index == 2
    assert results[0].score == pytest.approx(0.99, abs=1e-5)


@pytest.fixture
def filtered_corpus(clean_db: None) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Near a query: 60 recent uploads without hits. Far from it: 6 older uploads with
    hits on bank `csam-known`, and 4 failed with `decode_error`, plus 100 unrelated."""
    rng = np.random.default_rng(3)
    query = unit(rng)[0]
    now = datetime.now(UTC)
    groups: dict[str, list[int]] = {"near": [], "banked": [], "failed": []}
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        for i in range(60):
            vector = at_cosine_distance(query, 0.01 + i * 0.002, seed=i)
            groups["near"].append(add_upload(session, model, [vector]))
        for i in range(6):
            vector = at_cosine_distance(query, 0.6 + i * 0.01, seed=100 + i)
            upload = add_upload(session, model, [vector], finished_at=now - timedelta(days=3))
            add_hit(session, upload, "csam-known")
            groups["banked"].append(upload)
        for i in range(4):
            vector = at_cosine_distance(query, 0.7 + i * 0.01, seed=200 + i)
            groups["failed"].append(
                add_upload(
                    session, model, [vector], status=UploadStatus.FAILED, error_code="decode_error"
                )
            )
        for vector in unit(rng, 100):
            add_upload(session, model, [vector])
    return query, groups


@pytest.mark.parametrize(
    "options",
    [
        # Through the index: few candidates, so the search must widen to find 5 that pass.
        {"candidates": 10, "exact_scan_max": 0},
        # Few rows pass the filter: they are scanned exactly.
        {"candidates": 10, "exact_scan_max": 20_000},
    ],
)
def test_filters_return_k_results_when_k_exist(
    filtered_corpus: tuple[np.ndarray, dict[str, list[int]]],
    open_backend: Callable[[], VectorIndex],
    options: dict[str, int],
) -> None:
    query, groups = filtered_corpus
    index = open_backend()
    assert index.kind == IndexKind.HNSW  # 170 vectors, between the test thresholds

    exact = options["exact_scan_max"] > 0

    def check(k: int, filters: service.Filters, passing: list[int]) -> None:
        """k results when k pass (all of them when fewer do), each one passing; in exact
        order from an exact scan, and from the index as its approximation allows."""
        found = _search(index, query, k, filters=filters, **options)
        assert len(found) == min(k, len(passing))
        assert set(found) <= set(passing)
        if exact:
            assert found == passing[:k]

    check(5, service.Filters(bank="csam-known"), groups["banked"])
    check(5, service.Filters(has_hit=True), groups["banked"])
    check(10, service.Filters(bank="csam-known"), groups["banked"])  # only 6 exist
    check(4, service.Filters(error_code="decode_error"), groups["failed"])
    check(3, service.Filters(status=UploadStatus.FAILED), groups["failed"])
    week_ago = datetime.now(UTC) - timedelta(days=7)
    yesterday = datetime.now(UTC) - timedelta(days=1)
    check(6, service.Filters(screened_from=week_ago, screened_until=yesterday), groups["banked"])
    check(5, service.Filters(has_hit=False), groups["near"])
    check(5, service.Filters(bank="no-such-bank"), [])


def test_results_summarise_their_hits(
    filtered_corpus: tuple[np.ndarray, dict[str, list[int]]], tmp_path: Path
) -> None:
    query, groups = filtered_corpus
    index = _open(tmp_path)
    with TEST_RUNTIME.session() as session:
        (result,) = service.search(
            session, index, SearchQuery(vector=query), 1, service.Filters(bank="csam-known")
        )
    assert result.upload_id == groups["banked"][0]
    assert [(h.bank, h.signal, h.review_status) for h in result.hits] == [
        ("csam-known", "sha256", "pending")
    ]
    assert result.screened_at is not None


def test_an_upload_screened_after_loading_is_found_without_a_rebuild(
    clean_db: None, tmp_path: Path
) -> None:
    _random_corpus(100)
    index = _open(tmp_path)
    before = index.size
    rng = np.random.default_rng(9)
    vector = unit(rng)[0]
    with TEST_RUNTIME.session() as session:
        upload = add_upload(session, tiny_model(session), [vector])
    assert index.tail(TEST_RUNTIME.engine) == 1
    assert index.size == before + 1
    assert _search(index, vector, 1, candidates=5, exact_scan_max=0) == [upload]


def test_a_restart_reloads_the_snapshot_and_reads_only_the_tail(
    clean_db: None, tmp_path: Path
) -> None:
    _random_corpus(120)
    config = index_settings(tmp_path)
    index = _open(tmp_path)
    save(index, config)
    _random_corpus(7, seed=5)
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
    restarted = open_index(TEST_RUNTIME.engine, model, config)  # the snapshot, then the tail
    assert restarted.size == 127
    assert sorted(restarted.embedding_ids.tolist()) == _ids_in_table()


def test_a_row_committed_late_with_a_lower_id_is_not_skipped(
    clean_db: None, tmp_path: Path
) -> None:
    """Ids are taken at insert and become visible at commit, in any order. A checkpoint of
    the largest id seen would skip the late row for ever; this index never does, neither
    while running nor after a restart from a snapshot taken in between."""
    _random_corpus(60)
    config = index_settings(tmp_path)
    index = _open(tmp_path)
    rng = np.random.default_rng(11)
    late_vector, early_vector = unit(rng, 2)
    engine = TEST_RUNTIME.engine
    with engine.connect() as slow, Session(bind=slow) as slow_session:
        slow_session.begin()
        late = add_upload(slow_session, tiny_model(slow_session), [late_vector])
        late_id = slow_session.scalars(
            select(Embedding.id).where(Embedding.upload_id == late)
        ).one()
        with TEST_RUNTIME.session() as session:
            early = add_upload(session, tiny_model(session), [early_vector])
        (early_id,) = [i for i in _ids_in_table() if i > late_id]
        # Tail while the slow transaction is open, for longer than the commit lag.
        for _ in range(4):
            index.tail(engine)
            time.sleep(0.25)
        assert early_id in index.embedding_ids
        assert late_id not in index.embedding_ids
        assert index.checkpoint < late_id
        save(index, config)  # a snapshot taken with the late row still in flight
        slow_session.commit()
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
    restarted = open_index(engine, model, config)
    index.tail(engine)
    for followed in (index, restarted):
        ids = followed.embedding_ids.tolist()
        assert sorted(ids) == _ids_in_table()  # the late row is in, and nothing twice
        assert _search(followed, late_vector, 1, exact_scan_max=0) == [late]
    assert _search(index, early_vector, 1, exact_scan_max=0) == [early]


def test_the_checkpoint_passes_every_row_once_no_transaction_is_open(
    clean_db: None, tmp_path: Path
) -> None:
    _random_corpus(30)
    index = _open(tmp_path)
    newest = max(_ids_in_table())
    deadline = time.monotonic() + 20  # other sessions on the server may hold xmin briefly
    while index.checkpoint < newest and time.monotonic() < deadline:
        time.sleep(0.25)
        index.tail(TEST_RUNTIME.engine)
    assert index.checkpoint >= newest
    assert len(index.known_above_checkpoint()) == 0


def test_a_text_query_goes_through_the_text_tower(clean_db: None, search_runtime: Runtime) -> None:
    searches = SearchRuntime(search_runtime, follow=False)
    embedder = searches.embedder()
    assert embedder.name == str(TINY_MODEL_DIR)
    texts = embedder.embed_texts(["red sports car", "a cat on a sofa"])
    assert texts.shape == (2, DIM)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    assert float(texts[0] @ texts[1]) < 0.999  # different words, different vectors
    # The same vectors as CLIP's own joint forward pass gives for these texts: the text
    # tower and its projection into the space the image embeddings live in.
    tokens = AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR))(
        ["red sports car", "a cat on a sofa"], padding=True, return_tensors="pt"
    )
    side = embedder.preprocess.crop_height
    with torch.inference_mode():
        joint = embedder.model()(
            **tokens, pixel_values=torch.zeros((1, 3, side, side)), return_dict=True
        )
    np.testing.assert_allclose(texts, joint.text_embeds.numpy(), atol=1e-5)
    _random_corpus(50)
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        car = add_upload(session, model, [at_cosine_distance(texts[0], 0.02)])
        cat = add_upload(session, model, [at_cosine_distance(texts[1], 0.02)])
    assert [
        r.upload_id
        for r in searches.search(searches.text_query("red sports car"), 1, service.Filters())
    ] == [car]
    results = json.loads(cli(search_runtime, "search", "--text", "a cat on a sofa", "--json"))
    assert results[0]["upload_id"] == cat
    assert results[0]["score"] == pytest.approx(0.98, abs=1e-4)


def test_search_by_upload_id_and_command_errors(clean_db: None, search_runtime: Runtime) -> None:
    ids = _random_corpus(20)
    results = json.loads(
        cli(search_runtime, "search", "--upload", str(ids[3]), "-k", "5", "--json")
    )
    assert results[0]["upload_id"] == ids[3]
    assert len(results) == 5
    table = cli(search_runtime, "search", "--upload", str(ids[3]), "-k", "2")
    assert "UPLOAD_ID" in table
    runner = CliRunner()
    assert runner.invoke(main, ["search", "-k", "3"], obj=search_runtime).exit_code == 2
    assert (
        runner.invoke(main, ["search", "--text", "x", "--upload", "1"], obj=search_runtime)
    ).exit_code == 2
    missing = runner.invoke(main, ["search", "--upload", str(max(ids) + 1000)], obj=search_runtime)
    assert missing.exit_code == 1
    assert "has no embedding" in missing.output


def test_rebuild_then_eval_reports_recall_one_for_the_exact_index(
    clean_db: None, search_runtime: Runtime
) -> None:
    ids = _random_corpus(80)
    with TEST_RUNTIME.session() as session:  # exact copies: ties that any order answers rightly
        model = tiny_model(session)
        stored = session.scalars(
            select(Embedding.vector).where(Embedding.upload_id == ids[0])
        ).one()
        for _ in range(3):
            add_upload(session, model, [np.frombuffer(stored, "<f4")])
    summary = json.loads(cli(search_runtime, "index", "rebuild", "--json"))
    assert (summary["vectors"], summary["kind"]) == (83, "flat")
    assert summary["checkpoint"] == max(_ids_in_table())  # settled: a restart reads nothing
    history = json.loads(cli(search_runtime, "index", "eval", "--queries", "50", "--json"))
    assert len(history) == 1
    assert history[0]["recall"] == 1.0
    assert (history[0]["index_kind"], history[0]["corpus_size"], history[0]["k"]) == (
        "flat",
        83,
        10,
    )
    assert history[0]["queries"] == 50
    history = json.loads(cli(search_runtime, "index", "eval", "-k", "5", "--json"))
    assert [e["k"] for e in history] == [10, 5]
    # What a worker's metrics export (`moderation_index_recall`).
    exported = CollectorRegistry()
    exported.register(IndexRecall(TEST_RUNTIME))
    recall = exported.get_sample_value(
        "moderation_index_recall", {"model": str(TINY_MODEL_DIR), "index_kind": "flat", "k": "5"}
    )
    assert recall == 1.0


def test_eval_of_an_approximate_index_records_its_parameters(
    clean_db: None, tmp_path: Path
) -> None:
    _random_corpus(300)
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
    index = build(TEST_RUNTIME.engine, model, index_settings(tmp_path, exact_max=10, hnsw_max=100))
    assert index.kind is IndexKind.IVF_FLAT
    with TEST_RUNTIME.session() as session:
        evaluation = service.evaluate(session, index, queries=100, k=10, seed=0)
    assert 0.5 < evaluation.recall <= 1.0
    assert {"nlist", "nprobe", "tuned_recall"} <= evaluation.parameters.keys()
    assert evaluation.corpus_size == 300


def test_a_build_streams_large_reads_and_keeps_labels_aligned(
    clean_db: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads above the fetch chunk stream the table instead of naming ids; every label
    still points at its own row (tuning queries are added last, out of id order)."""
    from moderation.search import follow

    monkeypatch.setattr(follow, "_FETCH_CHUNK", 25)
    ids = _random_corpus(150)
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        vectors = {
            upload: np.frombuffer(vector, "<f4")
            for upload, vector in session.execute(
                select(Embedding.upload_id, Embedding.vector).where(Embedding.upload_id.in_(ids))
            )
        }
    index = build(TEST_RUNTIME.engine, model, index_settings(tmp_path))
    assert index.kind is IndexKind.HNSW
    assert sorted(index.upload_ids.tolist()) == sorted(ids)
    for upload in ids[::10]:
        _, _, found = index.search(vectors[upload], 1)
        assert found[0][0] == upload


def test_faiss_deletes_leave_tombstones_that_survive_a_snapshot(
    clean_db: None, tmp_path: Path
) -> None:
    """The Faiss `VectorIndex`: a deleted row is never returned again (HNSW cannot remove
    it, so its label maps to -1), also after a save and reload; an upsert replaces it."""
    ids = _random_corpus(120, seed=11)
    index = _open(tmp_path)
    assert index.kind is IndexKind.HNSW
    with TEST_RUNTIME.session() as session:
        victim = service.upload_vector(session, index.model_id, index.model_name, ids[5])
        victim_id = session.scalar(select(Embedding.id).where(Embedding.upload_id == ids[5]))
    assert victim_id is not None
    assert index.search(victim, 1)[1][0][0] == victim_id
    assert index.delete(np.array([victim_id])) == 1
    assert index.size == 119
    assert victim_id not in index.search(victim, 120)[1][0]
    assert victim_id not in index.held_ids()
    save(index, index_settings(tmp_path))
    reopened = _open(tmp_path)
    assert reopened.size == 119
    assert victim_id not in reopened.search(victim, 120)[1][0]
    assert reopened.describe()["tombstones"] == 1
    elsewhere = unit(np.random.default_rng(12))[0]
    reopened.upsert(IndexRows(np.array([victim_id]), np.array([ids[5]]), elsewhere[None, :]))
    assert reopened.size == 120
    assert reopened.search(elsewhere, 1)[1][0][0] == victim_id
