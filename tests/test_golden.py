"""The golden set and the runs measured on it, over real PostgreSQL and the real index and
search service: built from review and from analysts, per modality, stored, compared and
watched for falls; planted corpora whose figures are known before the search runs."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from moderation.audit.models import AuditEvent
from moderation.auth.models import Role
from moderation.banks import service as banks
from moderation.banks.models import BankEntry
from moderation.embedding.families import open_embedder
from moderation.embedding.models import EmbeddingModel
from moderation.evaluation import golden, runner, service, tasks
from moderation.evaluation.models import EvaluationRun, GoldenQuery, GoldenRelevant, Modality
from moderation.images.signals import SignalType
from moderation.main import metrics as _metrics  # registers the /metrics collector
from moderation.main.cli import main
from moderation.review import service as review
from moderation.review.models import Hit, ReviewStatus
from moderation.runtime import Runtime
from moderation.search.rerank import Candidate, ExactReranker, SearchQuery
from moderation.worker.sweeper import CHORES
from tests.api_fixtures import api, bearer, keys
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS, TINY_MODEL_DIR
from tests.search_fixtures import add_upload, index_dir, search_runtime, tiny_model, unit
from tests.vectors import at_cosine_distance

__all__ = ["_metrics", "api", "index_dir", "keys", "search_runtime"]

K = 5


def _cli(runtime: Runtime, *args: str) -> str:
    result = CliRunner().invoke(main, list(args), obj=runtime, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _entry(session: Session, bank: str, model: EmbeddingModel, vector: np.ndarray) -> int:
    try:
        found = banks.get_bank(session, bank)
    except banks.BankNotFound:
        found = banks.create_bank(session, bank)
    (entry,) = banks.add_entries(
        session,
        found,
        [banks.NewEntry(embedding=vector, model=model, source_ref=f"vault://{uuid.uuid4()}")],
        added_by="test",
    )
    return entry.id


def _hit(session: Session, upload_id: int, entry_id: int) -> int:
    hit = Hit(upload_id=upload_id, bank_entry_id=entry_id, signal=SignalType.CLIP, distance=0.01)
    session.add(hit)
    session.flush()
    return hit.id


def _pairs(session: Session) -> set[tuple[int | None, int, str]]:
    return {
        (query.bank_entry_id, relevant.upload_id, relevant.origin.value)
        for query, relevant in session.execute(
            select(GoldenQuery, GoldenRelevant).join(
                GoldenRelevant, GoldenRelevant.query_id == GoldenQuery.id
            )
        )
    }


def test_confirmed_hits_become_golden_queries_and_follow_the_decisions(session: Session) -> None:
    rng = np.random.default_rng(1)
    model = tiny_model(session)
    vectors = unit(rng, 3)
    uploads = [add_upload(session, model, [v]) for v in vectors]
    entries = [_entry(session, "csam", model, v) for v in vectors]
    confirmed = _hit(session, uploads[0], entries[0])
    dismissed = _hit(session, uploads[1], entries[1])
    _hit(session, uploads[2], entries[2])  # still pending
    review.decide(session, TEST_SETTINGS, confirmed, "confirm", None, "reviewer")
    review.decide(session, TEST_SETTINGS, dismissed, "dismiss", None, "reviewer")

    done = golden.sync_from_review(session)

    assert (done.queries_added, done.pairs_added, done.pairs_removed) == (1, 1, 0)
    assert _pairs(session) == {(entries[0], uploads[0], "review")}
    (query,) = session.scalars(select(GoldenQuery))
    assert (query.modality, query.origin.value) == (Modality.IMAGE, "review")
    # Again: nothing new. An analyst's pair on the same query survives what review undoes.
    assert golden.sync_from_review(session) == golden.ReviewSync(0, 0, 0)
    session.add(
        GoldenRelevant(
            query_id=query.id, upload_id=uploads[2], origin="analyst", added_by="analyst"
        )
    )
    # A decision reversed (by SQL: the queue has no undo) takes its pair out of the set.
    session.execute(
        update(Hit).where(Hit.id == confirmed).values(review_status=ReviewStatus.DISMISSED)
    )
    assert golden.sync_from_review(session) == golden.ReviewSync(0, 0, 1)
    assert _pairs(session) == {(entries[0], uploads[2], "analyst")}


def test_analysts_add_golden_queries_by_command_and_api(
    api: TestClient, keys: dict[Role, str]
) -> None:
    rng = np.random.default_rng(2)
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        uploads = [add_upload(session, model, [v]) for v in unit(rng, 4)]
        # The audit log is append-only: clean_db keeps other tests' rows.
        audited_before = session.scalar(select(func.coalesce(func.max(AuditEvent.id), 0)))

    _cli(TEST_RUNTIME, "golden", "add", "--text", "red car", "--relevant", str(uploads[0]))
    # The same text again adds to its relevant uploads rather than making a second query.
    _cli(
        TEST_RUNTIME,
        *("golden", "add", "--text", "red car", "--relevant", str(uploads[1]), "--note", "both"),
    )
    response = api.post(
        "/v1/golden",
        json={"upload_id": uploads[2], "relevant": [uploads[3]]},
        headers=bearer(keys[Role.ANALYST]),
    )
    assert response.status_code == 201, response.text
    assert response.json()["modality"] == "image"
    # Reviewers judge hits; the golden set is the analysts' (and admins').
    refused = api.post(
        "/v1/golden",
        json={"text": "blue boat", "relevant": [uploads[0]]},
        headers=bearer(keys[Role.REVIEWER]),
    )
    assert refused.status_code == 403
    missing = api.post(
        "/v1/golden",
        json={"text": "blue boat", "relevant": [10**12]},
        headers=bearer(keys[Role.ADMIN]),
    )
    assert (missing.status_code, missing.json()["code"]) == (404, "golden_upload_not_found")
    both = api.post(
        "/v1/golden",
        json={"text": "x", "upload_id": uploads[0], "relevant": [uploads[1]]},
        headers=bearer(keys[Role.ADMIN]),
    )
    assert (both.status_code, both.json()["code"]) == (422, "bad_golden_query")

    listed = api.get("/v1/golden", headers=bearer(keys[Role.ANALYST])).json()
    assert [(q["modality"], q["subject"], q["relevant"], q["origin"]) for q in listed] == [
        ("text", "red car", [uploads[0], uploads[1]], "analyst"),
        ("image", f"upload {uploads[2]}", [uploads[3]], "analyst"),
    ]
    assert (
        json.loads(_cli(TEST_RUNTIME, "golden", "list", "--modality", "text", "--json"))[0]["note"]
        == "both"
    )

    image_query = listed[1]["id"]
    removed = api.delete(f"/v1/golden/{image_query}", headers=bearer(keys[Role.ANALYST]))
    assert removed.status_code == 204
    again = api.delete(f"/v1/golden/{image_query}", headers=bearer(keys[Role.ANALYST]))
    assert (again.status_code, again.json()["code"]) == (404, "golden_query_not_found")
    _cli(TEST_RUNTIME, "golden", "remove", str(listed[0]["id"]))
    assert _cli(TEST_RUNTIME, "golden", "list").strip() == "no golden queries"
    with TEST_RUNTIME.session() as session:
        actions = session.scalars(
            select(AuditEvent.action)
            .where(AuditEvent.subject_type == "golden_query", AuditEvent.id > audited_before)
            .order_by(AuditEvent.id)
        ).all()
    assert actions == ["golden.add", "golden.add", "golden.add", "golden.remove", "golden.remove"]


def test_a_run_from_the_command_is_listed_for_analysts(
    api: TestClient, keys: dict[Role, str], search_runtime: Runtime
) -> None:
    _planted_corpus()
    out = _cli(search_runtime, "eval", "run", "-k", str(K))
    assert out.splitlines()[1].split() == [
        "MODALITY",
        "QUERIES",
        "SKIPPED",
        "RECALL",
        "PRECISION",
        "MRR",
    ]
    runs = api.get("/v1/eval/runs", headers=bearer(keys[Role.ANALYST])).json()
    (run,) = runs
    assert (run["reranker"], run["k"], run["trigger"]) == ("exact", K, "cli")
    assert run["figures"]["text"]["recall"] == pytest.approx(_expected(TEXT_PLANS, K)["recall"])
    assert run["figures"]["image"]["mrr"] == pytest.approx(_expected(IMAGE_PLANS, K)["mrr"])
    assert api.get("/v1/eval/runs", headers=bearer(keys[Role.REVIEWER])).status_code == 403


# A planted corpus: each query has relevant uploads placed at chosen ranks among planted
# distractors, over a random background far from every query.


@dataclass(frozen=True)
class Planted:
    """One query's planted neighbourhood: ranks (1-based, among all uploads) of its
    relevant uploads, within `depth` planted neighbours; the rest of them are distractors."""

    relevant_ranks: tuple[int, ...]
    # Relevant uploads placed far below every planted neighbour (never in the top k).
    relevant_far: int = 0
    depth: int = 12


def _plant(
    session: Session,
    model: EmbeddingModel,
    anchor: np.ndarray,
    plan: Planted,
    seed: int,
) -> list[int]:
    """Uploads around `anchor` as planned; the relevant ones' ids."""
    relevant = []
    for rank in range(1, plan.depth + 1):
        # Distances 0.002, 0.004, ...: rank r is the r-th nearest upload.
        vector = at_cosine_distance(anchor, 0.002 * rank, seed=seed * 1000 + rank)
        upload_id = add_upload(session, model, [vector])
        if rank in plan.relevant_ranks:
            relevant.append(upload_id)
    for far in range(plan.relevant_far):
        vector = at_cosine_distance(anchor, 0.6, seed=seed * 1000 + 500 + far)
        relevant.append(add_upload(session, model, [vector]))
    return relevant


