"""`bench/golden.py` runs end to end at a toy size, and the evaluation run it times gives
the figures that numpy gives by brute force over the same vectors (timings are the
benchmark's to report, never a test's to assert)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_DATABASE_URL

REPO = Path(__file__).resolve().parent.parent


def test_golden_benchmark_measures_what_numpy_computes(tmp_path: Path) -> None:
    out = tmp_path / "golden.json"
    env = {
        **os.environ,
        # A database of its own: the benchmark empties the tables it fills.
        "MODERATION_BENCH_DATABASE_URL": f"{TEST_DATABASE_URL}_golden_bench",
    }
    result = subprocess.run(
        [
            sys.executable,
            "bench/golden.py",
            "--corpus",
            "2000",
            "--queries",
            "100",
            "--architecture",
            "tiny",
            "--candidates",
            "8",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    served = figures["evaluation"]["figures"]
    expected = figures["brute_force_baseline"]["figures"]
    for modality in ("text", "image"):
        assert served[modality]["queries"] == 50
        for measure in ("recall", "precision", "mrr"):
            assert served[modality][measure] == pytest.approx(expected[modality][measure])
    assert figures["cross_encoder"]["candidates"] == 8
