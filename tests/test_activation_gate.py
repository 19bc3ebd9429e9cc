"""`moderation model activate` judges the candidate on the golden set against the active
model first: both measured now and shown side by side, and with --require-no-regression a
candidate whose recall falls is refused, the active model left as it was."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select, update

from moderation.embedding.models import Embedding, EmbeddingModel, ModelState
from moderation.embedding.service import get_or_create_model, vector_to_bytes
from moderation.evaluation import golden
from moderation.evaluation.golden import QuerySubject
from moderation.main.cli import main
from moderation.runtime import Runtime
from tests.conftest import TEST_RUNTIME
from tests.search_fixtures import DIM, add_upload, search_runtime, tiny_model, unit
from tests.vectors import at_cosine_distance

__all__ = ["search_runtime"]

CANDIDATE = "gate-candidate-model"


@pytest.fixture
def registry_states() -> Iterator[None]:
    """The registry's states as they were before the test, restored after it (other tests
    of this process keep the model they had active)."""
    with TEST_RUNTIME.session() as session:
        before = {name: state for name, state in session.execute(
            select(EmbeddingModel.name, EmbeddingModel.state))}  # fmt: skip
    yield
    with TEST_RUNTIME.session() as session:
        session.execute(update(EmbeddingModel).values(state=ModelState.RETIRED))
        session.flush()
        for name, state in before.items():
            named = EmbeddingModel.name == name
            session.execute(update(EmbeddingModel).where(named).values(state=state))


def _corpus(*, candidate_finds_it: bool) -> None:
    """One golden query (an upload) whose relevant upload is its nearest neighbour under
    the active model; under the candidate, nearest too, or pushed below twelve others."""
    rng = np.random.default_rng(4)
    with TEST_RUNTIME.session() as session:
        active = tiny_model(session)
        candidate = get_or_create_model(session, CANDIDATE, DIM)
        session.execute(update(EmbeddingModel).values(state=ModelState.RETIRED))
        session.flush()
        session.execute(
            update(EmbeddingModel).where(EmbeddingModel.id == active.id)
            .values(state=ModelState.ACTIVE)
        )  # fmt: skip
        session.execute(
            update(EmbeddingModel).where(EmbeddingModel.id == candidate.id)
            .values(state=ModelState.CANDIDATE)
        )  # fmt: skip
        anchor = unit(rng)[0]

        def upload(under_active: np.ndarray, under_candidate: np.ndarray) -> int:
            upload_id = add_upload(session, active, [under_active])
            session.add(
                Embedding(
                    upload_id=upload_id,
                    model_id=candidate.id,
                    vector=vector_to_bytes(under_candidate),
                )
            )
            return upload_id

        query = upload(anchor, anchor)
        near = at_cosine_distance(anchor, 0.002, seed=1)
        relevant = upload(
            near, near if candidate_finds_it else at_cosine_distance(anchor, 0.8, seed=2)
        )
        for n in range(12):  # distractors: beyond the relevant one under the active model
            upload(at_cosine_distance(anchor, 0.3, seed=10 + n),
                   at_cosine_distance(anchor, 0.01 + 0.002 * n, seed=30 + n))  # fmt: skip
        for vector in unit(rng, 30):
            upload(vector, vector)
        session.flush()
        golden.add_query(session, QuerySubject(upload_id=query), [relevant], actor="test")


def _activate(runtime: Runtime, *options: str) -> Result:
    return CliRunner().invoke(main, ["model", "activate", CANDIDATE, *options], obj=runtime)


def _recall_row(result: Result) -> list[str]:
    """The comparison table's image recall row: active, candidate, change."""
    (row,) = [line.split() for line in result.output.splitlines() if line.startswith("image")
              and line.split()[1] == "recall"]  # fmt: skip
    return row[2:]


def _active() -> str:
    with TEST_RUNTIME.session() as session:
        name = session.scalar(
            select(EmbeddingModel.name).where(EmbeddingModel.state == ModelState.ACTIVE)
        )
    assert name is not None
    return name


def test_a_worse_candidate_is_refused_with_the_comparison(
    clean_db: None, search_runtime: Runtime, registry_states: None
) -> None:
    _corpus(candidate_finds_it=False)
    active = _active()

    refused = _activate(search_runtime, "--require-no-regression")

    assert refused.exit_code == 1, refused.output
    assert (
        "not activated: the candidate is worse on the golden set (image recall 1.0000 -> 0.0000)"
        in refused.output
    )
    assert _recall_row(refused) == ["1.0000", "0.0000", "-1.0000"]
    assert _active() == active

    # Without the flag the comparison is shown, and the operator's choice stands.
    chosen = _activate(search_runtime)
    assert chosen.exit_code == 0, chosen.output
    assert _recall_row(chosen) == ["1.0000", "0.0000", "-1.0000"]
    assert _active() == CANDIDATE


def test_a_candidate_as_good_passes_the_check(
    clean_db: None, search_runtime: Runtime, registry_states: None
) -> None:
    _corpus(candidate_finds_it=True)

    activated = _activate(search_runtime, "--require-no-regression")

    assert activated.exit_code == 0, activated.output
    assert _recall_row(activated) == ["1.0000", "1.0000", "0.0000"]
    assert _active() == CANDIDATE


def test_eval_compare_names_two_models_or_two_rerankers_directly(
    clean_db: None, search_runtime: Runtime, registry_states: None
) -> None:
    _corpus(candidate_finds_it=False)
    active = _active()

    models = CliRunner().invoke(
        main, ["eval", "compare", active, CANDIDATE, "--json"], obj=search_runtime
    )
    assert models.exit_code == 0, models.output
    compared = json.loads(models.stdout)
    assert (compared["a"]["model"], compared["b"]["model"]) == (active, CANDIDATE)
    assert compared["a"]["figures"]["image"]["recall"] == 1.0
    assert compared["b"]["figures"]["image"]["recall"] == 0.0

    rerankers = CliRunner().invoke(
        main, ["eval", "compare", "exact", "exact", "--json"], obj=search_runtime
    )
    assert rerankers.exit_code == 0, rerankers.output
    both = json.loads(rerankers.stdout)
    assert (both["a"]["reranker"], both["b"]["reranker"]) == ("exact", "exact")
    assert both["a"]["model"] == both["b"]["model"] == active

    mixed = CliRunner().invoke(
        main, ["eval", "compare", active, "--model", CANDIDATE], obj=search_runtime
    )
    assert mixed.exit_code == 2
