"""The general index on a real Milvus server: the sync from PostgreSQL (new rows, deletes,
review decisions, out-of-order commits), failure and recovery, and the alias switch.

The server is the Milvus 2.3.5 standalone from PyPI's `milvus` wheel, started once per test
session (`tests/milvus_fixtures.py`); each test has collections of its own."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from moderation.auth.models import Role
from moderation.embedding.models import Embedding
from moderation.main.app import create_app
from moderation.main.cli import main
from moderation.review import service as review
from moderation.review.models import Hit, ReviewStatus
from moderation.runtime import Runtime
from moderation.screening.models import Upload
from moderation.search import milvus_sync, service
from moderation.search.milvus_index import MilvusIndex, SearchIndexUnavailable, count_rows
from moderation.search.models import MilvusSyncState
from moderation.search.rerank import SearchQuery
from moderation.search.runtime import SearchRuntime
from tests.api_fixtures import bearer, keys
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS
from tests.milvus_fixtures import MilvusEnv, milvus_api, sync_until_caught_up
from tests.search_fixtures import add_hit, add_upload, tiny_model, unit
from tests.vectors import at_cosine_distance

__all__ = ["keys", "milvus_api"]


def cli(runtime: Runtime, *args: str) -> str:
    result = CliRunner().invoke(main, list(args), obj=runtime, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _corpus(count: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        return [add_upload(session, model, [v]) for v in unit(rng, count)]


def _index(env: MilvusEnv) -> MilvusIndex:
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        session.expunge(model)
    return milvus_sync.open_index(env.runtime.engine, env.milvus, model)


def _embedding_ids() -> list[int]:
    with TEST_RUNTIME.session() as session:
        return sorted(session.scalars(select(Embedding.id)))


def _search(index: MilvusIndex, vector: np.ndarray, k: int, filters: service.Filters) -> list[int]:
    with TEST_RUNTIME.session() as session:
        results = service.search(session, index, SearchQuery(vector=vector), k, filters)
    return [r.upload_id for r in results]


def test_a_review_decision_reaches_the_filter_inside_milvus(
    clean_db: None, milvus_env: MilvusEnv
) -> None:
    rng = np.random.default_rng(5)
    query = unit(rng)[0]
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        near = [
            add_upload(session, model, [at_cosine_distance(query, 0.01 * (i + 1), seed=i)])
            for i in range(20)
        ]
        for upload in near[:6]:
            add_hit(session, upload, "known-bad")
    _corpus(40, seed=6)
    loop = milvus_env.loop()
    sync_until_caught_up(loop)
    index = _index(milvus_env)
    assert index.size == 60
    assert index.kind == "hnsw"
    assert "tuned_recall" in index.parameters

    confirmed = service.Filters(review_status=ReviewStatus.CONFIRMED)
    pending = service.Filters(review_status=ReviewStatus.PENDING)
    assert _search(index, query, 5, confirmed) == []
    assert _search(index, query, 10, pending) == near[:6]

    with TEST_RUNTIME.session() as session:
        for upload in near[:2]:
            hit_id = session.scalar(select(Hit.id).where(Hit.upload_id == upload))
            assert hit_id is not None
            review.decide(
                session, TEST_SETTINGS, hit_id, review.Outcome.CONFIRM, None, "reviewer@test"
            )
    # Milvus itself still holds the old status until the change log is synced: the filter
    # runs inside it, not only on PostgreSQL afterwards.
    _, stale, _ = index.search(query, 10, filters=confirmed)
    assert (stale == -1).all()
    sync_until_caught_up(loop)
    _, found, uploads = index.search(query, 10, filters=confirmed)
    assert sorted(uploads[0][found[0] >= 0].tolist()) == near[:2]
    assert _search(index, query, 5, confirmed) == near[:2]
    assert _search(index, query, 10, pending) == near[2:6]
    assert _search(index, query, 3, service.Filters(bank="known-bad")) == near[:3]


def test_deleted_uploads_leave_the_results(clean_db: None, milvus_env: MilvusEnv) -> None:
    ids = _corpus(30)
    loop = milvus_env.loop()
    sync_until_caught_up(loop)
    index = _index(milvus_env)
    with TEST_RUNTIME.session() as session:
        victim_vector = service.upload_vector(session, index.model_id, index.model_name, ids[7])
        session.execute(delete(Upload).where(Upload.id.in_(ids[5:10])))  # cascades: embeddings
    _, _, before = index.search(victim_vector, 3)
    assert before[0][0] == ids[7]
    sync_until_caught_up(loop)
    _, _found, uploads = index.search(victim_vector, 30)
    assert not set(uploads[0].tolist()) & set(ids[5:10])
    assert index.size == 25
    assert np.array_equal(index.held_ids(), np.array(_embedding_ids()))


def test_out_of_order_commits_are_neither_skipped_nor_doubled(
    clean_db: None, milvus_env: MilvusEnv
) -> None:
    """A row whose transaction commits after a higher id was synced still arrives, and the
    checkpoint waits for it; every row ends in Milvus exactly once."""
    _corpus(10)
    loop = milvus_env.loop()
    sync_until_caught_up(loop)
    rng = np.random.default_rng(9)
    with Session(milvus_env.runtime.engine) as slow:
        model = tiny_model(slow)
        late = add_upload(slow, model, [unit(rng)[0]])  # takes the lower id, commits last
        early = _corpus(3, seed=10)
        for _ in range(3):
            loop.run_once()
        (sync,) = loop._syncs.values()
        late_id = slow.scalar(select(Embedding.id).where(Embedding.upload_id == late))
        assert late_id is not None
        assert sync.embeddings_checkpoint < late_id  # held back by the open transaction
        index = _index(milvus_env)
        assert set(index.held_ids().tolist()) == set(_embedding_ids())  # the early rows
        slow.commit()
    sync_until_caught_up(loop)
    held = index.held_ids()
    assert held.tolist() == _embedding_ids()
    assert late_id in held
    assert count_rows(milvus_env.milvus, index.alias, "Strong") == 14
    assert sync.embeddings_checkpoint >= late_id
    assert early


def test_milvus_down_answers_503_and_the_sync_resumes_where_it_stopped(
    clean_db: None, milvus_env: MilvusEnv, milvus_api: TestClient, keys: dict[Role, str]
) -> None:
    """Kill the server (its process group, SIGKILL) while the sync runs and uploads keep
    committing; searches answer 503 with the reason; after a restart the sync catches up
    with nothing skipped and nothing doubled."""
    ids = _corpus(20)
    loop = milvus_env.loop()
    sync_until_caught_up(loop)
    analyst = bearer(keys[Role.ANALYST])
    assert (
        milvus_api.get("/v1/search", params={"upload_id": ids[0]}, headers=analyst).status_code
        == 200
    )

    stop_loop = loop.start(interval_s=0.1)
    try:
        _corpus(15, seed=1)
        milvus_env.server.stop(crash=True)
        _corpus(15, seed=2)  # screening writes on: PostgreSQL alone
        response = milvus_api.get("/v1/search", params={"upload_id": ids[0]}, headers=analyst)
        assert response.status_code == 503
        assert response.json()["code"] == "search_index_unavailable"
        assert "Milvus at http://127.0.0.1:" in response.json()["detail"]
        with pytest.raises(SearchIndexUnavailable):
            _index(milvus_env).search(unit(np.random.default_rng(0))[0], 5)
        milvus_env.server.start()
        _corpus(5, seed=3)
        wanted = _embedding_ids()
        deadline = time.monotonic() + 120
        while True:
            with TEST_RUNTIME.session() as session:
                (state,) = session.scalars(select(MilvusSyncState))
                caught_up = state.embeddings_checkpoint >= wanted[-1]
            if caught_up:
                break
            assert time.monotonic() < deadline, "the sync did not resume"
            time.sleep(0.2)
    finally:
        stop_loop()
    index = _index(milvus_env)
    assert index.held_ids().tolist() == wanted
    assert count_rows(milvus_env.milvus, index.alias, "Strong") == len(wanted) == 55
    assert (
        milvus_api.get("/v1/search", params={"upload_id": ids[0]}, headers=analyst).status_code
        == 200
    )


def test_a_rebuild_moves_the_alias_and_queries_see_one_collection_or_the_other(
    clean_db: None, milvus_env: MilvusEnv
) -> None:
    first = _corpus(40)
    loop = milvus_env.loop()
    sync_until_caught_up(loop)
    index = _index(milvus_env)
    old_collection = index.describe()["collection"]
    # PostgreSQL moves on without the old collection: its uploads go, new ones come. The
    # rebuilt collection holds only the new, the old one only the old: a mix would show.
    with TEST_RUNTIME.session() as session:
        session.execute(delete(Upload).where(Upload.id.in_(first)))
    second = _corpus(40, seed=1)
    query = unit(np.random.default_rng(2))[0]
    answers: list[set[int]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def ask() -> None:
        try:
            while not done.is_set():
                _, _, uploads = index.search(query, 20)
                answers.append(set(uploads[0].tolist()) - {-1})
        except BaseException as error:
            errors.append(error)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        with TEST_RUNTIME.session() as session:
            model = tiny_model(session)
            session.expunge(model)
        summary = milvus_sync.rebuild(
            milvus_env.runtime.engine,
            milvus_env.milvus,
            model,
            milvus_sync.SyncSettings.from_settings(milvus_env.runtime.settings),
        )
        seen_after = len(answers)
        while len(answers) < seen_after + 5 and asker.is_alive():
            time.sleep(0.01)
    finally:
        done.set()
        asker.join()
    assert not errors
    assert summary["replaced"] == old_collection != summary["collection"]
    old, new = set(first), set(second)
    assert answers
    assert all(a <= old or a <= new for a in answers)
    assert any(a <= old for a in answers)
    assert answers[-1] <= new
    with TEST_RUNTIME.session() as session:
        assert session.scalars(select(MilvusSyncState.collection)).all() == [summary["collection"]]


def test_lag_shows_in_metrics_and_readyz(
    clean_db: None,
    milvus_env: MilvusEnv,
    milvus_api: TestClient,
    make_runtime: Callable[..., Runtime],
) -> None:
    assert (
        "no Milvus collection is synced yet"
        in milvus_api.get("/readyz").json()["checks"]["search_index"]
    )
    _corpus(5)
    sync_until_caught_up(milvus_env.loop())
    assert milvus_api.get("/readyz").json()["checks"]["search_index"] == "ok"
    _corpus(3, seed=1)
    with TEST_RUNTIME.session() as session:
        (lag,) = milvus_sync.lags(session)
    assert lag.rows == 3
    assert lag.seconds is not None
    assert lag.seconds >= 0
    metrics = milvus_api.get("/metrics").text
    (line,) = [m for m in metrics.splitlines() if m.startswith("moderation_search_sync_lag_rows{")]
    assert f'collection="{lag.collection}"' in line
    assert line.endswith(" 3.0")
    assert "moderation_search_sync_lag_seconds{" in metrics
    impatient = make_runtime(**milvus_env.changes, milvus_max_lag_s=0.001)
    with TestClient(create_app(impatient)) as client:
        check = client.get("/readyz").json()["checks"]["search_index"]
    assert check.startswith("the Milvus sync is behind")
    assert f"{lag.collection} (" in check


def test_search_runtime_answers_from_milvus(clean_db: None, milvus_env: MilvusEnv) -> None:
    ids = _corpus(30)
    sync_until_caught_up(milvus_env.loop())
    searches = SearchRuntime(milvus_env.runtime, follow=True)
    try:
        results = searches.search(searches.upload_query(ids[4]), 3, service.Filters())
        assert results[0].upload_id == ids[4]
        assert searches.index().describe()["backend"] == "milvus"
    finally:
        searches.close()


def test_the_commands_sync_and_evaluate_on_milvus(clean_db: None, milvus_env: MilvusEnv) -> None:
    """`moderation index sync --once` creates, fills and tunes the collection; `moderation
    index eval` measures it against exact search like the Faiss index; `moderation search`
    answers from it with a filter."""
    ids = _corpus(120)
    with TEST_RUNTIME.session() as session:
        add_hit(session, ids[3], "known-bad")
    runtime = milvus_env.runtime
    synced = json.loads(cli(runtime, "index", "sync", "--once", "--json"))
    (report,) = synced.values()
    assert report["embeddings_checkpoint"] >= max(_embedding_ids())
    assert _index(milvus_env).size == 120
    history = json.loads(cli(runtime, "index", "eval", "--queries", "40", "--json"))
    assert history[0]["index_kind"] == "hnsw"
    assert history[0]["corpus_size"] == 120
    assert history[0]["recall"] >= 0.9
    assert "ef" in history[0]["parameters"]
    # Filtered recall measured at 10% selectivity (12 of 120 rows pass), at the smallest
    # window of nearest rows (0: Milvus's filtered search alone) that meets the target.
    assert history[0]["parameters"]["filtered_recall_10%"] >= 0.95
    assert history[0]["parameters"]["filtered_window"] in range(17)
    assert "filtered_recall_1%" not in history[0]["parameters"]  # one row passes: too few
    found = json.loads(
        cli(runtime, "search", "--upload", str(ids[3]), "--bank", "known-bad", "--json")
    )
    assert [r["upload_id"] for r in found] == [ids[3]]


def test_the_api_runs_the_sync_when_asked(
    clean_db: None,
    milvus_env: MilvusEnv,
    keys: dict[Role, str],
    make_runtime: Callable[..., Runtime],
) -> None:
    """MODERATION_MILVUS_SYNC_IN_API: the API process keeps the collection current itself;
    an upload committed while it runs becomes searchable without `moderation index sync`."""
    runtime = make_runtime(
        **milvus_env.changes, milvus_sync_in_api=True, milvus_sync_interval_s=0.2
    )
    _corpus(20)
    analyst = bearer(keys[Role.ANALYST])
    with TestClient(create_app(runtime)) as client:
        (late,) = _corpus(1, seed=4)
        deadline = time.monotonic() + 60
        while True:
            response = client.get("/v1/search", params={"upload_id": late, "k": 1}, headers=analyst)
            if response.status_code == 200 and response.json()["results"]:
                break
            assert time.monotonic() < deadline, response.text
            time.sleep(0.2)
    assert response.json()["results"][0]["upload_id"] == late
    assert response.json()["index_size"] == 21
