"""A model change end to end, with real PostgreSQL, Redis and worker processes: banks and
uploads under the tiny CLIP; the tiny SigLIP added as a candidate, computed beside it;
re-embedded in the background with the worker killed mid-job and resumed; activated;
search and matching under SigLIP, while entries that only CLIP has embedded keep
matching under CLIP until CLIP is retired (by force)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, text, update

from moderation.banks.models import BankEntryEmbedding
from moderation.embedding.models import Embedding, EmbeddingModel, ModelState
from moderation.lifecycle.models import ReembedFailure, ReembedJob
from moderation.main.cli import main
from moderation.review.models import Hit
from moderation.runtime import Runtime
from moderation.screening.cli import submit_uris, wait_until_final
from moderation.screening.models import Upload, UploadStatus
from moderation.search import service as search_service
from moderation.search.runtime import SearchRuntime
from moderation.worker.child import WorkerProcess, process_tree
from tests.conftest import TEST_ENV, TEST_RUNTIME, TINY_MODEL_DIR
from tests.images import encode, textured, write

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("clean_db")]

T = TypeVar("T")

# The worker follows the registry quickly, re-embeds in small steps (so that it can be
# killed mid-job), and its sweeper sends a job on soon after its worker died.
WORKER_ENV = {
    **TEST_ENV,
    "MODERATION_MODEL_POLL_S": "0.5",
    "MODERATION_REEMBED_BLOCK": "2",
    "MODERATION_REEMBED_DUTY": "0.25",
    "MODERATION_REEMBED_SETTLE_S": "1",
    "MODERATION_REEMBED_STALLED_AFTER_S": "3",
    "MODERATION_SWEEP_INTERVAL_S": "1",
    "MODERATION_INTAKE_PROCESSES": "1",
}


def cli(*args: str, exit_code: int = 0) -> Any:
    result = CliRunner().invoke(main, list(args), obj=TEST_RUNTIME, catch_exceptions=False)
    assert result.exit_code == exit_code, result.output
    return json.loads(result.output) if "--json" in args and exit_code == 0 else result.output


def wait_for(condition: Callable[[], T | None], what: str, timeout_s: float = 60) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s:g} s: {what}")


def screen(*paths: Path) -> list[Upload]:
    uploads = wait_until_final(
        TEST_RUNTIME, submit_uris(TEST_RUNTIME, [p.as_uri() for p in paths]), timeout_s=120
    )
    assert [u.status for u in uploads] == [UploadStatus.SCREENED] * len(paths)
    return uploads


def model_id(name: Path | str) -> int:
    with TEST_RUNTIME.session() as session:
        found = session.scalar(select(EmbeddingModel.id).where(EmbeddingModel.name == str(name)))
    assert found is not None, name
    return found


def embedding_rows(upload_id: int) -> dict[int, int]:
    """Rows per model id."""
    with TEST_RUNTIME.session() as session:
        rows = session.execute(
            select(Embedding.model_id, func.count())
            .where(Embedding.upload_id == upload_id)
            .group_by(Embedding.model_id)
        )
        return {model: n for model, n in rows}


def clip_hits(upload_id: int) -> list[tuple[int, int | None]]:
    """(entry, model) of the upload's CLIP hits."""
    with TEST_RUNTIME.session() as session:
        rows = session.execute(
            select(Hit.bank_entry_id, Hit.model_id).where(
                Hit.upload_id == upload_id, Hit.signal == "clip"
            )
        )
        return sorted((entry, model) for entry, model in rows)


def reset_registry() -> None:
    """The tiny CLIP active and every other model retired: the state other tests (and
    the shared worker) expect."""
    with TEST_RUNTIME.engine.begin() as conn:
        conn.execute(
            update(EmbeddingModel)
            .where(EmbeddingModel.name != str(TINY_MODEL_DIR))
            .values(state=ModelState.RETIRED.value)
        )
        conn.execute(
            update(EmbeddingModel)
            .where(EmbeddingModel.name == str(TINY_MODEL_DIR))
            .values(state=ModelState.ACTIVE.value)
        )