def _expected(plans: Sequence[Planted], k: int) -> dict[str, float]:
    """The figures the plan implies, from the ranks alone."""
    recalls, precisions, reciprocal = [], [], []
    for plan in plans:
        found = sorted(r for r in plan.relevant_ranks if r <= k)
        total = len(plan.relevant_ranks) + plan.relevant_far
        recalls.append(len(found) / total)
        precisions.append(len(found) / k)
        reciprocal.append(1 / found[0] if found else 0.0)
    return {
        "recall": float(np.mean(recalls)),
        "precision": float(np.mean(precisions)),
        "mrr": float(np.mean(reciprocal)),
    }


TEXT_PLANS = (Planted((1, 2)), Planted((3,), relevant_far=1), Planted((7, 8)))
IMAGE_PLANS = (Planted((1,), relevant_far=2), Planted((2, 4, 5)), Planted((6,)))


def _text_vector(text: str) -> np.ndarray:
    vector: np.ndarray = open_embedder(str(TINY_MODEL_DIR), "cpu").embed_texts([text])[0]
    return vector


# The tiny CLIP's random text tower puts similar strings at nearly the same vector; the
# queries are the first of these that lie apart (similarity below 0.6 to each other), so
# that one query's planted neighbours are never near another's.
CANDIDATE_TEXTS = (
    "red sports car",
    "zebra",
    "a bowl of soup at night",
    "mountain lake",
    "1984",
    "QQQ!",
    "the cat sat on the mat",
    "x",
    "harbour at dawn, fishing boats",
    "@@@ ### $$$",
    "0",
    "!!!",
)


