"""Recall of filtered searches on a real Milvus server, against exact search over the rows
that pass, on a corpus where Milvus 2.3.5's own filtered HNSW search falls short.

Its filtered HNSW follows a neighbour failing the filter only one time in seven, so a filter
passing 10% of rows strands some searches among failing rows whatever the ef
(`milvus_index.FILTERED_WINDOW`). The corpus is clustered as image embeddings are (a shared
direction, clusters of Zipf sizes, noise in few directions per cluster): on uniform random
vectors the stranding is rarer. The collection is indexed and loaded from sealed segments,
as a filled collection is served: growing segments are scanned exactly and hide it."""

from __future__ import annotations

import math
import time

import numpy as np

from moderation.search.indexes import recall_from_scores
from moderation.search.milvus_index import (
    Milvus,
    MilvusIndex,
    MilvusPlan,
    create_collection,
    load_collection,
)
from moderation.search.vector_index import IndexRows
from tests.milvus_fixtures import MilvusEnv

SIZE = 20_000
DIM = 128
K = 10
CANDIDATES = 100
TARGET = 0.95


def _clustered(rng: np.random.Generator, centres: np.ndarray, count: int) -> np.ndarray:
    """Points around the centres (Zipf-weighted), each cluster's noise in a power-law
    spectrum of its own: a low intrinsic dimension, as CLIP embeddings have."""
    clusters, dim = centres.shape
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.7
    spectrum = np.arange(1, dim + 1) ** -0.5
    spectrum *= math.sqrt(dim) / np.linalg.norm(spectrum)
    spectra = np.stack([np.random.default_rng(c).permutation(spectrum) for c in range(clusters)])
    cluster = rng.choice(clusters, size=count, p=weights / weights.sum())
    noise = rng.standard_normal((count, dim)) * spectra[cluster] / math.sqrt(dim)
    points = centres[cluster] + 0.6 * noise
    normalised: np.ndarray = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(
        np.float32
    )
    return normalised


def _corpus_and_queries() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    mean = rng.standard_normal(DIM)
    mean /= np.linalg.norm(mean)
    offsets = rng.standard_normal((100, DIM))
    centres = mean + offsets / np.linalg.norm(offsets, axis=1, keepdims=True)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return _clustered(rng, centres, SIZE), _clustered(rng, centres, 200)


def _indexed_collection(milvus: Milvus, corpus: np.ndarray) -> MilvusIndex:
    """A collection of `corpus` (embedding id = upload id = row), sealed, indexed with the
    service's HNSW (M 32, efConstruction 100) and loaded; searched at ef 128."""
    name = f"{milvus.settings.prefix}_filtered_recall"
    plan = MilvusPlan(
        hnsw_max=10**9, hnsw_m=32, hnsw_ef_construction=100, ivf_nlist=None, ivf_pq_m=0
    )
    create_collection(milvus, name, DIM, plan.index_for(SIZE, DIM))
    index = MilvusIndex(
        milvus,
        model_id=0,
        model_name="clustered",
        dim=DIM,
        parameters={"index_type": "HNSW", "ef": 128},
    )
    index.alias = name
    ids = np.arange(SIZE, dtype=np.int64)
    index.upsert(IndexRows(ids, ids, corpus))
    milvus.call("flush", lambda client: client.flush(name))
    deadline = time.monotonic() + 300
    while (
        milvus.call("describe index", lambda c: c.describe_index(name, "vector"))["indexed_rows"]
        < SIZE
    ):
        assert time.monotonic() < deadline, "the index was not built in 300 s"
        time.sleep(0.5)
    # Loaded again, so that the query node serves the indexed segments, not raw ones.
    milvus.call("release", lambda client: client.release_collection(name))
    load_collection(milvus, name)
    return index


def _recall(
    index: MilvusIndex,
    corpus: np.ndarray,
    queries: np.ndarray,
    modulus: int,
    window: int | None,
) -> float:
    """Served recall@10 under `id % modulus == 0`: the best 100 rescored exactly."""
    passing = np.arange(0, SIZE, modulus)
    exact = -np.sort(-(queries @ corpus[passing].T), axis=1)[:, :K]
    _, ids, _ = index.search(queries, CANDIDATES, expression=f"id % {modulus} == 0", window=window)
    assert ((ids % modulus == 0) | (ids == -1)).all(), "a row failing the filter came back"
    scores = np.where(ids >= 0, np.einsum("qd,qcd->qc", queries, corpus[ids]), -np.inf)
    return recall_from_scores(-np.sort(-scores, axis=1)[:, :K], exact)


def test_filtered_searches_meet_the_recall_target_where_milvus_alone_does_not(
    milvus_env: MilvusEnv,
) -> None:
    corpus, queries = _corpus_and_queries()
    index = _indexed_collection(milvus_env.milvus, corpus)
    # Milvus's filtered search alone (the window off: how searches ran before) falls short
    # at 10%: this corpus is one where the old searches failed.
    assert _recall(index, corpus, queries, 10, window=0) < TARGET
    # As searches are served: at 10% and at 1% (where Milvus scans the passing rows).
    assert _recall(index, corpus, queries, 10, window=None) >= TARGET
    assert _recall(index, corpus, queries, 100, window=None) >= TARGET
    # Tuning finds a window that meets the target and keeps it for filtered searches.
    passing = np.arange(0, SIZE, 10)
    exact = -np.sort(-(queries @ corpus[passing].T), axis=1)[:, :K]

    def rescore(ids: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.where(ids >= 0, np.einsum("qd,qcd->qc", q, corpus[ids]), -np.inf)

    recall = index.tune_filtered(
        queries,
        exact,
        rescore,
        expression="id % 10 == 0",
        label="10%",
        target=TARGET,
        k=K,
        candidates=CANDIDATES,
    )
    assert recall >= TARGET
    assert index.parameters["filtered_window"] >= 1
    assert index.parameters["filtered_recall_10%"] == round(recall, 4)
