"""`bench/search.py` runs end to end at a toy size and its figures hang together (recall
only: timings are the benchmark's to report, never a test's to assert)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def test_search_benchmark_writes_every_index_type_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "search.json"
    result = subprocess.run(
        [
            sys.executable,
            "bench/search.py",
            "--sizes",
            "3000",
            "--dim",
            "64",
            "--queries",
            "50",
            "--timed",
            "20",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert {row["kind"] for row in rows} == {"flat", "hnsw", "ivf-flat", "ivf-pq"}
    (exact,) = [row for row in rows if row["kind"] == "flat"]
    assert exact["recall_at_10"] == 1.0
    by_setting = {(row["kind"], row["setting"], row["rerank"]): row for row in rows}
    # Probing most lists, or a wide HNSW beam, on 3,000 points is nearly exact search.
    assert by_setting[("ivf-flat", "nlist219 nprobe128", False)]["recall_at_10"] >= 0.99
    assert by_setting[("hnsw", "M32 efC100 ef512", False)]["recall_at_10"] >= 0.99
    # The exact rerank of 100 candidates lifts IVF-PQ's approximate scores.
    for nprobe in (16, 64):
        setting = f"nlist219 nprobe{nprobe}"
        raw = by_setting[("ivf-pq", setting, False)]["recall_at_10"]
        assert by_setting[("ivf-pq", setting, True)]["recall_at_10"] > raw
    # The held-out queries are not in the corpus: no query finds itself at cosine 1.
    assert figures["data"]["3000"]["nn1_cos"] < 0.99
    # The plot draws a curve per index kind: saturated colours of their own on the white
    # and grey of an empty chart's frame, axes and text.
    with Image.open(out.with_suffix(".png")) as plot:
        pixels = np.asarray(plot.convert("RGB")).reshape(-1, 3).astype(int)
    saturated = pixels[pixels.max(axis=1) - pixels.min(axis=1) > 96]
    hues = {tuple(int(c) // 64 for c in pixel) for pixel in saturated}
    assert len(hues) >= 4, hues