def _apart(vectors: Sequence[np.ndarray], candidate: np.ndarray) -> bool:
    return all(float(candidate @ v) < 0.6 for v in vectors)


def _query_texts(count: int) -> list[str]:
    chosen: list[str] = []
    vectors: list[np.ndarray] = []
    for text in CANDIDATE_TEXTS:
        vector = _text_vector(text)
        if _apart(vectors, vector):
            chosen.append(text)
            vectors.append(vector)
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"fewer than {count} candidate texts lie apart under the tiny CLIP")


def _planted_corpus(seed: int = 0) -> None:
    """Text queries (their vectors from the tiny CLIP's text tower), image queries by
    upload and by bank entry, each with its plan; a random background of 150 uploads
    pushed away from every query."""
    rng = np.random.default_rng(seed)
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        anchors = []
        for number, (text, plan) in enumerate(zip(_query_texts(3), TEXT_PLANS, strict=True)):
            anchor = _text_vector(text)
            anchors.append(anchor)
            relevant = _plant(session, model, anchor, plan, seed=number)
            golden.add_query(session, golden.QuerySubject(text=text), relevant, actor="test")
        for number, plan in enumerate(IMAGE_PLANS, start=len(TEXT_PLANS)):
            anchor = unit(rng)[0]
            while not _apart(anchors, anchor):
                anchor = unit(rng)[0]
            anchors.append(anchor)
            relevant = _plant(session, model, anchor, plan, seed=number)
            if number % 2:  # an upload as the query: itself left out of its results
                query_upload = add_upload(session, model, [anchor])
                golden.add_query(
                    session, golden.QuerySubject(upload_id=query_upload), relevant, actor="test"
                )
            else:  # a bank entry, as review makes it: its hits confirmed
                entry_id = _entry(session, "planted", model, anchor)
                for upload_id in relevant:
                    review.decide(
                        session,
                        TEST_SETTINGS,
                        _hit(session, upload_id, entry_id),
                        "confirm",
                        None,
                        "r",
                    )
        background = unit(rng, 150)
        # Each background vector at most 0.3 similar to every query: far below the plants.
        stacked = np.stack(anchors)
        background = background[np.max(background @ stacked.T, axis=1) < 0.3]
        for vector in background:
            add_upload(session, model, [vector])


