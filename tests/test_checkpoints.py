"""A model that cannot load is one line, at once, naming MODERATION_MODEL and the way out,
on the command line and over HTTP; a checkpoint this host has loads as before."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert

from moderation.auth.models import Role
from moderation.embedding.checkpoints import ModelUnavailable, check_loadable
from moderation.embedding.models import EmbeddingModel
from moderation.main.cli import main
from tests.api_fixtures import api, bearer, keys
from tests.conftest import TEST_RUNTIME, TINY_MODEL_DIR
from tests.images import encode, textured, write

__all__ = ["api", "keys"]

NOT_CACHED = "example-org/no-such-clip-checkpoint"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hub cannot be reached from these machines anyway; offline mode says so at once.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def unavailable_model(offline: None) -> Iterator[str]:
    """A model this host cannot load as the registry's active model: commands and routes
    use the active model, not the setting."""
    with TEST_RUNTIME.engine.begin() as conn:
        active = conn.scalar(select(EmbeddingModel.id).where(EmbeddingModel.state == "active"))
        conn.execute(
            update(EmbeddingModel).values(state="retired").where(EmbeddingModel.state == "active")
        )
        conn.execute(
            insert(EmbeddingModel)
            .values(name=NOT_CACHED, dim=32, state="active")
            .on_conflict_do_update(index_elements=["name"], set_={"state": "active"})
        )
    yield NOT_CACHED
    with TEST_RUNTIME.engine.begin() as conn:
        conn.execute(
            update(EmbeddingModel).values(state="retired").where(EmbeddingModel.name == NOT_CACHED)
        )
        if active is not None:
            conn.execute(
                update(EmbeddingModel).values(state="active").where(EmbeddingModel.id == active)
            )


def test_a_checkpoint_this_host_has_is_loadable(tiny_model: Path) -> None:
    check_loadable(str(TINY_MODEL_DIR))


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("/nonexistent/clip", "no such directory, and not a Hugging Face id"),
        (NOT_CACHED, "not a directory, and not in the cache (HF_HUB_OFFLINE)"),
    ],
)
def test_a_checkpoint_that_cannot_load_is_said_at_once(name: str, why: str) -> None:
    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as refused:
        check_loadable(name)
    assert time.monotonic() - started < 5  # not a minute of the hub's retries
    assert why in refused.value.message
    assert "MODERATION_MODEL" in refused.value.message
    assert "`moderation model tiny DIR`" in refused.value.message


def test_the_command_line_says_it_in_one_line(unavailable_model: str, tmp_path: Path) -> None:
    image = write(tmp_path / "a.jpg", encode(textured(64)))
    result = CliRunner().invoke(
        main, ["embed", str(image), "--out", str(tmp_path / "a.npy")], obj=TEST_RUNTIME
    )
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: cannot load the embedding model {unavailable_model!r}")
    assert "Traceback" not in result.output


def test_an_image_entry_answers_503_naming_the_setting(
    api: TestClient, keys: dict[Role, str], unavailable_model: str, tmp_path: Path
) -> None:
    admin = bearer(keys[Role.ADMIN])
    assert api.post("/v1/banks", json={"name": "by-image"}, headers=admin).status_code == 201
    answer = api.post(
        "/v1/banks/by-image/entries/image",
        files={"image": ("a.jpg", encode(textured(64)), "image/jpeg")},
        headers=admin,
    )
    assert answer.status_code == 503
    assert answer.json()["code"] == "model_unavailable"
    assert "MODERATION_MODEL" in answer.json()["detail"]
