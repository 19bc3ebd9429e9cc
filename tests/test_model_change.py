"""A worker pointed at another model is never silently blind to the banks' CLIP entries:
it counts them per bank, warns at start, exports the count, and `bank list` shows CLIP
entries per model."""

from __future__ import annotations

import json
import logging
import socket

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session

from moderation.banks import service as banks
from moderation.banks.models import Bank, BankEntryEmbedding
from moderation.embedding.models import EmbeddingModel
from moderation.embedding.service import get_or_create_model
from moderation.main.cli import main
from moderation.main.cli_errors import explain
from moderation.worker.metrics import MetricsPortInUse, report_unmatchable_clip_entries, serve
from tests.conftest import TEST_RUNTIME, TEST_SETTINGS, WORKER_METRICS_PORT

DIM = 4


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    normalised: np.ndarray = vector / np.linalg.norm(vector)
    return normalised


def add_clip_entry(
    session: Session, bank: Bank, *models: EmbeddingModel, sha256: bytes | None = None
) -> None:
    """One entry embedded by each of `models` (none: a hash-only entry)."""
    (entry,) = banks.add_entries(
        session,
        bank,
        [banks.NewEntry(sha256=sha256, embedding=unit(1), model=models[0])]
        if models
        else [banks.NewEntry(sha256=sha256)],
        added_by="test",
    )
    for model in models[1:]:
        entry.embeddings.append(
            BankEntryEmbedding(model_id=model.id, vector=unit(2).astype("<f4").tobytes())
        )
    session.flush()


def two_models_world(session: Session) -> None:
    """Bank `photos`: 2 entries under the old model only, 1 under both, 1 hash-only.
    Bank `partners`: 1 entry under the new model only. Bank `retired` (disabled): 3 under
    the old model only."""
    old = get_or_create_model(session, "clip-old", DIM)
    new = get_or_create_model(session, "clip-new", DIM)
    photos = banks.create_bank(session, "photos")
    partners = banks.create_bank(session, "partners")
    retired = banks.create_bank(session, "retired")
    retired.enabled = False
    add_clip_entry(session, photos, old)
    add_clip_entry(session, photos, old)
    add_clip_entry(session, photos, old, new)
    add_clip_entry(session, photos, sha256=b"\x02" * 32)
    add_clip_entry(session, partners, new)
    for _ in range(3):
        add_clip_entry(session, retired, old)


def test_unmatchable_entries_are_counted_per_bank_for_each_model(session: Session) -> None:
    two_models_world(session)
    assert banks.unmatchable_clip_entries(session, "clip-new") == {"photos": 2}
    assert banks.unmatchable_clip_entries(session, "clip-old") == {"partners": 1}
    # A model no entry was ever embedded with sees none of them.
    assert banks.unmatchable_clip_entries(session, "clip-next") == {"photos": 3, "partners": 1}


def test_no_clip_entries_means_nothing_unmatchable(session: Session) -> None:
    bank = banks.create_bank(session, "hashes-only")
    add_clip_entry(session, bank, sha256=b"\x03" * 32)
    assert banks.unmatchable_clip_entries(session, "any-model") == {}


def _gauge(bank: str, model: str) -> float | None:
    return REGISTRY.get_sample_value(
        "moderation_unmatchable_clip_entries", {"bank": bank, "model": model}
    )


@pytest.mark.usefixtures("clean_db")
def test_a_worker_start_warns_and_sets_the_gauge(caplog: pytest.LogCaptureFixture) -> None:
    with TEST_RUNTIME.session() as session:
        two_models_world(session)

    with caplog.at_level(logging.WARNING, logger="moderation.worker.metrics"):
        assert report_unmatchable_clip_entries(TEST_RUNTIME, "clip-new") == {"photos": 2}
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "bank photos has 2 CLIP entries embedded only by other models than clip-new"
    )
    assert _gauge("photos", "clip-new") == 2
    assert _gauge("partners", "clip-new") is None

    # Counted again (another start, another model): the old labels go.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moderation.worker.metrics"):
        assert report_unmatchable_clip_entries(TEST_RUNTIME, "clip-old") == {"partners": 1}
    assert "bank partners has 1 CLIP entry embedded only" in caplog.records[0].getMessage()
    assert _gauge("photos", "clip-new") is None
    assert _gauge("partners", "clip-old") == 1


@pytest.mark.usefixtures("clean_db")
def test_a_model_that_sees_every_entry_warns_of_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with TEST_RUNTIME.session() as session:
        model = get_or_create_model(session, "clip-only", DIM)
        add_clip_entry(session, banks.create_bank(session, "photos"), model)
    with caplog.at_level(logging.WARNING, logger="moderation.worker.metrics"):
        assert report_unmatchable_clip_entries(TEST_RUNTIME, "clip-only") == {}
    assert caplog.records == []


@pytest.mark.usefixtures("clean_db")
def test_bank_list_shows_clip_entries_per_model() -> None:
    with TEST_RUNTIME.session() as session:
        two_models_world(session)
    runner = CliRunner()
    listed = {
        b["name"]: b
        for b in json.loads(
            runner.invoke(main, ["bank", "list", "--json"], obj=TEST_RUNTIME).stdout
        )
    }
    assert listed["photos"]["entries"] == 4
    assert listed["photos"]["clip_entries"] == {"clip-new": 1, "clip-old": 3}
    assert listed["partners"]["clip_entries"] == {"clip-new": 1}
    table = runner.invoke(main, ["bank", "list"], obj=TEST_RUNTIME).stdout.splitlines()
    assert "CLIP_ENTRIES_BY_MODEL" in table[0]
    (photos,) = [line for line in table if " photos " in line]
    assert photos.endswith("clip-new: 1, clip-old: 3")


@pytest.mark.e2e
@pytest.mark.usefixtures("worker")
def test_the_worker_process_serves_its_metrics() -> None:
    response = httpx.get(f"http://127.0.0.1:{WORKER_METRICS_PORT}/metrics", timeout=10)
    assert response.status_code == 200
    assert "# TYPE moderation_unmatchable_clip_entries gauge" in response.text


def test_a_metrics_port_in_use_is_one_line_at_worker_start() -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsPortInUse) as refused:
            serve(port)
    assert str(refused.value) == (
        f"cannot serve metrics on port {port} (Address already in use); give each worker on "
        "a host its own MODERATION_WORKER_METRICS_PORT, or leave it unset"
    )
    explained = explain(refused.value, TEST_SETTINGS)
    assert explained is not None
    assert explained.message == str(refused.value)