def _figures(view: service.RunView, modality: Modality) -> dict[str, float]:
    figures = view.figures[modality.value]
    return {m: figures[m] for m in ("recall", "precision", "mrr")}


def test_a_planted_corpus_gives_the_figures_its_plan_implies_per_modality(
    clean_db: None, search_runtime: Runtime
) -> None:
    _planted_corpus()
    view = runner.evaluate(search_runtime, k=K)

    assert view.k == K
    assert view.reranker == "exact"
    for modality, plans in ((Modality.TEXT, TEXT_PLANS), (Modality.IMAGE, IMAGE_PLANS)):
        expected = _expected(plans, K)
        assert _figures(view, modality) == pytest.approx(expected, abs=1e-9), modality
        assert (
            view.figures[modality.value]["queries"],
            view.figures[modality.value]["skipped"],
        ) == (
            3,
            0,
        )
    # The two modalities differ by construction: mixing them would hide both.
    assert _figures(view, Modality.TEXT) != _figures(view, Modality.IMAGE)
    with TEST_RUNTIME.session() as session:
        stored = session.scalars(select(EvaluationRun)).one()
        assert stored.corpus_size == view.corpus_size > 150
        assert not stored.regressed
        assert stored.drops == {}


class ReversedReranker:
    """The exact order, upside down: a reranker that gets everything wrong."""

    def rerank(self, query: SearchQuery, candidates: Sequence[Candidate]) -> list[Candidate]:
        return ExactReranker().rerank(query, candidates)[::-1]


def test_a_reranker_that_reverses_the_order_shows_up_as_worse(
    clean_db: None, search_runtime: Runtime
) -> None:
    _planted_corpus()
    exact = runner.evaluate(search_runtime, k=K)
    reversed_ = runner.evaluate(
        search_runtime, k=K, reranker="reversed", custom_reranker=ReversedReranker()
    )

    compared = service.compare(exact, reversed_)
    assert {(row.modality, row.measure) for row in compared} == {
        (modality.value, measure)
        for modality in Modality
        for measure in ("recall", "precision", "mrr")
    }
    for row in compared:
        assert row.b < row.a, row
    # Stored side by side, each under its reranker.
    with TEST_RUNTIME.session() as session:
        assert [v.reranker for v in service.history(session)] == ["exact", "reversed"]


