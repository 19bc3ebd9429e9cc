"""The model registry and re-embedding over HTTP: admins only, every change audited, the
lifecycle's refusals as their codes, and job progress in the API and in /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from moderation.audit.models import AuditEvent
from moderation.auth.models import Role
from moderation.banks import service as banks
from moderation.embedding import registry
from moderation.embedding.models import EmbeddingModel, ModelState
from tests.api_fixtures import api, bearer, keys
from tests.conftest import TEST_RUNTIME, TINY_MODEL_DIR

__all__ = ["api", "keys"]


@pytest.fixture
def registry_restored(clean_db: None) -> Iterator[None]:
    """The tiny CLIP active and every other model retired, before and after."""

    def reset() -> None:
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

    with TEST_RUNTIME.session() as session:  # the row exists even before any worker started
        registry.seed_active(session, str(TINY_MODEL_DIR), family="clip", dim=32, fingerprint=None)
    reset()
    yield
    reset()


@pytest.mark.usefixtures("registry_restored")
def test_admins_add_activate_and_retire_models_with_audit_rows(
    api: TestClient, keys: dict[Role, str], tiny_siglip: Path
) -> None:
    admin = bearer(keys[Role.ADMIN])
    assert api.get("/v1/models", headers=bearer(keys[Role.ANALYST])).status_code == 403

    added = api.post("/v1/models", json={"name": str(tiny_siglip)}, headers=admin)
    assert added.status_code == 201, added.text
    siglip = added.json()
    assert (siglip["state"], siglip["family"], siglip["dim"]) == ("candidate", "siglip", 32)
    assert len(siglip["fingerprint"]) == 64
    listed = {m["name"]: m["state"] for m in api.get("/v1/models", headers=admin).json()}
    assert listed[str(TINY_MODEL_DIR)] == "active"

    # A bank entry only the tiny CLIP has embedded: retiring CLIP later would blind it.
    with TEST_RUNTIME.session() as session:
        clip = registry.get_model(session, str(TINY_MODEL_DIR))
        bank = banks.create_bank(session, "only-clip")
        banks.add_entries(
            session,
            bank,
            [banks.NewEntry(embedding=np.ones(32, np.float32) / np.sqrt(32), model=clip)],
            added_by="test",
        )
        clip_id = clip.id

    activated = api.post(f"/v1/models/{siglip['id']}/activate", headers=admin)
    assert activated.json()["state"] == "active"
    listed = {m["name"]: m["state"] for m in api.get("/v1/models", headers=admin).json()}
    assert listed[str(TINY_MODEL_DIR)] == "candidate"  # still computed, for its entries

    refused = api.post(f"/v1/models/{clip_id}/retire", headers=admin)
    assert refused.status_code == 409
    assert refused.json()["code"] == "coverage_lost"
    assert refused.json()["banks"] == {"only-clip": 1}
    active = api.post(f"/v1/models/{siglip['id']}/retire", headers=admin)
    assert (active.status_code, active.json()["code"]) == (409, "model_state")
    forced = api.post(f"/v1/models/{clip_id}/retire?force=true", headers=admin)
    assert forced.json()["state"] == "retired"

    with TEST_RUNTIME.session() as session:
        actions = session.scalars(
            select(AuditEvent.action).where(AuditEvent.subject_type == "embedding_model")
        ).all()
    assert {"model.add", "model.activate", "model.retire"} <= set(actions)


@pytest.mark.usefixtures("registry_restored")
def test_a_reembedding_job_shows_its_progress_in_the_api_and_metrics(
    api: TestClient, keys: dict[Role, str], tiny_siglip: Path
) -> None:
    admin = bearer(keys[Role.ADMIN])
    siglip = api.post("/v1/models", json={"name": str(tiny_siglip)}, headers=admin).json()
    started = api.post(f"/v1/models/{siglip['id']}/reembed", json={"duty": 0.5}, headers=admin)
    assert started.status_code == 202, started.text
    job = started.json()
    assert (job["model"], job["status"]) == (str(tiny_siglip), "queued")
    again = api.post(f"/v1/models/{siglip['id']}/reembed", json={}, headers=admin).json()
    assert again["id"] == job["id"]  # one unfinished job per model
    assert api.get(f"/v1/reembed-jobs/{job['id']}", headers=admin).json()["id"] == job["id"]
    missing = api.get("/v1/reembed-jobs/999999", headers=admin)
    assert (missing.status_code, missing.json()["code"]) == (404, "reembed_job_not_found")

    scraped = api.get("/metrics").text
    assert f'moderation_reembed_done{{job="{job["id"]}",model="{tiny_siglip}"}} 0.0' in scraped
    assert f'moderation_model_state{{model="{tiny_siglip}",state="candidate"}} 1.0' in scraped
