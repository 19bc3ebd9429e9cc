"""Fixtures for the similarity index: a corpus of committed uploads with placed vectors."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from moderation.banks import service as banks
from moderation.embedding.models import Embedding, EmbeddingModel
from moderation.embedding.service import get_or_create_model, vector_to_bytes
from moderation.images.signals import SignalType
from moderation.main.app import create_app
from moderation.review.models import Hit
from moderation.runtime import Runtime
from moderation.screening.models import Upload, UploadStatus
from moderation.search.indexes import IndexPlan
from moderation.search.store import IndexSettings
from tests.conftest import TINY_MODEL_DIR

DIM = 32  # the tiny CLIP's projection
# Small thresholds, so a test corpus of hundreds reaches every kind of index.
PLAN = IndexPlan(
    exact_max=50,
    hnsw_max=400,
    hnsw_m=16,
    hnsw_ef_construction=40,
    ivf_nlist=None,
    ivf_pq_m=0,
    train_sample=10_000,
    recall_target=0.95,
    recall_k=10,
    # Tuned on the raw top 10 (no rescoring), so the tests measure the index itself.
    candidates=10,
    tuning_queries=50,
)


def index_settings(directory: Path, **plan: object) -> IndexSettings:
    return IndexSettings(
        directory=directory,
        plan=replace(PLAN, **plan),  # type: ignore[arg-type]
        commit_lag_s=0.2,
        snapshot_every=10_000,
    )


# Searches in tests: a short commit lag and tail interval.
SEARCH_CHANGES: dict[str, object] = {"search_commit_lag_s": 0.2, "search_tail_interval_s": 0.2}


@pytest.fixture
def search_runtime(tmp_path: Path, make_runtime: Callable[..., Runtime]) -> Runtime:
    """A runtime for the commands and the API that search: snapshots under a temporary
    directory (`settings.index_dir`), and a short commit lag and tail interval."""
    return make_runtime(index_dir=tmp_path / "index", **SEARCH_CHANGES)


@pytest.fixture
def search_api(clean_db: None, search_runtime: Runtime) -> Iterator[TestClient]:
    """The application on `search_runtime`, called in-process (as `api_fixtures.api`)."""
    with TestClient(create_app(search_runtime)) as client:
        yield client


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    """Where a `moderation api` process started by the test keeps its search snapshots
    (`search_environment`)."""
    return tmp_path / "index"


def search_environment(index_dir: Path) -> dict[str, str]:
    """For a `moderation api` process: snapshots under `index_dir`, and a short commit lag
    and tail interval (what `search_runtime` gives the tests' own)."""
    return {
        "MODERATION_INDEX_DIR": str(index_dir),
        "MODERATION_SEARCH_COMMIT_LAG_S": "0.2",
        "MODERATION_SEARCH_TAIL_INTERVAL_S": "0.2",
    }


def tiny_model(session: Session) -> EmbeddingModel:
    """The model row searches use in tests: the tiny CLIP that MODERATION_MODEL names."""
    return get_or_create_model(session, str(TINY_MODEL_DIR), DIM)


def unit(rng: np.random.Generator, count: int = 1) -> np.ndarray:
    vectors = rng.standard_normal((count, DIM))
    normalised: np.ndarray = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(
        np.float32
    )
    return normalised


def add_upload(
    session: Session,
    model: EmbeddingModel,
    frames: Sequence[np.ndarray],
    *,
    status: UploadStatus = UploadStatus.SCREENED,
    finished_at: datetime | None = None,
    error_code: str | None = None,
    uri: str | None = None,
) -> int:
    """An upload as screening leaves it: the row, and one embedding per frame."""
    upload = Upload(
        uri=uri or f"https://uploads.example/{uuid.uuid4().hex}.jpg",
        status=status,
        finished_at=finished_at or datetime.now(UTC),
        error_code=error_code,
    )
    session.add(upload)
    session.flush()
    session.add_all(
        Embedding(
            upload_id=upload.id,
            model_id=model.id,
            frame_index=frame,
            vector=vector_to_bytes(vector),
        )
        for frame, vector in enumerate(frames)
    )
    session.flush()
    return upload.id


def add_hit(session: Session, upload_id: int, bank_name: str) -> None:
    """A SHA-256 hit of the upload on a new entry of the named bank (created if missing)."""
    try:
        bank = banks.get_bank(session, bank_name)
    except banks.BankNotFound:
        bank = banks.create_bank(session, bank_name)
    (entry,) = banks.add_entries(
        session, bank, [banks.NewEntry(sha256=uuid.uuid4().bytes * 2)], added_by="test"
    )
    session.add(
        Hit(upload_id=upload_id, bank_entry_id=entry.id, signal=SignalType.SHA256, distance=0.0)
    )
    session.flush()
