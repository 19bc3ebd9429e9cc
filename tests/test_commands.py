"""The README's main job (`moderation demo`) and the benchmark, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import TEST_DATABASE_URL, bench_redis_url

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def _user_env(home: Path) -> dict[str, str]:
    """The environment of a user with nothing configured and no models downloaded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    return {**env, "HOME": str(home), "HF_HOME": str(home / "hf")}


def test_demo_screens_the_samples_and_shows_the_hits(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moderation", "demo"],
        env=_user_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert "random weights" in output  # it says plainly which model it used
    assert "9 uploads: 7 screened, 2 refused as bad input; 4 matched the bank" in output
    hit_lines = [line for line in output.splitlines() if "demo-known-bad" not in line]
    animation = [line.split() for line in hit_lines if "04-b-inside-animation.gif" in line]
    assert ["pdq", "3"] in [[cells[3], cells[5]] for cells in animation if len(cells) == 6]
    assert "truncated_image" in output
    assert "unsupported_format" in output


def test_benchmark_runs_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "screening.json"
    result = subprocess.run(
        [
            sys.executable,
            "bench/screening.py",
            "--images",
            "16",
            "--arch",
            "tiny",
            "--bank-size",
            "200",
            "--out",
            str(out),
        ],
        cwd=REPO,
        # Its own database and Redis db rather than its defaults (`moderation_bench`, db 14):
        # named after this process's, and the db below the test processes' (conftest), as
        # the benchmark empties it.
        env={
            **_user_env(tmp_path),
            "MODERATION_BENCH_DATABASE_URL": f"{TEST_DATABASE_URL}_bench",
            "MODERATION_BENCH_REDIS_URL": bench_redis_url(),
        },
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    # What it timed happened: every image it submitted was screened by a real worker, in
    # its own database, and the banked ones were found again.
    engine = create_engine(f"{TEST_DATABASE_URL}_bench")
    try:
        with engine.connect() as conn:
            screened = conn.scalar(text("SELECT count(*) FROM uploads WHERE status = 'screened'"))
    finally:
        engine.dispose()
    assert figures["images"] == 16
    assert screened is not None
    assert screened >= figures["images"]
    assert figures["hits"] >= 10
    # Batches the worker logged, within what the settings allow.
    assert 1 <= figures["mean_batch"]["embedding"] <= figures["batch_size"]
    # The baseline was measured in the same run, before and after the pipeline, and both
    # figures are printed side by side.
    assert len(figures["model_only_runs_images_per_s"]) == 2
    assert all(run > 0 for run in figures["model_only_runs_images_per_s"])
    printed = result.stdout
    assert str(figures["pipeline_images_per_s"]) in printed
    assert str(figures["model_only_images_per_s"]) in printed