def test_a_fall_in_recall_as_the_corpus_grows_is_warned_and_exported(
    clean_db: None,
    search_runtime: Runtime,
    caplog: pytest.LogCaptureFixture,
    api: TestClient,
    keys: dict[Role, str],
) -> None:
    _planted_corpus()
    first = runner.evaluate(search_runtime, k=K)
    # The corpus grows denser around the text queries: uploads nearer to each than any of
    # its relevant ones push those out of the top k.
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        for text in _query_texts(len(TEXT_PLANS)):
            anchor = _text_vector(text)
            for closer in range(K):
                add_upload(session, model, [at_cosine_distance(anchor, 0.001, seed=closer)])

    with caplog.at_level(logging.WARNING, logger="moderation.evaluation.service"):
        second = runner.evaluate(search_runtime, k=K)

    text_fall = first.figures["text"]["recall"] - second.figures["text"]["recall"]
    assert second.figures["text"]["recall"] == 0.0
    assert text_fall > search_runtime.settings.eval_drop_margin
    assert second.regressed
    assert second.drops == {"text": pytest.approx(text_fall), "image": 0.0}
    assert second.corpus_size == first.corpus_size + K * len(TEXT_PLANS)
    assert "fell beyond the margin" in caplog.text
    assert "text -" in caplog.text
    scraped = api.get("/metrics").text
    assert f'moderation_eval_regressed{{model="{TINY_MODEL_DIR}",reranker="exact"}} 1.0' in scraped
    labels = f'k="5",modality="text",model="{TINY_MODEL_DIR}",reranker="exact"'
    assert f"moderation_eval_recall{{{labels}}} 0.0" in scraped

    # History: recall by date and corpus size, the fall marked.
    out = _cli(search_runtime, "eval", "history")
    lines = out.splitlines()
    assert "CORPUS" in lines[0]
    assert "TEXT R@5" in lines[0]
    assert "IMAGE R@5" in lines[0]
    assert str(first.corpus_size) in lines[1]
    assert "yes" not in lines[1]
    assert str(second.corpus_size) in lines[2]
    assert lines[2].rstrip().endswith("yes")

    # The analysts' page draws the same: a point per run and modality, the fall marked.
    page = api.get("/search/quality", headers=bearer(keys[Role.ANALYST]))
    assert page.status_code == 200
    points = re.findall(
        r'<circle class="run( regressed)?" [^>]*data-run="(\d+)" data-modality="(\w+)" '
        r'data-recall="([\d.]+)"',
        page.text,
    )
    drawn = {
        (int(run), modality): (bool(fell), float(recall)) for fell, run, modality, recall in points
    }
    assert drawn[(first.id, "text")][0] is False
    assert drawn[(first.id, "text")][1] == pytest.approx(first.figures["text"]["recall"], abs=1e-4)
    assert drawn[(second.id, "text")] == (True, 0.0)
    assert drawn[(second.id, "image")][0] is True
    assert len(drawn) == 4
    assert api.get("/search/quality", headers=bearer(keys[Role.SUBMITTER])).status_code == 403


def test_scheduled_runs_are_off_by_default_then_run_once_per_interval(
    clean_db: None, index_dir: Path, make_runtime: Callable[..., Runtime]
) -> None:
    assert any(chore.run is tasks.CHORES[0].run for chore in CHORES)
    _planted_corpus()
    search = {"index_dir": index_dir, "search_commit_lag_s": 0.2, "search_tail_interval_s": 0.2}
    assert tasks.run_if_due(make_runtime(**search)) == {}
    runtime = make_runtime(**search, eval_interval_s=3600)

    done = tasks.run_if_due(runtime)
    assert done["golden_regressed"] is False
    assert tasks.run_if_due(runtime) == {}  # not due again for an hour
    with TEST_RUNTIME.session() as session:
        (run,) = session.scalars(select(EvaluationRun))
        assert (run.id, run.trigger) == (done["golden_run"], "schedule")
        # Due again once the interval has passed since it.
        session.execute(
            update(EvaluationRun).values(created_at=EvaluationRun.created_at - timedelta(hours=2))
        )
    assert set(tasks.run_if_due(runtime)) == {"golden_run", "golden_regressed"}


def test_unaskable_queries_are_skipped_not_failed(clean_db: None, search_runtime: Runtime) -> None:
    """An example image gone, a bank entry with no embedding under the model, a query with
    nothing relevant in the corpus: counted as skipped, the others measured."""
    rng = np.random.default_rng(5)
    with TEST_RUNTIME.session() as session:
        model = tiny_model(session)
        uploads = [add_upload(session, model, [v]) for v in unit(rng, 20)]
        golden.add_query(
            session,
            golden.QuerySubject(image_uri="file:///nonexistent/gone.jpg"),
            [uploads[0]],
            actor="test",
        )
        bank = banks.create_bank(session, "hashes only")
        (entry,) = banks.add_entries(
            session, bank, [banks.NewEntry(sha256=uuid.uuid4().bytes * 2)], added_by="test"
        )
        # Confirmed, but the entry is hashes only: no embedding to search with.
        review.decide(
            session, TEST_SETTINGS, _hit(session, uploads[1], entry.id), "confirm", None, "r"
        )
        golden.add_query(
            session, golden.QuerySubject(upload_id=uploads[2]), [uploads[3]], actor="test"
        )
        assert session.get(BankEntry, entry.id) is not None

    view = runner.evaluate(search_runtime, k=K)
    assert view.figures["image"]["queries"] == 1
    assert view.figures["image"]["skipped"] == 2
    assert view.figures["text"]["queries"] == 0
