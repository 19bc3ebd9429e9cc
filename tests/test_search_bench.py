"""`bench/search.py` runs end to end at a toy size and its figures hang together (recall
only: timings are the benchmark's to report, never a test's to assert)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.milvus_server import MilvusProcess

REPO = Path(__file__).resolve().parent.parent


def _run_toy_benchmark(out: Path, *args: str) -> dict[str, Any]:
    """bench/search.py on 3,000 64-d vectors and 50 queries, its figures from `out`."""
    result = subprocess.run(
        [
            sys.executable,
            "bench/search.py",
            *("--sizes", "3000", "--dim", "64", "--queries", "50", "--timed", "20"),
            *("--out", str(out), *args),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def test_search_benchmark_writes_every_index_type_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "search.json"
    figures = _run_toy_benchmark(out, "--threads", "1")
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


def test_search_benchmark_measures_the_services_ivf_collections_on_milvus(
    tmp_path: Path, milvus_server: MilvusProcess
) -> None:
    from pymilvus import MilvusClient

    out = tmp_path / "search.json"
    figures = _run_toy_benchmark(
        out,
        *("--backend", "milvus", "--milvus-uri", milvus_server.uri),
        *("--milvus-only", "ivf-sq8", "ivf-pq"),
    )
    rows = figures["rows"]
    assert {(row["kind"], row["rerank"]) for row in rows} == {
        (kind, rerank) for kind in ("milvus-ivf-sq8", "milvus-ivf-pq") for rerank in (False, True)
    }
    # The service's parameters at 3,000 x 64: nlist 4 sqrt(N), PQ with 64 / 8 sub-quantizers.
    by_kind = {(row["kind"], row["rerank"]): row for row in rows}
    assert by_kind["milvus-ivf-sq8", True]["params"] == {"nlist": 219}
    assert by_kind["milvus-ivf-pq", True]["params"] == {"nlist": 219, "m": 8}
    for kind in ("milvus-ivf-sq8", "milvus-ivf-pq"):
        row = by_kind[kind, True]
        # Tuned as the service tunes: the smallest nprobe meeting 0.95 on stored vectors.
        assert row["tuned_recall"] >= 0.95
        assert 1 <= row["nprobe"] <= 219
        assert row["setting"] == f"nlist219 nprobe{row['nprobe']}"
        assert row["recall_at_10"] >= 0.9
    # PQ's own order is approximate; the exact rerank of its 100 candidates lifts it.
    assert (
        by_kind["milvus-ivf-pq", True]["recall_at_10"]
        > by_kind["milvus-ivf-pq", False]["recall_at_10"]
    )
    # Each collection is dropped before the next is made and at the end.
    client = MilvusClient(uri=milvus_server.uri)
    try:
        assert not [name for name in client.list_collections() if name.startswith("bench_")]
    finally:
        client.close()