@pytest.fixture
def registry_restored() -> Iterator[None]:
    reset_registry()
    yield
    reset_registry()


def job_row(job_id: int) -> ReembedJob:
    with TEST_RUNTIME.session() as session:
        job = session.get_one(ReembedJob, job_id)
        session.expunge(job)
        return job


@pytest.mark.usefixtures("registry_restored")
def test_a_model_change_end_to_end(
    tmp_path: Path, tiny_siglip: Path, make_runtime: Callable[..., Runtime]
) -> None:
    images = tmp_path / "images"
    banked = write(images / "banked.jpg", encode(textured(500), quality=95))
    sourceless = write(images / "sourceless.jpg", encode(textured(501), quality=95))
    corpus = [write(images / f"u{i}.jpg", encode(textured(600 + i))) for i in range(6)]
    changed = write(images / "changed.jpg", encode(textured(700)))
    gone = write(images / "gone.jpg", encode(textured(701)))

    log = tmp_path / "worker-1.log"
    first = WorkerProcess(log, WORKER_ENV)
    try:
        first.wait_ready()
        clip = model_id(TINY_MODEL_DIR)

        # A bank under CLIP: one entry from an image (its source kept for re-embedding),
        # one from a shared embedding with no source, which only CLIP will ever have.
        cli("bank", "create", "known-bad")
        (with_source,) = cli("bank", "add", "known-bad", str(banked), "--json")
        cli("embed", str(sourceless), "--out", str(tmp_path / "sourceless.npy"))
        (no_source,) = cli(
            "bank", "add", "known-bad", "--embedding", str(tmp_path / "sourceless.npy"), "--json"
        )
        before = screen(*corpus, changed, gone)
        assert all(embedding_rows(u.id) == {clip: 1} for u in before)

        # SigLIP as a candidate: the worker computes it too from its next poll.
        added = cli("model", "add", str(tiny_siglip))
        assert "registered" in added
        assert "candidate" in added
        siglip = model_id(tiny_siglip)
        copy_of_sourceless = write(images / "sourceless-copy.png", encode(textured(501), "PNG"))
        (during,) = wait_for(
            lambda: [u for u in screen(copy_of_sourceless) if siglip in embedding_rows(u.id)],
            "a new upload embedded under both models",
            timeout_s=120,
        )
        assert embedding_rows(during.id) == {clip: 1, siglip: 1}
        # The entry without a source keeps matching, under CLIP.
        assert clip_hits(during.id) == [(no_source["id"], clip)]

        # Content behind two URIs changes after screening: recorded, not embedded.
        write(changed, encode(textured(999)))
        gone.unlink()

        started = cli("reembed", "--model", str(tiny_siglip))
        job_id = int(started.split()[-1])
        wait_for(
            lambda: (job := job_row(job_id)).uploads_done >= 2 and job.status.value == "uploads",
            "the re-embedding under way",
        )
    finally:
        # SIGKILL, mid-job: the worker, its forkserver and intake processes at once.
        for pid in process_tree(first.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        first.process.wait()
        first.stop()
    killed_at = job_row(job_id)
    assert killed_at.status.value != "done"

    with WorkerProcess(tmp_path / "worker-2.log", WORKER_ENV) as second:
        second.wait_ready()
        wait_for(
            lambda: job_row(job_id).status.value == "done",
            "the re-embedding resumed and finished",
            timeout_s=120,
        )
        done = job_row(job_id)
        assert done.uploads_done == done.uploads_total
        assert done.failures == {"content_mismatch": 1, "not_found": 1}

        # Every screened upload embedded under SigLIP exactly once, but the two whose
        # content changed or went; the entry with a source too, the other not.
        screened = [*before, during]
        with TEST_RUNTIME.session() as session:
            failed = dict(
                session.execute(
                    select(ReembedFailure.upload_id, ReembedFailure.reason).where(
                        ReembedFailure.job_id == job_id
                    )
                ).all()
            )
            entry_models = sorted(
                session.execute(
                    select(BankEntryEmbedding.bank_entry_id, BankEntryEmbedding.model_id)
                ).all()
            )
        by_uri = {u.uri: u.id for u in screened}
        assert failed == {
            by_uri[changed.as_uri()]: "content_mismatch",
            by_uri[gone.as_uri()]: "not_found",
        }
        for upload in screened:
            expected = {clip: 1} if upload.id in failed else {clip: 1, siglip: 1}
            assert embedding_rows(upload.id) == expected, upload.uri
        assert entry_models == sorted(
            [(with_source["id"], clip), (with_source["id"], siglip), (no_source["id"], clip)]
        )
        shown = cli("reembed", "show", str(job_id), "--json")
        assert shown["done"] == shown["total"]
        assert len(shown["failed_items"]) == 2

        # Activate: within the poll interval, new copies hit under SigLIP, and the entry
        # only CLIP has still hits under CLIP (CLIP is now a candidate, still computed).
        cli("model", "activate", str(tiny_siglip))
        copy_of_banked = write(images / "banked-copy.png", encode(textured(500), "PNG"))
        (after,) = wait_for(
            lambda: [u for u in screen(copy_of_banked) if clip_hits(u.id)[0][1] == siglip],
            "a copy of a banked image hit under SigLIP",
            timeout_s=120,  # the switch takes model_poll_s; the time is bench/reembed.py's
        )
        assert clip_hits(after.id) == [(with_source["id"], siglip)]
        (still,) = screen(write(images / "sourceless-copy2.png", encode(textured(501), "PNG")))
        assert clip_hits(still.id) == [(no_source["id"], clip)]

        # Search answers under SigLIP; a query is never searched in another model's index.
        searching = make_runtime(index_dir=tmp_path / "index")
        searches = SearchRuntime(searching, follow=False)
        query = searches.upload_query(after.id)
        assert (searches.model_name, query.model_id) == (str(tiny_siglip), siglip)
        results = searches.search(query, 3, search_service.Filters())
        # (The copy may have been screened more than once while waiting for the switch.)
        assert results[0].uri == copy_of_banked.as_uri()
        assert results[0].score == pytest.approx(1.0, abs=1e-5)
        assert searches.index(query.model_id).model_id == siglip
        # The old model still answers when asked for by name.
        old = SearchRuntime(searching, follow=False, model=str(TINY_MODEL_DIR))
        assert old.upload_query(before[0].id).model_id == clip

        # Retiring CLIP would leave the sourceless entry unmatched: refused, then forced.
        refused = cli("model", "retire", str(TINY_MODEL_DIR), exit_code=1)
        assert "known-bad: 1" in refused
        assert "--force" in refused
        cli("model", "retire", str(TINY_MODEL_DIR), "--force")
        listed = {m["name"]: m for m in cli("model", "list", "--json")}
        assert listed[str(TINY_MODEL_DIR)]["state"] == "retired"
        assert listed[str(tiny_siglip)]["state"] == "active"


@pytest.mark.usefixtures("registry_restored")
def test_the_same_name_with_other_weights_is_refused(tmp_path: Path, tiny_siglip: Path) -> None:
    from moderation.embedding.tiny import write_tiny_siglip

    checkpoint = write_tiny_siglip(tmp_path / "siglip", seed=1)
    assert "candidate" in cli("model", "add", str(checkpoint))
    write_tiny_siglip(checkpoint, seed=2)  # other weights, the same directory
    refused = cli("model", "add", str(checkpoint), exit_code=1)
    assert "registered with fingerprint" in refused
    assert "name of its own" in refused
    with TEST_RUNTIME.session() as session:
        states = session.execute(
            text("SELECT count(*) FROM embedding_models WHERE state = 'active'")
        )
        assert states.scalar_one() == 1
